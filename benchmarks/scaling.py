r"""How one PPO iteration of instruct scales with the batch, the response length and the model.

Run (from the repository root):

  python benchmarks/scaling.py --json_out=/tmp/scaling.json

Each point is one process of `side_by_side.py`'s instruct worker (`--worker=ppo`: the library's
sampler, experience and update programs, 4 epochs x 1 minibatch, a warm-up iteration then
`--iterations` timed ones) at one (model, prompts per iteration B, response length R); the
prompt length is 32. It prints iteration time, the rollout / scoring / update split, the model
FLOPs' fraction of the measured matmul peak, peak RSS, and whether anything was compiled after
the first iteration (the jit caches and XLA's compile events, as `rollout.py` checks).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import side_by_side as sbs  # noqa: E402

# (model, B, R): the batch and length sweeps on the 5.4M GPT-2, then the larger models.
GRID = [("gpt2_5m", 8, 64), ("gpt2_5m", 16, 64), ("gpt2_5m", 32, 64), ("gpt2_5m", 16, 32),
        ("gpt2_5m", 16, 128), ("small_100m", 16, 64), ("gpt2", 16, 64)]


def main(argv=None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--points", default="", help="model:B:R,... (default: the grid above).")
  p.add_argument("--iterations", type=int, default=2, help="Timed PPO iterations per point.")
  p.add_argument("--json_out", default="")
  args = p.parse_args(argv)
  grid = GRID
  if args.points:
    grid = [(m, int(b), int(r)) for m, b, r in (x.split(":") for x in args.points.split(","))]
  base = sbs.parse_args([f"--ppo_iterations={args.iterations + 1}"])
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    peak = sbs.run_side("instruct", "peak", grid[0][0], base, tmp)["peak_gflops"] * 1e9
    for model, batch, new in grid:
      a = sbs.parse_args(
          [f"--ppo_iterations={args.iterations + 1}", f"--batch={batch}", f"--new_tokens={new}"])
      r = sbs.run_side("instruct", "ppo", model, a, tmp)
      flops = sbs.phase_flops(sbs.arch(model), a)
      total = flops["rollout"] + flops["scoring"] + flops["update"]
      rows.append(
          dict(model=model, params=r["params"], batch=batch, new_tokens=new,
               iteration_s=r["iteration_s"], rollout_s=r["rollout_s"], scoring_s=r["scoring_s"],
               update_s=r["update_s"], peak_fraction=total / r["iteration_s"] / peak,
               peak_rss_gib=r["peak_rss_gib"], recompiled=r["recompiled"],
               iteration_0_s=r["iteration_0_s"]))
      print(json.dumps(rows[-1]), flush=True)
  print(f"\nmeasured float32 matmul peak {peak / 1e9:.1f} GFLOP/s\n")
  print("| model | params | B x R | iteration s | rollout / scoring / update s "
        "| rollout / scoring / update | % of peak | peak RSS GiB | recompiled after first |\n"
        "|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    parts = [r["rollout_s"], r["scoring_s"], r["update_s"]]
    share = " / ".join(f"{x / sum(parts):.0%}" for x in parts)
    print(f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['batch']} x {r['new_tokens']} "
          f"| {r['iteration_s']:.3g} | {' / '.join(f'{x:.3g}' for x in parts)} | {share} "
          f"| {r['peak_fraction']:.0%} | {r['peak_rss_gib']:.2f} "
          f"| {'yes' if r['recompiled'] else 'no'} |")
  if args.json_out:
    with open(args.json_out, "w") as f:
      json.dump(dict(peak_flops=peak, rows=rows), f, indent=2)
  return rows


if __name__ == "__main__":
  main()
