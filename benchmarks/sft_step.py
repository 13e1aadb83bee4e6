r"""Benchmark of the SFT training step: compile time, step time, tokens/s, FLOP/s and MFU.

Run (from the repository root; about 3.5 minutes on a shared 2-core CPU machine):

  python benchmarks/sft_step.py --presets=tiny,small_100m --json_out=/tmp/sft_step.json

The step is the library's own: `sft.make_train_step` (forward + backward + AdamW from
`optim.make_optimizer`) built and jitted by `trainer.build` (the state's in/out shardings, the
batch sharding, the state donated) under the config's mesh and logical axis rules, exactly as
`trainer.train_and_evaluate` does; the state is created sharded by `state.state_factory`.
Batches are synthetic: uniform random tokens, `attention_mask` all ones, `loss_mask` 1 on the
second half of each row.

FLOPs per step (the usual "model FLOPs" estimate, no rematerialisation counted):

  6 * N * tokens + 12 * L * (num_heads * head_dim) * T * tokens,  tokens = B * T,

where N counts every parameter taking part in the matmuls: all parameters except the learned
position table (the token embedding counts, as the tied LM head multiplies by it; biases and
norm scales are included: 1.3% of N for `tiny`, 0.14% for `small_100m`). The attention term
counts the full T x T score and value matmuls (the model computes all of them and then masks),
forward and backward.

MFU = achieved FLOP/s / peak FLOP/s, where the peak is measured in the same run: 2 n^3 FLOPs
over the median time of `--peak_reps` jitted float32 [n, n] @ [n, n] matmuls. It is measured
before every preset and after the last one, and the highest of these measurements is the
denominator for every preset: on a shared machine a single measurement taken while another
job was running can fall below the step's own rate (an MFU over 100%); the run's best matmul
rate keeps MFU conservative. Each timed step is followed by `jax.block_until_ready`; the step
time is the median over `--steps` steps after `--warmup` untimed ones.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from machine import cpu_model, run_record  # benchmarks/machine.py (the script directory)

from instruct import config_lib
from instruct import sharding as shd
from instruct import trainer
from instruct.model import ModelConfig
from instruct.model.config import count_params

# Per preset: (batch, length, timed steps) used when the flags are left at 0.
DEFAULTS = {"tiny": (16, 128, 20), "small_100m": (4, 256, 5)}
FALLBACK_DEFAULTS = (4, 128, 5)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--presets", default="tiny,small_100m",
                 help="Comma-separated model presets of instruct.model.config.PRESETS.")
  p.add_argument("--batch", type=int, default=0, help="Sequences per step; 0: per preset.")
  p.add_argument("--length", type=int, default=0, help="Tokens per sequence; 0: per preset.")
  p.add_argument("--steps", type=int, default=0, help="Timed steps; 0: per preset.")
  p.add_argument("--warmup", type=int, default=2, help="Untimed steps after compilation.")
  p.add_argument("--peak_size", type=int, default=2048, help="n of the n^3 peak matmul.")
  p.add_argument("--peak_reps", type=int, default=10, help="Timed peak matmuls per round.")
  p.add_argument("--json_out", default="", help="Write the results as JSON to this path.")
  return p.parse_args(argv)


def measure_peak_flops(n: int, reps: int) -> float:
  """Median FLOP/s of a jitted float32 [n, n] @ [n, n] matmul on the default device."""
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (n, n), jnp.float32)
  b = jax.random.normal(kb, (n, n), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  jax.block_until_ready(matmul(a, b))
  jax.block_until_ready(matmul(a, b))
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(matmul(a, b))
    times.append(time.perf_counter() - start)
  return 2.0 * n ** 3 / statistics.median(times)


def matmul_params(cfg: ModelConfig) -> int:
  """N of the FLOP estimate: all parameters but the learned position table."""
  n = count_params(cfg, head="lm")
  if cfg.position == "learned":
    n -= cfg.max_length * cfg.d_model
  return n


def flops_per_step(cfg: ModelConfig, batch: int, length: int) -> float:
  tokens = batch * length
  attention = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * length * tokens
  return 6.0 * matmul_params(cfg) * tokens + attention


def make_config(preset: str, batch: int, length: int):
  """The supervised config of `preset` (base optimiser and mesh), sized to the batch."""
  config = config_lib.base_config()
  config.stage = "sft"
  config.model = config_lib.model_config(preset)
  config.train.global_batch_size = batch
  config.data.buckets = (length,)
  return config


def synthetic_batch(vocab_size: int, batch: int, length: int, seed: int = 0) -> dict:
  """Random tokens; loss on the second half of each row; no padding."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab_size, (batch, length), dtype=np.int32)
  loss_mask = np.zeros((batch, length), np.int32)
  loss_mask[:, length // 2:] = 1
  return {
      "tokens": tokens, "loss_mask": loss_mask, "attention_mask": np.ones((batch, length), np.int32)
  }


def build(config, num_steps: int):
  """(compiled step, state, global batch, compile seconds) as the trainer builds them."""
  built = trainer.build(config, None)
  with jax.set_mesh(built.mesh):
    state = built.factory.init(jax.random.key(config.seed))
  with jax.set_mesh(built.mesh), nn.logical_axis_rules(built.rules):
    batch = shd.host_batch_to_global(
        synthetic_batch(config.model.vocab_size, config.train.global_batch_size,
                        max(config.data.buckets)), built.batch_sharding)
    train_step = built.train_step
    rng = jax.random.key(config.seed)
    start = time.perf_counter()
    compiled = train_step.lower(state, batch, rng).compile()
    compile_s = time.perf_counter() - start
  return compiled, state, batch, compile_s


def bench_preset(preset: str, args: argparse.Namespace) -> dict:
  """Builds, warms up and times the SFT step of one preset."""
  batch, length, steps = DEFAULTS.get(preset, FALLBACK_DEFAULTS)
  batch, length, steps = args.batch or batch, args.length or length, args.steps or steps
  return dict(bench_config(make_config(preset, batch, length), steps, args.warmup), preset=preset)


def bench_config(config, steps: int, warmup: int) -> dict:
  """Builds, warms up (`warmup` steps) and times (`steps` steps) the SFT step of `config`."""
  batch, length = config.train.global_batch_size, max(config.data.buckets)
  cfg = ModelConfig.from_dict(config.model)
  num_steps = warmup + steps
  compiled, state, global_batch, compile_s = build(config, num_steps)
  base_rng = jax.random.key(config.seed)
  rngs = [jax.random.fold_in(base_rng, i) for i in range(num_steps)]
  times, metrics = [], None
  for i in range(num_steps):
    start = time.perf_counter()
    state, metrics = compiled(state, global_batch, rngs[i])
    jax.block_until_ready((state, metrics))
    if i >= warmup:
      times.append(time.perf_counter() - start)
  loss = float(metrics["loss"])
  if not np.isfinite(loss):
    raise FloatingPointError(f"Non-finite loss {loss}.")
  step_s = statistics.median(times)
  flops = flops_per_step(cfg, batch, length)
  return {
      "params": count_params(cfg),
      "matmul_params": matmul_params(cfg),
      "batch": batch,
      "length": length,
      "timed_steps": steps,
      "warmup_steps": warmup,
      "compile_s": compile_s,
      "step_s": step_s,
      "step_s_min": min(times),
      "step_s_max": max(times),
      "tokens_per_s": batch * length / step_s,
      "flops_per_step": flops,
      "achieved_flops": flops / step_s,
      "final_loss": loss,
  }


HEADER = ("| preset | params | N (matmul) | B x T | compile s | step s, median (min-max) "
          "| tokens/s | GFLOP/step | achieved GFLOP/s | peak GFLOP/s | MFU |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|")


def table_row(r: dict) -> str:
  return (f"| {r['preset']} | {r['params'] / 1e6:.2f}M | {r['matmul_params'] / 1e6:.2f}M "
          f"| {r['batch']} x {r['length']} | {r['compile_s']:.1f} | {r['step_s']:.3g} "
          f"({r['step_s_min']:.3g}-{r['step_s_max']:.3g}) "
          f"| {r['tokens_per_s']:,.0f} | {r['flops_per_step'] / 1e9:.1f} "
          f"| {r['achieved_flops'] / 1e9:.1f} | {r['peak_flops'] / 1e9:.1f} | {r['mfu']:.1%} |")


def main(argv=None) -> None:
  args = parse_args(argv)
  presets = [p.strip() for p in args.presets.split(",") if p.strip()]
  devices = jax.devices()
  print(f"jax {jax.__version__}; {len(devices)} x {devices[0].device_kind} "
        f"({devices[0].platform}); host CPU: {cpu_model()}, {os.cpu_count()} cores; "
        f"load average {os.getloadavg()[0]:.2f}")
  peaks = [measure_peak_flops(args.peak_size, args.peak_reps)]
  results = []
  for preset in presets:
    results.append(bench_preset(preset, args))
    peaks.append(measure_peak_flops(args.peak_size, args.peak_reps))
  print(f"peak f32 matmul {args.peak_size}^3, GFLOP/s, before each preset and after the "
        f"last: {', '.join(f'{p / 1e9:.1f}' for p in peaks)}; MFU uses the highest\n")
  print(HEADER)
  for r in results:
    r["peak_flops"] = max(peaks)
    r["mfu"] = r["achieved_flops"] / r["peak_flops"]
    print(table_row(r))
  if args.json_out:
    write_json(args, results, peaks)


def write_json(args: argparse.Namespace, results: list[dict], peaks: list[float]) -> None:
  peak = {
      "matmul_size": args.peak_size, "reps": args.peak_reps, "flops": max(peaks),
      "measurements": peaks
  }
  out = dict(run_record(), peak=peak, results=results)
  with open(args.json_out, "w") as f:
    json.dump(out, f, indent=2)
  print(f"\nwrote {args.json_out}")


if __name__ == "__main__":
  from instruct import cli  # One-line errors (`--debug` for the traceback).
  cli.run_plain(main)
