r"""Memory per device of the accelerator presets: training state (exact) and activations
(an estimate). Analytic: nothing is allocated on any device, so it runs on a laptop.

Run (from the repository root; seconds):

  python benchmarks/memory.py --devices=8,64 --json_out=/tmp/memory.json

With `--compile_devices=8` it also compiles each stage's real train step for 8 fake CPU
devices and reports XLA's buffer assignment (about 15 s per preset and stage on a 2-core CPU;
nothing is allocated: the step is lowered on abstract state and batch).

For each preset and stage (`configs/{sft,rm,pretrain}.py:PRESET`, the config as shipped) and
each device count:

- **Mesh**: the config's `mesh.shape` resolved for that many devices
  (`sharding.resolve_mesh_shape`; the accelerator presets use `(1, -1, 1)`, FSDP over all
  devices), as a `jax.sharding.AbstractMesh`, so any device count works without devices.
- **Parameters and optimiser state (exact)**: `state.state_factory` (the library's own, as
  `trainer.build` calls it) on the stage's model (`Transformer(head='lm')`, or `'scalar'` for
  the reward model) and `optim.make_optimizer(config.optimizer)` (global-norm clipping +
  AdamW: float32 first and second moments, two int32 step counts), traced with `jax.eval_shape`.
  Bytes per device = the sum over leaves of the shard shape
  (`NamedSharding.shard_shape`) times the item size. Parameters are float32 (compute is bf16).
- **Gradients (assumed)**: one float32 copy of the parameters with the parameters' sharding
  (the jitted step returns sharded state; GSPMD keeps gradients in the layout the sharded
  optimiser update consumes); two copies with `grad_accum_steps` > 1 (the accumulator and
  one microbatch's gradients).
- **Activations (estimate)** for one microbatch: rows per device R = global_batch_size /
  grad_accum_steps / data-parallel size (x `rm.max_responses` for the reward model, whose K
  responses are K rows), T = the longest `data.buckets` entry, c = 2 bytes (bf16). Per layer,
  what the backward pass needs from the forward pass, over R*T tokens:
  two norm outputs (2d), q, k, v ((H + 2 KV) * head_dim), the attention output (H * head_dim),
  the o_proj and down_proj outputs (2d), the MLP hidden states (2 x d_ff for GELU: pre- and
  post-activation; 4 x d_ff for SwiGLU), all in c bytes, plus the attention scores (float32)
  and probabilities (c bytes), R * H * T^2 * (4 + c): the model computes full T x T attention
  (no flash attention). With `remat='full'` (all accelerator presets: each scanned layer is
  recomputed in the backward pass) only each layer's input, R*T*d*c, is kept for all L
  layers, and one layer's intermediates are live at a time, counted twice (the recomputed
  values and their cotangents). `remat='dots'` also keeps the projection outputs of every
  layer; `'none'` keeps everything for every layer. Outside the layers: the embedding and
  final-norm outputs (2 R*T*d*c) and, for the LM head, the logits R*T*V in bf16 plus three
  float32 copies (the float32 logits, the loss's float32 temporaries, their cotangent); the
  scalar head's outputs are negligible.
  Not counted: XLA's temporary buffers and fusion choices, memory fragmentation, the compiled
  program, the input pipeline, communication buffers (FSDP all-gathers one layer's weights
  at a time), and the runtime's reserve (e.g. 25% of GPU memory is not preallocated unless
  XLA_PYTHON_CLIENT_MEM_FRACTION is raised). Treat totals within ~20% of a device's memory as
  not fitting.
- **XLA, compiled for CPU (`--compile_devices=N`, a cross-check)**: `trainer.build` with N
  fake CPU devices (the config's mesh for N), the jitted train step lowered on the abstract
  state and an abstract int32 batch of the config's shape (global batch x longest bucket, x K
  for the reward model) and compiled; `memory_analysis()` gives the per-device argument bytes
  (state and batch; the new state's outputs alias them, as the state is donated) and
  temporary bytes (gradients, activations, gathered weights, XLA's temporaries), and their
  sum is the peak XLA planned for. This is the CPU backend's plan: the GPU and TPU backends
  fuse and schedule differently, so it is an indication, not the accelerator's figure.
- **PPO (state only)**: the PPO stage holds a policy (trained: parameters, AdamW, gradients),
  a critic initialised from the reward model (trained, scalar head), the frozen reference
  policy and the frozen reward model (parameters only): the sum of those, from the same
  traces, with the FSDP mesh `(1, -1, 1)` (pass `--config.mesh.shape='(1,-1,1)'` to
  configs/ppo.py, whose default mesh is data parallel). Its activations depend on the rollout
  settings and are not estimated; the KV cache of a rollout is
  2 * L * rows * (prompt + new tokens) * KV * head_dim * c.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import json
import math
import os
import platform
import sys


def _fake_cpu_devices(argv) -> int:
  """`--compile_devices=N` needs N host devices, which must be requested before jax loads."""
  p = argparse.ArgumentParser(add_help=False)
  p.add_argument("--compile_devices", type=int, default=0)
  n = p.parse_known_args(argv)[0].compile_devices
  if n > 1 and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={n}").strip()
  return n


if __name__ == "__main__":
  _fake_cpu_devices(sys.argv[1:])

import flax.linen as nn  # noqa: E402  (after XLA_FLAGS)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import AbstractMesh, AxisType  # noqa: E402

from machine import cpu_model  # noqa: E402  benchmarks/machine.py (the script's directory)

from instruct import config_lib  # noqa: E402
from instruct import optim  # noqa: E402
from instruct import sharding as shd  # noqa: E402
from instruct import state as state_lib  # noqa: E402
from instruct import trainer  # noqa: E402
from instruct.model import ModelConfig, Transformer  # noqa: E402
from instruct.model.config import count_params  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("sft", "rm", "pretrain")
GIB = 2 ** 30


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--presets", default=",".join(config_lib.ACCELERATOR_PRESETS),
                 help="Comma-separated accelerator presets (config_lib.ACCELERATOR_PRESETS).")
  p.add_argument("--stages", default=",".join(STAGES), help="Comma-separated: sft, rm, pretrain.")
  p.add_argument("--devices", default="8,64", help="Comma-separated device counts.")
  p.add_argument("--grad_accum", type=int, default=0,
                 help="Override config.train.grad_accum_steps (0: the config's).")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="Override a config field (a Python literal) in every stage whose config "
                      "has it, as --config.KEY=VALUE would; e.g. rm.max_responses=2. Repeatable.")
  p.add_argument("--compile_devices", type=int, default=0,
                 help="Also compile each train step for this many fake CPU devices and report "
                      "XLA's buffer assignment (0: off).")
  p.add_argument("--json_out", default="", help="Write every number as JSON to this path.")
  return p.parse_args(argv)


def load_config(stage: str, preset: str, grad_accum: int = 0, overrides=()):
  """configs/{stage}.py:{preset} with `grad_accum_steps` and 'a.b=value' overrides applied
  (an override naming a field this stage's config lacks is skipped)."""
  config = config_lib.load_config_file(os.path.join(ROOT, "configs", f"{stage}.py"), preset)
  if grad_accum:
    config.train.grad_accum_steps = grad_accum
  for override in overrides:
    key, _, text = override.partition("=")
    *parents, leaf = key.split(".")
    node = config
    for name in parents:
      node = node.get(name) if hasattr(node, "get") else None
    if node is None or leaf not in node:
      continue
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    node[leaf] = value
  return config


def abstract_mesh(mesh_config, num_devices: int) -> AbstractMesh:
  shape = shd.resolve_mesh_shape(mesh_config.shape, num_devices)
  names = tuple(mesh_config.axis_names)
  return AbstractMesh(shape, names, axis_types=(AxisType.Auto,) * len(names))


def sharded_bytes(tree) -> int:
  """Bytes on one device of a tree of ShapeDtypeStructs carrying NamedShardings (every device
  holds one shard of every leaf; with even division all shards are the same size)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shard = leaf.sharding.shard_shape(leaf.shape)
    total += math.prod(shard) * leaf.dtype.itemsize
  return total


def state_bytes(config, head: str, num_devices: int) -> dict[str, int]:
  """Parameters, optimiser state and gradients per device under the config's mesh."""
  cfg = ModelConfig.from_dict(config.model)
  mesh = abstract_mesh(config.mesh, num_devices)
  rules = shd.rules_from_config(config.mesh)
  optimizer = optim.make_optimizer(config.optimizer, config.train.num_steps)
  factory = state_lib.state_factory(trainer.init_params_fn(Transformer(cfg, head)), optimizer,
                                    mesh, rules)
  params = sharded_bytes(factory.abstract.params)
  return dict(params=params, opt_state=sharded_bytes(factory.abstract.opt_state),
              grads=params, data_parallel=shd.data_parallel_size(mesh, rules),
              mesh=tuple(mesh.axis_sizes))


def layer_bytes(cfg: ModelConfig, rows: int, length: int, c: int) -> int:
  """What one layer's forward keeps for its backward, for `rows` sequences of `length`."""
  d, f = cfg.d_model, cfg.d_ff
  q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  hidden = (4 if cfg.mlp == "swiglu" else 2) * f
  per_token = 2 * d + (q + 2 * kv) + q + 2 * d + hidden
  attention = rows * cfg.num_heads * length * length * (4 + c)
  return rows * length * per_token * c + attention


def activation_bytes(cfg: ModelConfig, head: str, rows: int, length: int) -> int:
  """The activation estimate described in the module docstring."""
  c = 2 if cfg.dtype == "bfloat16" else 4
  tokens = rows * length
  layer = layer_bytes(cfg, rows, length, c)
  d, q, kv = cfg.d_model, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  if cfg.remat == "full":
    kept = cfg.num_layers * tokens * d * c + 2 * layer
  elif cfg.remat == "dots":
    matmul_outputs = (q + 2 * kv) + 2 * d + (2 if cfg.mlp == "swiglu" else 1) * cfg.d_ff
    kept = cfg.num_layers * tokens * (d + matmul_outputs) * c + 2 * layer
  else:
    kept = cfg.num_layers * (layer + tokens * d * c) + layer
  outside = 2 * tokens * d * c
  if head == "lm":
    outside += tokens * cfg.vocab_size * (c + 3 * 4)
  return kept + outside


def measure(preset: str, stage: str, num_devices: int, grad_accum: int = 0,
            overrides=()) -> dict:
  config = load_config(stage, preset, grad_accum, overrides)
  head = "scalar" if stage == "rm" else "lm"
  cfg = ModelConfig.from_dict(config.model)
  sizes = state_bytes(config, head, num_devices)
  t = config.train
  micro = t.global_batch_size // t.grad_accum_steps
  config_lib.validate(config, sizes["data_parallel"], process_count=1)
  per_device = micro // sizes["data_parallel"]
  rows = per_device * (config.rm.max_responses if stage == "rm" else 1)
  length = max(config.data.buckets)
  activations = activation_bytes(cfg, head, rows, length)
  if t.grad_accum_steps > 1:
    sizes["grads"] *= 2  # The accumulator and one microbatch's gradients.
  state = sizes["params"] + sizes["opt_state"] + sizes["grads"]
  return dict(preset=preset, stage=stage, devices=num_devices, mesh=sizes["mesh"],
              num_params=count_params(cfg, head), global_batch=t.global_batch_size,
              grad_accum_steps=t.grad_accum_steps, rows_per_device=rows, length=length,
              remat=cfg.remat, params=sizes["params"], opt_state=sizes["opt_state"],
              grads=sizes["grads"], state=state, activations=activations,
              total=state + activations)


def compiled_bytes(preset: str, stage: str, devices, grad_accum: int = 0,
                   overrides=()) -> dict:
  """XLA's per-device buffer assignment for the stage's train step on `devices` (CPU)."""
  config = load_config(stage, preset, grad_accum, overrides)
  built = trainer.build(config, None, devices)
  batch, length = config.train.global_batch_size, max(config.data.buckets)
  shape = (batch, config.rm.max_responses, length) if stage == "rm" else (batch, length)
  spec = lambda s: jax.ShapeDtypeStruct(s, jnp.int32, sharding=built.batch_sharding)
  batch = {"tokens": spec(shape), "attention_mask": spec(shape)}
  if stage == "rm":
    batch.update(ranks=spec(shape[:2]), response_mask=spec(shape[:2]))
  else:
    batch["loss_mask"] = spec(shape)
  with jax.set_mesh(built.mesh), nn.logical_axis_rules(built.rules):
    lowered = built.train_step.lower(built.factory.abstract, batch, jax.random.key(0))
    stats = lowered.compile().memory_analysis()
  return dict(arguments=stats.argument_size_in_bytes, temp=stats.temp_size_in_bytes,
              total=stats.argument_size_in_bytes + stats.temp_size_in_bytes)


def ppo_state(preset: str, num_devices: int) -> dict:
  """Policy + critic (trained) and reference + reward model (frozen), FSDP mesh (1, -1, 1)."""
  out = {}
  for stage, head in (("sft", "lm"), ("rm", "scalar")):
    config = load_config(stage, preset)
    config.mesh.shape = (1, -1, 1)
    ppo = config_lib.load_config_file(os.path.join(ROOT, "configs", "ppo.py"), "tiny")
    config.optimizer = ppo.optimizer if head == "lm" else ppo.value_optimizer
    out[head] = state_bytes(config, head, num_devices)
  trained = sum(out[h]["params"] + out[h]["opt_state"] + out[h]["grads"] for h in out)
  frozen = out["lm"]["params"] + out["scalar"]["params"]
  return dict(preset=preset, devices=num_devices, trained=trained, frozen=frozen,
              total=trained + frozen)


def gib(n: int) -> str:
  return f"{n / GIB:.2f}"


def main(argv=None) -> None:
  args = parse_args(argv)
  presets = [p for p in args.presets.split(",") if p]
  stages = [s for s in args.stages.split(",") if s]
  devices = [int(n) for n in args.devices.split(",") if n]
  cpu_devices = []
  if args.compile_devices:
    cpu_devices = jax.devices("cpu")[:args.compile_devices]
    if len(cpu_devices) < args.compile_devices:
      raise SystemExit(f"--compile_devices={args.compile_devices}: only {len(cpu_devices)} "
                       "CPU devices (set XLA_FLAGS=--xla_force_host_platform_device_count).")
  rows, ppo = [], []
  for preset in presets:
    for num_devices in devices:
      for stage in stages:
        row = measure(preset, stage, num_devices, args.grad_accum, args.set)
        if num_devices == args.compile_devices:
          row["xla_cpu"] = compiled_bytes(preset, stage, cpu_devices, args.grad_accum,
                                          args.set)
        rows.append(row)
      ppo.append(ppo_state(preset, num_devices))

  print(f"Memory per device in GiB (2^30 bytes); analytic, {datetime.date.today()}, "
        f"jax {jax.__version__}. State is exact; activations are an estimate (see the "
        "docstring)." + (f" Overrides: {', '.join(args.set)}." if args.set else "")
        + (f" XLA CPU plan: the train step compiled for {args.compile_devices} fake CPU "
           "devices (arguments + temporaries)." if args.compile_devices else "") + "\n")
  print("| preset | params | stage | devices | mesh | rows x T per device (accum) | params "
        "| AdamW | grads | state | activations (est.) | total | XLA CPU plan |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    xla = gib(r["xla_cpu"]["total"]) if "xla_cpu" in r else "-"
    print(f"| {r['preset']} | {r['num_params'] / 1e9:.3f}B | {r['stage']} | {r['devices']} "
          f"| {r['mesh']} | {r['rows_per_device']} x {r['length']} ({r['grad_accum_steps']}) "
          f"| {gib(r['params'])} | {gib(r['opt_state'])} | {gib(r['grads'])} "
          f"| {gib(r['state'])} | {gib(r['activations'])} | **{gib(r['total'])}** | {xla} |")
  print("\nSummary, total per device (state + estimated activations), GiB"
        + (f"; in brackets the XLA CPU plan at {args.compile_devices} devices"
           if args.compile_devices else "") + ":\n")
  stage_devices = [(s, n) for n in devices for s in stages]
  print("| preset | " + " | ".join(f"{s} @{n}" for s, n in stage_devices) + " | "
        + " | ".join(f"PPO state @{n}" for n in devices) + " |")
  print("|---|" + "---|" * (len(stage_devices) + len(devices)))
  for preset in presets:
    cells = [gib(r["total"]) + (f" ({gib(r['xla_cpu']['total'])})" if "xla_cpu" in r else "")
             for s, n in stage_devices for r in rows
             if (r["preset"], r["stage"], r["devices"]) == (preset, s, n)]
    cells += [gib(r["total"]) for n in devices for r in ppo
              if (r["preset"], r["devices"]) == (preset, n)]
    print(f"| {preset} | " + " | ".join(cells) + " |")
  print("\nPPO state (policy and critic trained, reference and reward model frozen; FSDP "
        "mesh (1, -1, 1); activations and KV cache not included):\n")
  print("| preset | devices | trained (policy + critic) | frozen (reference + RM) | total |")
  print("|---|---|---|---|---|")
  for r in ppo:
    print(f"| {r['preset']} | {r['devices']} | {gib(r['trained'])} | {gib(r['frozen'])} "
          f"| **{gib(r['total'])}** |")
  if args.json_out:
    with open(args.json_out, "w") as f:
      json.dump(dict(rows=rows, ppo=ppo, overrides=args.set, jax=jax.__version__,
                     date=str(datetime.date.today()),
                     machine=dict(cpu=cpu_model(), platform=platform.platform())), f,
                indent=1, default=list)


if __name__ == "__main__":
  main()
