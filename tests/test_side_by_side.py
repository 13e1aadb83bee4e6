"""benchmarks/side_by_side.py: both sides run every phase at the same shapes; its FLOP and
byte counts against hand values."""

import argparse
import math
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import side_by_side as sbs  # noqa: E402

SHAPES = dict(sft_batch=2, sft_length=16, batch=4, prompt_length=8, new_tokens=4, epochs=2,
              num_minibatches=2)


def _args(**kw):
  return argparse.Namespace(**dict(SHAPES, **kw))


def test_flops_and_bytes_of_the_tiny_preset_by_hand():
  cfg = sbs.arch("tiny")  # vocab 512, d 64, 2 layers, 4 heads x 16, d_ff 256, 256 positions.
  per_layer = 2 * 64 + 3 * (64 * 64 + 64) + (64 * 64 + 64) + 2 * 64 + (64 * 256 + 256) + (256 * 64
                                                                                          + 64)
  n_lm = 512 * 64 + 2 * per_layer + 2 * 64  # Without the position table.
  assert sbs.matmul_params(cfg) == n_lm
  assert sbs.matmul_params(cfg, "scalar") == n_lm - 512 * 64
  a = _args()
  s = 8 + 4
  attention = lambda length, tokens: 4 * 2 * 4 * 16 * length * tokens
  flops = sbs.phase_flops(cfg, a)
  assert flops["sft"] == 3 * (2 * n_lm * 32 + attention(16, 32))
  lm = 2 * n_lm * 4 * s + attention(s, 4 * s)
  scalar = 2 * (n_lm - 512 * 64) * 4 * s + attention(s, 4 * s)
  assert flops["scoring"] == 2 * lm + 2 * scalar
  assert flops["update"] == 2 * 3 * (lm + scalar)
  decode = sum(2 * n_lm * 4 + 4 * 2 * 4 * 16 * (8 + i) * 4 for i in range(4))
  assert flops["rollout"] == 2 * n_lm * 32 + attention(8, 32) + decode
  weights = (n_lm + 256 * 64) * 4
  cache = 2 * 2 * 4 * 4 * 16 * 4
  assert sbs.decode_bytes(cfg, a, 4) == sum(weights + cache * (8 + i) for i in range(4))


@pytest.fixture(scope="module")
def record(tmp_path_factory):
  out = tmp_path_factory.mktemp("sbs") / "sbs.json"
  argv = [
      "--models=tiny", "--rounds=1", "--sft_steps=2", "--rollout_reps=2", "--ppo_iterations=2",
      "--threads=1", f"--json_out={out}"
  ]
  argv += [f"--{k}={v}" for k, v in SHAPES.items()]
  return sbs.main(argv)


def test_every_phase_runs_on_both_sides_alternating(record):
  order = [(r["phase"], r["side"]) for r in record["runs"]]
  assert order == [("peak", "instruct"), ("peak", "peer")] + [
      (phase, side) for phase in ("sft", "rollout", "ppo") for side in ("instruct", "peer")
  ]
  peer_ppo = next(
      r["result"] for r in record["runs"] if r["phase"] == "ppo" and r["side"] == "peer")
  assert peer_ppo["generated_length"] == 4 and peer_ppo["optimizer_steps"] == 2 * 2 * 2
  ours = next(
      r["result"] for r in record["runs"] if r["phase"] == "ppo" and r["side"] == "instruct")
  assert ours["recompiled"] is False
  assert ours["params"] == peer_ppo["params"]  # One architecture on both sides.


def test_the_summary_has_ratios_memory_and_fractions_of_the_peaks(record):
  rows = record["summary"]["models"]["tiny"]
  timed = {(r["phase"], r["unit"]): r for r in rows if "ratio" in r}
  assert set(timed) == {("sft", "step"), ("rollout", "rollout call"), ("rollout", "decode step"),
                        ("rollout", "prefill"), ("ppo", "iteration"), ("ppo", "rollout"),
                        ("ppo", "scoring"), ("ppo", "update")}
  for row in timed.values():  # Decode step and prefill are differences of two timings.
    assert row["instruct"] > 0 and row["peer"] > 0 or row["unit"] in ("prefill", "decode step")
    assert math.isclose(row["ratio"], row["peer"] / row["instruct"])
  for key in [("sft", "step"), ("ppo", "update"), ("rollout", "rollout call")]:
    for side in ("instruct", "peer"):
      assert 0 < timed[key][f"{side}_peak_fraction"] < 2
  assert 0 < timed[("rollout", "rollout call")]["instruct_bandwidth_fraction"] < 2
  memory = [r for r in rows if r["unit"] == "peak RSS GiB"]
  assert len(memory) == 6 and all(0.05 < list(r.values())[-1] < 8 for r in memory)
  assert "| ppo | update |" in record["markdown"]
  assert os.path.exists(record["args"]["json_out"])


@pytest.mark.parametrize("argv, key", [(["--models=nope"], "--models"),
                                       (["--batch=15", "--num_minibatches=2"], "--batch=15"),
                                       (["--ppo_iterations=1"], "--ppo_iterations")])
def test_bad_flags_are_one_line_naming_the_flag(argv, key):
  with pytest.raises(ValueError, match=key):
    sbs.parse_args(argv)


def test_a_saved_run_prints_again_with_the_spread_over_rounds(record, tmp_path):
  import json
  path = record["args"]["json_out"]
  assert sbs.render_saved(path)["summary"] == json.loads(json.dumps(record["summary"]))
  # A second round of the SFT phase with instruct twice as slow: medians, (min-max) and the
  # ratio of each round's pair.
  saved = json.load(open(path))
  slower = []
  for r in saved["runs"]:
    if r["phase"] == "sft":
      result = dict(r["result"])
      if r["side"] == "instruct":
        result["step_s"] = 2 * result["step_s"]
      slower.append(dict(r, round=1, result=result))
  saved["runs"] += slower
  two = tmp_path / "two_rounds.json"
  two.write_text(json.dumps(saved))
  summary = sbs.render_saved(str(two))["summary"]
  row = next(r for r in summary["models"]["tiny"] if r["unit"] == "step")
  sft = {r["side"]: r["result"]["step_s"] for r in saved["runs"][::-1] if r["phase"] == "sft"}
  ours, peer = sft["instruct"], sft["peer"]["median"]  # Round 0's (the list reversed).
  assert math.isclose(row["instruct"], 1.5 * ours)
  assert row["ratio_all"] == [peer / ours, peer / (2 * ours)]
  line = next(x for x in sbs.markdown(summary, argparse.Namespace(**saved["args"])).splitlines()
              if x.startswith("| sft | step |"))
  assert f"({peer / (2 * ours):.2f}-{peer / ours:.2f}x)" in line
  assert f"({ours:.4g}-{2 * ours:.4g})" in line
  (tmp_path / "broken.json").write_text("{")
  with pytest.raises(ValueError, match="--from_json=.*broken.json: not a record"):
    sbs.render_saved(str(tmp_path / "broken.json"))
