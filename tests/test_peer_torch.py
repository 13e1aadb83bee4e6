"""benchmarks/peer_torch.py (the PyTorch / HF / TRL peer) run as a script at a tiny GPT-2 shape.

The four phases run once each, as concurrent subprocesses with one torch thread each (module
fixture); the tests check the JSON each one writes.
"""

import json
import math
import os
import statistics
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "peer_torch.py")
CONFIG = {"n_layer": 2, "n_embd": 64, "n_head": 2, "vocab_size": 512, "n_positions": 64}
# GPT-2 parameters: V d + P d (embeddings) + L (12 d^2 + 13 d) (blocks) + 2 d (final norm).
PARAMS = 512 * 64 + 64 * 64 + 2 * (12 * 64 ** 2 + 13 * 64) + 2 * 64
FLAGS = {
    "peak": dict(peak_size=128, peak_reps=2), "sft": dict(batch=2, length=16, warmup=1, steps=2),
    "rollout": dict(batch=4, prompt_length=8, new_tokens=4, reps=2),
    "ppo": dict(batch=4, prompt_length=8, new_tokens=4, iterations=2, epochs=1, num_minibatches=2)
}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
  tmp = tmp_path_factory.mktemp("peer_torch")
  config = tmp / "gpt2.json"
  config.write_text(json.dumps(CONFIG))
  procs = {}
  for phase, flags in FLAGS.items():
    argv = [
        f"--phase={phase}", f"--hf_config={config}", f"--json_out={tmp / phase}.json",
        "--threads=1", *(f"--{k}={v}" for k, v in flags.items())
    ]
    procs[phase] = subprocess.Popen([sys.executable, SCRIPT, *argv], cwd=ROOT, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  out = {}
  for phase, proc in procs.items():
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, f"{phase} failed:\n{log[-3000:]}"
    assert log.strip().splitlines()[-1].startswith(f"{phase}: "), log[-2000:]
    out[phase] = json.loads((tmp / f"{phase}.json").read_text())
  return out


def positive(x) -> bool:
  return isinstance(x, float) and math.isfinite(x) and x > 0


def check_summary(s: dict, n: int) -> None:
  assert len(s["all"]) == n and all(positive(t) for t in s["all"]), s
  assert s["min"] <= s["median"] <= s["max"] and s["median"] == statistics.median(s["all"]), s


@pytest.mark.parametrize("phase", list(FLAGS))
def test_common_record(results, phase):
  r = results[phase]
  assert r["phase"] == phase and r["device"] == "cpu" and r["dtype"] == "float32"
  assert r["num_threads"] == 1 and positive(r["peak_rss_gib"]) and r["peak_rss_gib"] < 16
  assert all(r[f"{lib}_version"] for lib in ("torch", "transformers", "trl"))
  if phase != "peak":
    assert r["params"] == PARAMS and r["attn_implementation"]


def test_peak(results):
  r, n = results["peak"], FLAGS["peak"]["peak_size"]
  check_summary(r["matmul_s"], 2)
  check_summary(r["add_s"], 2)
  assert r["peak_gflops"] == pytest.approx(2 * n ** 3 / r["matmul_s"]["median"] / 1e9)
  assert r["bandwidth_bytes"] == 2 * 256 * 2 ** 20
  assert r["bandwidth_gbs"] == pytest.approx(r["bandwidth_bytes"] / r["add_s"]["median"] / 1e9)


def test_sft(results):
  r, f = results["sft"], FLAGS["sft"]
  check_summary(r["step_s"], f["steps"])
  assert r["tokens_per_s"] == pytest.approx(f["batch"] * f["length"] / r["step_s"]["median"])
  # Random initialisation (std 0.02): logits near 0, so the token-mean cross-entropy is ~ln V.
  assert len(r["losses"]) == f["steps"]
  assert all(abs(loss - math.log(CONFIG["vocab_size"])) < 0.1 for loss in r["losses"]), r
  assert r["optimizer"]["class"] == "AdamW" and r["optimizer"]["implementation"] in ("fused",
                                                                                     "foreach",
                                                                                     "for-loop")


def test_rollout(results):
  r, f = results["rollout"], FLAGS["rollout"]
  check_summary(r["call_s"], f["reps"])
  check_summary(r["one_token_call_s"], f["reps"])
  assert r["generated_length"] == f["new_tokens"]
  call_s, one_s = r["call_s"]["median"], r["one_token_call_s"]["median"]
  assert r["generated_tokens_per_s"] == pytest.approx(f["batch"] * f["new_tokens"] / call_s)
  assert r["decode_s_per_step"] == pytest.approx((call_s - one_s) / (f["new_tokens"] - 1))
  assert r["prefill_s"] + r["decode_s_per_step"] == pytest.approx(one_s)


def test_ppo(results):
  r, f = results["ppo"], FLAGS["ppo"]
  assert len(r["iterations"]) == f["iterations"]
  assert r["generated_length"] == f["new_tokens"] and r["response_pad_tokens"] == 0
  assert r["optimizer_steps"] == f["iterations"] * f["epochs"] * f["num_minibatches"]
  # Policy, reference; value and reward models: the same backbone + a bias-free [d, 1] score.
  assert r["params_all_models"] == 2 * PARAMS + 2 * (PARAMS + 64)
  for it in r["iterations"]:
    phases = [it[k] for k in ("rollout_s", "scoring_s", "update_s")]
    assert all(positive(p) for p in phases + [it["iteration_s"]]), it
    assert sum(phases) <= it["iteration_s"] and it["other_s"] >= 0, it
    assert it["ref_forward_s"] + it["value_forward_s"] + it["reward_forward_s"] <= it["scoring_s"]
    assert all(positive(it[k]) for k in ("ref_forward_s", "value_forward_s", "reward_forward_s"))
  assert r["iteration_s"] == r["iterations"][1]["iteration_s"]  # the median of one timed one


def test_missing_config_is_a_usage_error():
  proc = subprocess.run([sys.executable, SCRIPT, "--phase=ppo", "--json_out=/dev/null"], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2 and "--hf_config is required for --phase=ppo" in proc.stderr
