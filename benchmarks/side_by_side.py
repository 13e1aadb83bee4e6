r"""instruct against its peers (Hugging Face transformers + PyTorch, TRL), side by side.

Run (from the repository root; the `torch` and `bench` extras installed):

  python benchmarks/side_by_side.py --models=gpt2_5m --rounds=2 --json_out=/tmp/sbs.json
  python benchmarks/side_by_side.py --models=gpt2 --rounds=1 --ppo_iterations=2 --sft_steps=3 \
      --rollout_reps=2 --json_out=/tmp/sbs_124m.json

Every measurement is its own process, so peak memory is the phase's own: for each model and
phase (`peak`, `sft`, `rollout`, `ppo`) the instruct worker (this file, `--worker`) and the peer
(`benchmarks/peer_torch.py`) run one after the other, `--rounds` times, alternating, at the same
shapes, from one architecture: `MODELS[name]` is an instruct `ModelConfig`, and the peer builds
its models from `instruct.hf.configs.hf_config_from_model_config` of it (random weights on both
sides; nothing is downloaded). Both sides get the same threads (`--threads`, default every
core: XLA's CPU client uses them all; torch gets `torch.set_num_threads`).

What is timed (each side documents its own timers; instruct's are the library's programs):

- sft: one supervised step, B x T (default 8 x 128) random tokens, loss on the second half of
  each row, AdamW (lr 1e-5, betas 0.9 / 0.95, eps 1e-8, weight decay 0.1) after global-norm
  clipping at 1. instruct: `trainer.build` of the SFT stage (as `benchmarks/sft_step.py`).
- rollout: B prompts (default 16, left-padded, 16-32 tokens) and R new tokens (default 64),
  temperature 1, full length (no EOS). instruct: `rl.sampler` (`benchmarks/rollout.py`).
- ppo: one PPO iteration, 4 epochs x 1 minibatch, policy, reference, critic and reward model
  of the architecture; phases rollout / scoring / update (TRL: `PPOTrainer.train()`).

Reported: each side's median, the ratio (peer time / instruct time: above 1 instruct is
faster), peak RSS (and device memory on an accelerator), and for every phase the fraction of
the machine's measured matmul peak (the higher of the JAX and torch float32 2048^3 matmul
rates of the `peak` phase) that its model FLOPs reach; for decoding also the fraction of the
memory-bandwidth bound (every weight and the KV cache read once per decode step at the
measured copy bandwidth). FLOPs: 2 N per token forward, 6 N forward and backward (N the
parameters in matmuls; a scalar-head model has no LM head), plus the attention matmuls.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PHASES = ("peak", "sft", "rollout", "ppo")
# Architectures: instruct.model.config.preset(base, **overrides).
MODELS = {
    "tiny": ("tiny", {}),
    "gpt2_5m": ("gpt2",
                dict(vocab_size=8192, d_model=256, num_layers=4, num_heads=4, num_kv_heads=4,
                     head_dim=64, d_ff=1024, max_length=256)),
    "gpt2": ("gpt2", {}),
    "small_100m": ("small_100m", {}),
    "pythia_1b": ("pythia_1b", dict(max_length=1024)),
    "llama_1b": ("llama_1b", dict(max_length=1024)),
}


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--models", default="gpt2_5m", help=f"Comma-separated names of {list(MODELS)}.")
  p.add_argument("--phases", default=",".join(PHASES))
  p.add_argument("--rounds", type=int, default=2, help="instruct, peer alternations per phase.")
  p.add_argument("--sides", default="instruct,peer")
  p.add_argument("--peer_phases", default=",".join(PHASES),
                 help="The phases the peer runs (without TRL: peak,sft,rollout).")
  p.add_argument("--threads", type=int, default=0, help="0: every core.")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--peak_size", type=int, default=2048, help="n of the n^3 peak matmul.")
  p.add_argument("--peer_device", default="cpu", choices=("cpu", "cuda"),
                 help="The peer's device (instruct runs on JAX's default backend).")
  for name, default in [("sft_batch", 8), ("sft_length", 128), ("sft_steps", 10), ("batch", 16),
                        ("prompt_length", 32), ("new_tokens", 64), ("rollout_reps", 5),
                        ("ppo_iterations", 3), ("epochs", 4), ("num_minibatches", 1)]:
    p.add_argument(f"--{name}", type=int, default=default)
  p.add_argument("--json_out", default="")
  p.add_argument("--from_json", default="",
                 help="Print the tables of a run saved by --json_out, and run nothing.")
  p.add_argument("--worker", default="", help=argparse.SUPPRESS)  # A phase, in a subprocess.
  p.add_argument("--model", default="", help=argparse.SUPPRESS)
  p.add_argument("--out", default="", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  for key in ("models", "phases", "sides", "peer_phases"):
    setattr(args, key, [x.strip() for x in getattr(args, key).split(",") if x.strip()])
  for m in args.models:
    if m not in MODELS:
      raise ValueError(f"--models: unknown {m!r}; known: {sorted(MODELS)}.")
  for x in args.phases:
    if x not in PHASES:
      raise ValueError(f"--phases: unknown {x!r}; known: {PHASES}.")
  if args.rounds < 1 or args.ppo_iterations < 2 or args.new_tokens < 2:
    raise ValueError("--rounds >= 1, --ppo_iterations >= 2 (one warm-up) and --new_tokens >= 2.")
  if args.batch % args.num_minibatches:
    raise ValueError(f"--batch={args.batch} is not divisible by "
                     f"--num_minibatches={args.num_minibatches}.")
  return args


# ---------------------------------------------------------------------------------------------
# FLOPs and bytes (no JAX needed).


def arch(name: str, dtype: str = "float32"):
  from instruct.model import ModelConfig, preset
  base, overrides = MODELS[name]
  return ModelConfig(**preset(base, dtype=dtype, **overrides))


def matmul_params(cfg, head: str = "lm") -> int:
  """Parameters in matmuls: all but the learned position table (the tied embedding counts
  once, as the LM head); a scalar head has no vocabulary matmul."""
  from instruct.model import count_params
  n = count_params(cfg, head="lm")
  if cfg.position == "learned":
    n -= cfg.max_length * cfg.d_model
  if head == "scalar":
    n -= cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 0)
  return n


def forward_flops(cfg, batch: int, length: int, head: str = "lm") -> float:
  """2 N per token plus the full length x length score and value matmuls."""
  tokens = batch * length
  attention = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * length * tokens
  return 2.0 * matmul_params(cfg, head) * tokens + attention


def phase_flops(cfg, a: argparse.Namespace) -> dict:
  """Model FLOPs of each timed unit: an SFT step, a rollout, PPO's scoring and update."""
  s = a.prompt_length + a.new_tokens
  decode = sum(2.0 * matmul_params(cfg) * a.batch
               + 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * (a.prompt_length + i) * a.batch
               for i in range(a.new_tokens))
  lm, scalar = forward_flops(cfg, a.batch, s), forward_flops(cfg, a.batch, s, "scalar")
  return {
      "sft": 3 * forward_flops(cfg, a.sft_batch, a.sft_length),
      "rollout": forward_flops(cfg, a.batch, a.prompt_length) + decode,
      "scoring": 2 * lm + 2 * scalar,  # policy, reference; critic, reward model.
      "update": a.epochs * 3 * (lm + scalar),  # policy and critic, forward and backward.
  }


def decode_bytes(cfg, a: argparse.Namespace, dtype_bytes: int) -> float:
  """Bytes one full-length rollout must read: every weight and the KV cache at each step."""
  from instruct.model import count_params
  weights = count_params(cfg, head="lm") * dtype_bytes
  cache = 2 * cfg.num_layers * a.batch * cfg.num_kv_heads * cfg.head_dim * dtype_bytes
  return sum(weights + cache * (a.prompt_length + i) for i in range(a.new_tokens))


# ---------------------------------------------------------------------------------------------
# The instruct worker (one phase per process).


def instruct_worker(a: argparse.Namespace) -> dict:
  import jax
  import jax.numpy as jnp

  import rollout
  import sft_step
  from instruct import config_lib
  cfg = arch(a.model, "bfloat16" if a.dtype == "bfloat16" else "float32")
  out = {"params": None}
  if a.worker == "peak":
    out.update(peak_gflops=jax_peak_flops(jax, jnp, a.peak_size, a.dtype) / 1e9,
               bandwidth_gbs=jax_bandwidth(jax, jnp) / 1e9)
  elif a.worker == "sft":
    config = sft_step.make_config(MODELS[a.model][0], a.sft_batch, a.sft_length)
    config.model = config_lib.model_config(MODELS[a.model][0], dtype=cfg.dtype,
                                           **MODELS[a.model][1])
    config.optimizer.update(learning_rate=1e-5, warmup_steps=0, schedule="constant", b1=0.9,
                            b2=0.95, eps=1e-8, weight_decay=0.1, grad_clip_norm=1.0)
    r = sft_step.bench_config(config, a.sft_steps, warmup=2)
    out.update(step_s=r["step_s"], step_s_min=r["step_s_min"], step_s_max=r["step_s_max"],
               tokens_per_s=r["tokens_per_s"], compile_s=r["compile_s"])
  else:
    import flax.linen as nn
    s = dict(batch=a.batch, prompt_length=a.prompt_length, new_tokens=a.new_tokens,
             iterations=a.ppo_iterations - 1, sampler_reps=a.rollout_reps, epochs=a.epochs,
             num_minibatches=a.num_minibatches)
    log = rollout.CompileLog()
    run = rollout.build(a.model, s, cfg)
    with jax.set_mesh(run["mesh"]), nn.logical_axis_rules(run["rules"]):
      if a.worker == "rollout":
        r = rollout.bench_sampler(run, s, log)
        out.update(call_s=r["sampler_call_s"], generated_tokens_per_s=r["generated_tokens_per_s"],
                   prefill_s=r["prefill_s"], decode_s_per_step=r["decode_s_per_token"])
      else:
        r = rollout.bench_ppo(run, s, log)
        out.update({k: r[k] for k in ("iteration_s", "rollout_s", "scoring_s", "update_s")},
                   recompiled=r["recompiled"], iteration_0_s=r["iteration_0_s"])
  from instruct.model import count_params
  out.update(params=count_params(cfg), jax_version=jax.__version__,
             device=str(jax.devices()[0].device_kind))
  memory = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in memory:
    out["device_peak_gib"] = memory["peak_bytes_in_use"] / 2 ** 30
  return out


def _median_s(jax, fn, *args, reps: int = 10) -> float:
  jax.block_until_ready(fn(*args))
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def jax_peak_flops(jax, jnp, n: int, dtype: str) -> float:
  """FLOP/s of a jitted [n, n] @ [n, n] matmul in `dtype` (float32 accumulation)."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(dtype))
  mm = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
  return 2.0 * n ** 3 / _median_s(jax, mm, a, a)


def jax_bandwidth(jax, jnp, mib: int = 256) -> float:
  """Bytes/s of `x + 1` on a `mib` MiB float32 array (read + write), in place (donated)."""
  add = jax.jit(lambda x: x + 1, donate_argnums=0)
  state = {"x": jnp.zeros((mib * 2 ** 18,), jnp.float32)}

  def step():
    state["x"] = add(state["x"])
    return state["x"]

  return 2 * state["x"].nbytes / _median_s(jax, step)


# ---------------------------------------------------------------------------------------------
# The driver.


def run_side(side: str, phase: str, model: str, a: argparse.Namespace, tmp: str) -> dict:
  """One phase of one side in its own process; its JSON and peak RSS."""
  out = os.path.join(tmp, f"{side}_{phase}_{model}_{time.monotonic_ns()}.json")
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, os.path.dirname(HERE)]))
  # The machine's own devices: fake CPU devices (as the tests set) would split the batch.
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if not f.startswith("--xla_force_host_platform_device_count"))
  if side == "instruct":
    cmd = [sys.executable, __file__, f"--worker={phase}", f"--model={model}", f"--out={out}"]
    cmd += [f"--{k}={getattr(a, k)}" for k in FORWARDED]
  else:
    hf = os.path.join(tmp, f"{model}.json")
    write_hf_config(model, hf)
    cmd = [
        sys.executable,
        os.path.join(HERE,
                     "peer_torch.py"), f"--phase={phase}", f"--hf_config={hf}", f"--json_out={out}",
        f"--threads={a.threads}", f"--dtype={a.dtype}", f"--peak_size={a.peak_size}"
    ]
    cmd += [f"--{peer}={getattr(a, ours)}" for peer, ours in PEER_FLAGS[phase]]
    cmd.append(f"--device={a.peer_device}")
  start = time.perf_counter()
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
  if proc.returncode:
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
    raise RuntimeError(f"{side} {phase} {model} exited {proc.returncode}: {tail[0]}")
  with open(out) as f:
    result = json.load(f)
  result["process_s"] = time.perf_counter() - start
  return result


FORWARDED = ("sft_batch", "sft_length", "sft_steps", "batch", "prompt_length", "new_tokens",
             "rollout_reps", "ppo_iterations", "epochs", "num_minibatches", "dtype", "threads",
             "peak_size")
PEER_FLAGS = {
    "peak": [],
    "sft": [("batch", "sft_batch"), ("length", "sft_length"), ("steps", "sft_steps")],
    "rollout": [("batch", "batch"), ("prompt_length", "prompt_length"),
                ("new_tokens", "new_tokens"), ("reps", "rollout_reps")],
    "ppo": [("batch", "batch"), ("prompt_length", "prompt_length"), ("new_tokens", "new_tokens"),
            ("iterations", "ppo_iterations"), ("epochs", "epochs"),
            ("num_minibatches", "num_minibatches")],
}


def write_hf_config(model: str, path: str) -> None:
  from instruct.hf.configs import hf_config_from_model_config
  hf = hf_config_from_model_config(arch(model), bos_token_id=None, eos_token_id=None).to_dict()
  keep = {k: v for k, v in hf.items() if not k.startswith("_") and k not in ("architectures",)}
  with open(path, "w") as f:
    json.dump(keep, f)


def times(phase: str, side: str, r: dict) -> dict:
  """The seconds of one run: {unit: seconds}."""
  if phase == "sft":
    return {"step": r["step_s"] if side == "instruct" else r["step_s"]["median"]}
  if phase == "rollout":
    call = r["call_s"] if side == "instruct" else r["call_s"]["median"]
    return {"rollout call": call, "decode step": r["decode_s_per_step"], "prefill": r["prefill_s"]}
  if phase == "ppo":
    return {k: r[f"{k}_s"] for k in ("iteration", "rollout", "scoring", "update")}
  return {}


def summarize(results: list[dict], a: argparse.Namespace) -> dict:
  """Per model: the medians over rounds of each side's times and memory, ratios, fractions."""
  peaks = [r for r in results if r["phase"] == "peak"]
  peak_flops = max([r["result"]["peak_gflops"] for r in peaks], default=float("nan")) * 1e9
  bandwidth = max([r["result"]["bandwidth_gbs"] for r in peaks], default=float("nan")) * 1e9
  table = {}
  for model in a.models:
    cfg = arch(model)
    flops = phase_flops(cfg, a)
    dtype_bytes = 2 if a.dtype == "bfloat16" else 4
    rows = []
    for phase in [p for p in a.phases if p != "peak"]:
      runs = {
          side: [r for r in results if (r["model"], r["phase"], r["side"]) == (model, phase, side)]
          for side in a.sides
      }
      sides = [side for side in a.sides if runs[side]]  # The peer may skip a phase.
      units = times(phase, sides[0], runs[sides[0]][0]["result"])
      for unit in units:
        row = {"phase": phase, "unit": unit}
        for side in sides:
          row[side] = statistics.median(times(phase, side, r["result"])[unit] for r in runs[side])
          row[f"{side}_all"] = [times(phase, side, r["result"])[unit] for r in runs[side]]
        unit_flops = {
            "step": flops["sft"], "rollout call": flops["rollout"], "rollout": flops["rollout"],
            "scoring": flops["scoring"], "update": flops["update"],
            "iteration": flops["rollout"] + flops["scoring"] + flops["update"]
        }.get(unit)
        for side in sides:
          if unit_flops:
            row[f"{side}_peak_fraction"] = unit_flops / row[side] / peak_flops
          if unit in ("rollout call", "rollout"):
            row[f"{side}_bandwidth_fraction"] = (decode_bytes(cfg, a, dtype_bytes) / bandwidth
                                                 / row[side])
        if len(sides) == 2:
          row["ratio"] = row[sides[1]] / row[sides[0]]
          # Round i's peer over round i's instruct: the rounds alternate, so each pair shares
          # the machine's state of that moment.
          row["ratio_all"] = [p / i for i, p in zip(row[f"{sides[0]}_all"], row[f"{sides[1]}_all"])]
        rows.append(row)
      for side in sides:
        rss = [r["result"]["peak_rss_gib"] for r in runs[side]]
        rows.append({"phase": phase, "unit": "peak RSS GiB", side: max(rss)})
        device = [
            r["result"].get("device_peak_gib") or r["result"].get("cuda_max_memory_allocated_gib")
            for r in runs[side]
        ]
        if all(d is not None for d in device):
          rows.append({"phase": phase, "unit": "peak device memory GiB", side: max(device)})
    table[model] = rows
  return {"peak_flops": peak_flops, "bandwidth": bandwidth, "models": table}


def _with_range(row: dict, key: str, fmt: str, unit: str = "") -> str:
  """`median (min-max)` over the rounds, or the one value."""
  values = row.get(f"{key}_all") or []
  text = fmt.format(row[key]) + unit
  if len(values) > 1:
    text += f" ({fmt.format(min(values))}-{fmt.format(max(values))}{unit})"
  return text


def markdown(summary: dict, a: argparse.Namespace) -> str:
  """The tables: medians over rounds, with (min-max) when there were several."""
  lines = []
  for model, rows in summary["models"].items():
    lines += [f"\n{model} ({a.dtype}):\n"]
    head = ["phase", "what"] + [f"{s} s" for s in a.sides]
    head += ["peer / instruct"] if len(a.sides) == 2 else []
    head += [f"{s} % of peak" for s in a.sides] + ["% of bandwidth bound (instruct / peer)"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    merged: dict = {}
    for row in rows:
      merged.setdefault((row["phase"], row["unit"]), {}).update(row)
    for (phase, unit), row in merged.items():
      cells = [phase, unit]
      cells += [_with_range(row, s, "{:.4g}") if s in row else "" for s in a.sides]
      if len(a.sides) == 2:
        cells.append(_with_range(row, "ratio", "{:.2f}", "x") if "ratio" in row else "")
      cells += [
          f"{row[f'{s}_peak_fraction']:.0%}" if f"{s}_peak_fraction" in row else "" for s in a.sides
      ]
      bw = [
          f"{row[f'{s}_bandwidth_fraction']:.0%}" for s in a.sides
          if f"{s}_bandwidth_fraction" in row
      ]
      cells.append(" / ".join(bw))
      lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def report(summary: dict, a: argparse.Namespace) -> str:
  """The measured peaks and the tables."""
  return (f"measured peak: {summary['peak_flops'] / 1e9:.1f} GFLOP/s {a.dtype} matmul, "
          f"{summary['bandwidth'] / 1e9:.1f} GB/s copy\n{markdown(summary, a)}")


def render_saved(path: str) -> dict:
  """Summarises the runs of a saved record again and prints its tables."""
  try:
    with open(path) as f:
      record = json.load(f)
    a = argparse.Namespace(**record["args"])
    summary = summarize(record["runs"], a)
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ValueError(f"--from_json={path}: not a record written by --json_out ({e!r}).") from e
  print(f"{record['started']}; CPU {record['cpu_model']}, {record['cpu_count']} cores\n"
        f"{report(summary, a)}")
  return dict(record, summary=summary)


def main(argv=None) -> dict:
  a = parse_args(argv)
  if a.worker:
    result = instruct_worker(a)
    result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    with open(a.out, "w") as f:
      json.dump(result, f)
    return result
  if a.from_json:
    return render_saved(a.from_json)
  from machine import cpu_model
  started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
  print(
      f"{started}; CPU {cpu_model()}, {os.cpu_count()} cores; load average "
      f"{os.getloadavg()[0]:.2f}", flush=True)
  results = []
  with tempfile.TemporaryDirectory() as tmp:
    for phase in a.phases:
      for model in (a.models if phase != "peak" else a.models[:1]):
        for i in range(a.rounds if phase != "peak" else 1):
          for side in a.sides:
            if side == "peer" and phase not in a.peer_phases:
              continue
            r = run_side(side, phase, model, a, tmp)
            results.append(dict(side=side, phase=phase, model=model, round=i, result=r))
            print(
                f"{phase} {model} {side} round {i}: {r['process_s']:.0f} s, "
                f"{json.dumps({k: round(v, 4) for k, v in times(phase, side, r).items()})}",
                flush=True)
  summary = summarize(results, a)
  text = markdown(summary, a)
  print(f"\n{report(summary, a)}")
  record = dict(started=started, cpu_model=cpu_model(), cpu_count=os.cpu_count(),
                load_average_end=list(os.getloadavg()), args=vars(a), runs=results, summary=summary,
                markdown=text)
  if a.json_out:
    with open(a.json_out, "w") as f:
      json.dump(record, f, indent=2)
    print(f"\nwrote {a.json_out}")
  return record


if __name__ == "__main__":
  sys.path.insert(0, HERE)
  from instruct import cli  # One-line errors, exit status 1 (`--debug` for the traceback).
  cli.run_plain(main)
