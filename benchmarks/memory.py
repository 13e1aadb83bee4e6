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
- **PPO** (`configs/ppo.py:fsdp_ptx`, the heavier of its two accelerator presets: `fsdp` is
  the same without the pretraining rows; `--ppo_preset` picks one): the policy's model is
  `configs/sft.py:PRESET`'s and the critic's and reward model's is `configs/rm.py:PRESET`'s
  (with their numerics: bf16, scanned layers, full remat), on the PPO config's mesh
  (`(1, -1, 1)`). `--set` overrides apply to the PPO config and to the two source configs.
  B = train.global_batch_size prompts per iteration, D = data-parallel size, m =
  ppo.num_minibatches, P = data.prompt_length, N = sampling.max_new_tokens, T = P + N, V the
  vocabulary. Rows per device: rollout R = B / D; minibatch (and scoring chunk)
  r = ceil(B / m / D); PPO-ptx r_x = ceil(ptx.batch_size / m / D), 0 when ptx_coef = 0. The
  model constrains the batch axis of its activations to `act_batch` = ('data', 'fsdp'), so
  every minibatch is split over all devices (padded when it has fewer rows than devices).
  - *State (exact)*: as above, for the policy (trained with `config.optimizer`) and the
    separate critic (`config.value_optimizer`; `ppo.shared_value_head` is not supported):
    parameters, AdamW state, one float32 gradient copy each; plus the parameters of the frozen
    reference (the policy's shapes) and reward model (the critic's).
  - *KV cache (exact)*: what the sampler allocates, `KVCache.init(cfg, B, T)`: k and v of
    [L, B, T, KV, head_dim] in the compute dtype, sharded by `CACHE_KV_AXES`, so
    2 * L * R * T * KV * head_dim * c per device (its [B, T] int32 mask is not counted).
  - *Sampling peak*: 2 x the KV cache (each decode step's scan over the layers reads the
    carried cache and writes a new one; XLA's CPU plan of the sampler, float32, on a small
    model, grows by 2.0 cache sizes per cache size) + the prefill's forward peak F(R, P)
    over T keys. F, the peak of a pass without gradients over rows x t tokens, is a layer's
    input and output (2 rows*t*d*c) plus the largest of: the attention scores and
    probabilities rows*H*t*keys*(4 + c), the MLP hidden states (as above), and for the LM
    head the logits rows*t'*V*(c + 4) (bf16 and their float32 copy) of the t' positions the
    head runs on (`Transformer(logits_from=...)`): the prefill's last position only (t' = 1),
    scoring's and the update's N + 1 positions that predict the response.
  - *Scoring peak* (`make_experience_fn`, one program): the policy's and the reference's
    log-probs run in m chunks of r rows (`lax.map`), the critic's values and the reward
    model's scores on all R rows at once. The policy's tempered response logits, R*N*V*4,
    are kept for the entropy metric, plus the larger of a chunk's F(r, T) with two float32
    [r, N, V] temporaries (tempered logits, log-softmax) and the scalar model's F(R, T).
  - *Update activations*: a minibatch step (`make_update_fn`) takes the policy's gradient,
    with the PPO-ptx LM loss in the same gradient, and the critic's gradient in the same
    jitted step, so their activations add (an upper bound: XLA may run the critic's pass
    after the policy's): A_lm(r, T) + A_lm(r_x, ptx.length) + A_scalar(r, T), A being the
    training estimate above (`activation_bytes`), the policy's logits on N + 1 positions.
  - *Total* = state + max(sampling, scoring, update): the sampler, the experience function and
    the update are separate programs run one after the other, and between them only the
    state and the rollout's small [B, T] arrays persist.
  Not counted: as above (including the FSDP all-gathers of the four models' weights), the
  sampler's decode-step transients (one token per row), the input batches and the
  experience arrays.
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
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={n}").strip()
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
from instruct.rl import config as rl_config  # noqa: E402
from instruct.stages import table  # noqa: E402
from instruct.model import ModelConfig, Transformer  # noqa: E402
from instruct.model.config import count_params  # noqa: E402
from instruct.model.transformer import CACHE_KV_AXES, KVCache  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("sft", "rm", "pretrain")
PPO_PRESETS = ("fsdp", "fsdp_ptx")  # configs/ppo.py's accelerator presets.
PPO_PRESET = "fsdp_ptx"  # The heavier: fsdp plus the PPO-ptx pretraining rows in each update.
GIB = 2 ** 30


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--presets", default=",".join(config_lib.ACCELERATOR_PRESETS),
                 help="Comma-separated accelerator presets (config_lib.ACCELERATOR_PRESETS).")
  p.add_argument("--stages", default=",".join(STAGES), help="Comma-separated: sft, rm, pretrain.")
  p.add_argument("--devices", default="8,64", help="Comma-separated device counts.")
  p.add_argument("--grad_accum", type=int, default=0,
                 help="Override config.train.grad_accum_steps (0: the config's).")
  p.add_argument("--ppo_preset", default=PPO_PRESET, choices=PPO_PRESETS,
                 help="The configs/ppo.py preset of the PPO estimate (fsdp_ptx: the heavier).")
  p.add_argument(
      "--set", action="append", default=[], metavar="KEY=VALUE",
      help="Override a config field (a Python literal) in every stage whose config "
      "has it, PPO's included, as --config.KEY=VALUE would; e.g. "
      "rm.max_responses=2. Repeatable.")
  p.add_argument(
      "--compile_devices", type=int, default=0,
      help="Also compile each train step for this many fake CPU devices and report "
      "XLA's buffer assignment (0: off).")
  p.add_argument("--json_out", default="", help="Write every number as JSON to this path.")
  return p.parse_args(argv)


def load_config(stage: str, preset: str, grad_accum: int = 0, overrides=()):
  """configs/{stage}.py:{preset} with `grad_accum_steps` and 'a.b=value' overrides applied
  (an override naming a field this stage's config lacks is skipped)."""
  config = config_lib.load_config_file(os.path.join(ROOT, "configs", f"{stage}.py"), preset)
  if stage == "rm":
    config.rm.random_init = True  # Shapes only: no SFT run to start from.
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
  factory = state_lib.state_factory(state_lib.init_params_fn(Transformer(cfg, head)), optimizer,
                                    mesh, rules)
  params = sharded_bytes(factory.abstract.params)
  return dict(params=params, opt_state=sharded_bytes(factory.abstract.opt_state), grads=params,
              data_parallel=shd.data_parallel_size(mesh, rules), mesh=tuple(mesh.axis_sizes))


def layer_bytes(cfg: ModelConfig, rows: int, length: int, c: int) -> int:
  """What one layer's forward keeps for its backward, for `rows` sequences of `length`."""
  d, f = cfg.d_model, cfg.d_ff
  q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  hidden = (4 if cfg.mlp == "swiglu" else 2) * f
  per_token = 2 * d + (q + 2 * kv) + q + 2 * d + hidden
  attention = rows * cfg.num_heads * length * length * (4 + c)
  return rows * length * per_token * c + attention


def compute_bytes(cfg: ModelConfig) -> int:
  """Bytes per element of activations (and of the KV cache): the model's compute dtype."""
  return jnp.dtype(cfg.dtype).itemsize


def activation_bytes(cfg: ModelConfig, head: str, rows: int, length: int,
                     logit_positions: int = 0) -> int:
  """The activation estimate described in the module docstring; the LM head's logits over
  `logit_positions` positions per row (default: all `length`)."""
  c = compute_bytes(cfg)
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
    outside += rows * (logit_positions or length) * cfg.vocab_size * (c + 3 * 4)
  return kept + outside


def forward_bytes(cfg: ModelConfig, head: str, rows: int, length: int, keys: int = 0,
                  logit_positions: int = 0) -> int:
  """Peak of a forward pass without gradients (sampling, scoring): a layer's input and output
  plus the largest of its attention scores and probabilities (over `keys` positions, default
  `length`), its MLP hidden states and, for the LM head, the bf16 and float32 logits of
  `logit_positions` positions per row (default: all `length`; `Transformer(logits_from=)`)."""
  c = compute_bytes(cfg)
  tokens = rows * length
  attention = rows * cfg.num_heads * length * (keys or length) * (4 + c)
  mlp = tokens * (4 if cfg.mlp == "swiglu" else 2) * cfg.d_ff * c
  logits = rows * (logit_positions or length) * cfg.vocab_size * (c + 4) if head == "lm" else 0
  return 2 * tokens * cfg.d_model * c + max(attention, mlp, logits)


def kv_cache_bytes(cfg: ModelConfig, mesh: AbstractMesh, rules, batch: int, length: int) -> int:
  """Bytes per device of the sampler's cache keys and values (`KVCache.init`, traced) for a
  global batch of `batch` rows, sharded as the sampler constrains them (`CACHE_KV_AXES`)."""
  cache = jax.eval_shape(lambda: KVCache.init(cfg, batch, length))
  sharding = shd.logical_sharding(mesh, rules, CACHE_KV_AXES)
  return sum(
      math.prod(sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in (cache.k, cache.v))


def measure(preset: str, stage: str, num_devices: int, grad_accum: int = 0, overrides=()) -> dict:
  config = load_config(stage, preset, grad_accum, overrides)
  head = table.get(config.stage).head
  cfg = ModelConfig.from_dict(config.model)
  sizes = state_bytes(config, head, num_devices)
  t = config.train
  micro = t.global_batch_size // t.grad_accum_steps
  config_lib.validate(config, sizes["data_parallel"], process_count=1)
  per_device = micro // sizes["data_parallel"]
  rows = per_device * (config.rm.max_responses if head == "scalar" else 1)
  length = max(config.data.buckets)
  activations = activation_bytes(cfg, head, rows, length)
  if t.grad_accum_steps > 1:
    sizes["grads"] *= 2  # The accumulator and one microbatch's gradients.
  state = sizes["params"] + sizes["opt_state"] + sizes["grads"]
  return dict(preset=preset, stage=stage, devices=num_devices, mesh=sizes["mesh"],
              num_params=count_params(cfg, head), global_batch=t.global_batch_size,
              grad_accum_steps=t.grad_accum_steps, rows_per_device=rows, length=length,
              remat=cfg.remat, params=sizes["params"], opt_state=sizes["opt_state"],
              grads=sizes["grads"], state=state, activations=activations, total=state + activations)


def compiled_bytes(preset: str, stage: str, devices, grad_accum: int = 0, overrides=()) -> dict:
  """XLA's per-device buffer assignment for the stage's train step on `devices` (CPU)."""
  config = load_config(stage, preset, grad_accum, overrides)
  built = trainer.build(config, None, devices)
  ranked = table.get(config.stage).head == "scalar"  # K responses per prompt.
  batch, length = config.train.global_batch_size, max(config.data.buckets)
  shape = (batch, config.rm.max_responses, length) if ranked else (batch, length)
  spec = lambda s: jax.ShapeDtypeStruct(s, jnp.int32, sharding=built.batch_sharding)
  batch = {"tokens": spec(shape), "attention_mask": spec(shape)}
  if ranked:
    batch.update(ranks=spec(shape[:2]), response_mask=spec(shape[:2]))
  else:
    batch["loss_mask"] = spec(shape)
  with jax.set_mesh(built.mesh), nn.logical_axis_rules(built.rules):
    lowered = built.train_step.lower(built.factory.abstract, batch, jax.random.key(0))
    stats = lowered.compile().memory_analysis()
  return dict(arguments=stats.argument_size_in_bytes, temp=stats.temp_size_in_bytes,
              total=stats.argument_size_in_bytes + stats.temp_size_in_bytes)


def _validate_ppo(config, data_parallel: int) -> None:
  """`rl.config.validate_rl` (batch divisibility and the rest) with placeholders for the
  run directories and the pretraining file, which the estimate does not read."""
  config = config.copy_and_resolve_references()
  config.policy_from = config.reward_from = "(source run)"
  if not config.ptx.train_file:
    config.ptx.train_file = "(pretraining text)"
  rl_config.validate_rl(config, data_parallel, process_count=1)


def ceil_div(a: int, b: int) -> int:
  """Rows per device of `a` rows split `b` ways (a partial last share is padded)."""
  return -(-a // b)


def ppo_memory(preset: str, num_devices: int, ppo_preset: str = PPO_PRESET, overrides=()) -> dict:
  """The PPO estimate of the module docstring: the four models' state on configs/ppo.py's mesh
  and optimisers, and the peaks of the sampler, the scoring and the update."""
  config = load_config("ppo", ppo_preset, overrides=overrides)
  ppo = config.ppo
  if ppo.shared_value_head:
    raise ValueError("ppo.shared_value_head=True: the estimate assumes a separate critic.")
  updates = config.train.num_steps * ppo.epochs * ppo.num_minibatches
  sizes, cfgs = {}, {}
  for stage, head, optimizer in (("sft", "lm", config.optimizer), ("rm", "scalar",
                                                                   config.value_optimizer)):
    source = load_config(stage, preset, overrides=overrides)
    source.mesh, source.optimizer = config.mesh, optimizer
    source.train.num_steps = updates
    sizes[head] = state_bytes(source, head, num_devices)
    cfgs[head] = ModelConfig.from_dict(source.model)
  trained = sum(sizes[h]["params"] + sizes[h]["opt_state"] + sizes[h]["grads"] for h in sizes)
  frozen = sizes["lm"]["params"] + sizes["scalar"]["params"]
  data_parallel = sizes["lm"]["data_parallel"]
  _validate_ppo(config, data_parallel)

  policy, critic = cfgs["lm"], cfgs["scalar"]
  batch, m = config.train.global_batch_size, ppo.num_minibatches
  prompt, new = config.data.prompt_length, config.sampling.max_new_tokens
  length, vocab = prompt + new, policy.vocab_size
  rows = batch // data_parallel
  minibatch_rows = ceil_div(batch, m * data_parallel)
  ptx_rows = ceil_div(config.ptx.batch_size, m * data_parallel) if ppo.ptx_coef > 0 else 0
  mesh = abstract_mesh(config.mesh, num_devices)
  kv_cache = kv_cache_bytes(policy, mesh, shd.rules_from_config(config.mesh), batch, length)
  # The prefill runs the LM head on the last prompt position only, scoring and the update on
  # the N + 1 positions that predict the response (`logits_from`).
  sampling = 2 * kv_cache + forward_bytes(policy, "lm", rows, prompt, keys=length,
                                          logit_positions=1)
  scoring = rows * new * vocab * 4 + max(
      forward_bytes(policy, "lm", minibatch_rows, length, logit_positions=new + 1)
      + 2 * minibatch_rows * new * vocab * 4, forward_bytes(critic, "scalar", rows, length))
  update = (activation_bytes(policy, "lm", minibatch_rows, length, logit_positions=new + 1) +
            (activation_bytes(policy, "lm", ptx_rows, config.ptx.length) if ptx_rows else 0)
            + activation_bytes(critic, "scalar", minibatch_rows, length))
  state = trained + frozen
  return dict(preset=preset, ppo_preset=ppo_preset, devices=num_devices, mesh=sizes["lm"]["mesh"],
              global_batch=batch, num_minibatches=m, prompt_length=prompt, new_tokens=new,
              ptx_rows_per_iteration=config.ptx.batch_size if ptx_rows else 0,
              ptx_length=config.ptx.length, rows_per_device=rows,
              minibatch_rows_per_device=minibatch_rows, ptx_rows_per_device=ptx_rows,
              trained=trained, frozen=frozen, state=state, kv_cache=kv_cache, sampling=sampling,
              scoring=scoring, rollout=max(sampling, scoring), update=update,
              total=state + max(sampling, scoring, update))


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
          row["xla_cpu"] = compiled_bytes(preset, stage, cpu_devices, args.grad_accum, args.set)
        rows.append(row)
      ppo.append(ppo_memory(preset, num_devices, args.ppo_preset, args.set))

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
  print("\nSummary, total per device (state + estimated activations; PPO: "
        f"configs/ppo.py:{args.ppo_preset}, state + its largest phase), GiB"
        + (f"; in brackets the XLA CPU plan at {args.compile_devices} devices" if args.
           compile_devices else "") + ":\n")
  stage_devices = [(s, n) for n in devices for s in stages]
  print("| preset | " + " | ".join(f"{s} @{n}" for s, n in stage_devices) + " | "
        + " | ".join(f"PPO @{n}" for n in devices) + " |")
  print("|---|" + "---|" * (len(stage_devices) + len(devices)))
  for preset in presets:
    cells = [
        gib(r["total"]) + (f" ({gib(r['xla_cpu']['total'])})" if "xla_cpu" in r else "")
        for s, n in stage_devices for r in rows
        if (r["preset"], r["stage"], r["devices"]) == (preset, s, n)
    ]
    cells += [
        gib(r["total"]) for n in devices for r in ppo if (r["preset"], r["devices"]) == (preset, n)
    ]
    print(f"| {preset} | " + " | ".join(cells) + " |")
  print(f"\nPPO, configs/ppo.py:{args.ppo_preset} (policy and critic trained, reference and "
        "reward model frozen; rows per device: rollout / minibatch / PPO-ptx; state exact, "
        "the rest estimated; total = state + max(sampling, scoring, update)):\n")
  print("| preset | devices | mesh | rows | trained (policy + critic) | frozen (reference + RM) "
        "| state | KV cache | sampling (est.) | scoring (est.) | update (est.) | total |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|")
  for r in ppo:
    print(f"| {r['preset']} | {r['devices']} | {r['mesh']} | {r['rows_per_device']} / "
          f"{r['minibatch_rows_per_device']} / {r['ptx_rows_per_device']} "
          f"| {gib(r['trained'])} | {gib(r['frozen'])} | {gib(r['state'])} "
          f"| {gib(r['kv_cache'])} | {gib(r['sampling'])} | {gib(r['scoring'])} "
          f"| {gib(r['update'])} | **{gib(r['total'])}** |")
  if args.json_out:
    with open(args.json_out, "w") as f:
      json.dump(
          dict(rows=rows, ppo=ppo, overrides=args.set, jax=jax.__version__,
               date=str(datetime.date.today()), machine=dict(cpu=cpu_model(),
                                                             platform=platform.platform())), f,
          indent=1, default=list)


if __name__ == "__main__":
  from instruct import cli  # One-line errors (`--debug` for the traceback).
  cli.run_plain(main)
