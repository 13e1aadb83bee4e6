r"""Benchmark of PPO rollouts: sampler throughput and the rollout / scoring / update split.

Run (from the repository root; about 4 minutes on a shared 2-core CPU machine):

  python benchmarks/rollout.py --presets=tiny,small_100m --json_out=/tmp/rollout.json

Everything timed is the library's own, built by `instruct.rl.roles.build_roles` and the PPO
algorithm (`instruct.rl.ppo.PPO`) as an RL run builds them (`instruct.rl.driver.build`), on a
1-device mesh (`config.mesh` of the base config: shape (-1, 1, 1), `DEFAULT_RULES`), under
`jax.set_mesh` and `nn.logical_axis_rules`:

1. Sampler: `rl.sampler.make_sampler` (prefill of left-padded prompts into the KV cache, then
   a `lax.while_loop` decoding one token per iteration), temperature 1, no top-k / top-p.
   `eos_id=-1` never equals a sampled token, so every row decodes `max_new_tokens` (checked:
   `num_decode_steps` and the response mask). Generated tokens/s = B * new tokens / median
   call time. Prefill vs decode is split with a second jitted sampler with
   `max_new_tokens=1`: decode s/token = (T(r) - T(1)) / (r - 1), prefill = T(1) - that.
2. One PPO iteration, timed as the driver times it (each phase followed by
   `jax.block_until_ready`): rollout (the sampler above), scoring (`ppo.make_experience_fn`:
   policy, reference, critic and reward model forward passes, GAE) and update
   (`ppo.make_update_fn`: `epochs` x `num_minibatches` policy and critic gradient steps with
   the RL config's optimisers, states donated). Critic and reward model are
   `Transformer(head='scalar')` of the same preset with random parameters, reward gain 1 and
   bias 0; `no_eos_score=None`, so the reward model's score is used although no response
   ends with EOS. Iteration 0 is the warm-up (it compiles); the medians are over the later
   ones.
3. Recompilation: JAX's compile events (`jax.monitoring` duration events for tracing,
   lowering and XLA compilation, which carry the function name) are recorded for the whole
   run, and the jit cache size (`_cache_size()`) of the sampler, experience and update
   functions (the algorithm's jitted programs) is read after iteration 0 and after the last
   one. "Recompiled after the first iteration" is "yes" if any XLA compilation happened
   after iteration 0 or a cache grew.

Compile time is the sum of the trace, lowering and XLA compile durations recorded during a
function's first call.
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

from instruct import sharding as shd
from instruct.model import ModelConfig, count_params, preset
from instruct.rl import config as rl_config
from instruct.rl import ppo
from instruct.rl.roles import build_roles
from instruct.rl.sampler import SamplingConfig

# Per preset: batch, prompt length, new tokens, timed PPO iterations, timed sampler calls,
# PPO epochs, minibatches. The small_100m update dominates the run time (26-38 s an
# iteration here); --epochs=1 cuts it by about 4x.
DEFAULTS = {
    "tiny": dict(batch=16, prompt_length=32, new_tokens=32, iterations=5, sampler_reps=10, epochs=4,
                 num_minibatches=4),
    "small_100m": dict(batch=4, prompt_length=64, new_tokens=32, iterations=2, sampler_reps=3,
                       epochs=4, num_minibatches=4)
}
FALLBACK = dict(batch=4, prompt_length=32, new_tokens=32, iterations=2, sampler_reps=3, epochs=1,
                num_minibatches=4)
PAD_ID, NEVER_EOS = 0, -1
BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration", BACKEND_COMPILE)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--presets", default="tiny,small_100m",
                 help="Comma-separated model presets of instruct.model.config.PRESETS.")
  for name, what in [("batch", "Prompts per rollout"), ("prompt_length", "Prompt length"),
                     ("new_tokens", "Generated tokens per prompt"),
                     ("iterations", "Timed PPO iterations (after 1 warm-up)"),
                     ("sampler_reps", "Timed sampler calls"), ("epochs", "PPO epochs"),
                     ("num_minibatches", "PPO minibatches")]:
    p.add_argument(f"--{name}", type=int, default=0, help=f"{what}; 0: per preset.")
  p.add_argument("--json_out", default="", help="Write the results as JSON to this path.")
  return p.parse_args(argv)


class CompileLog:
  """Records JAX's compile-duration events (trace, lowering, XLA compile) with fun names."""

  def __init__(self):
    self.events: list[tuple[str, float, str]] = []
    jax.monitoring.register_event_duration_secs_listener(self._record)

  def _record(self, event: str, duration: float, **kwargs) -> None:
    if event in COMPILE_EVENTS:
      self.events.append((event, duration, str(kwargs.get("fun_name", ""))))

  def mark(self) -> int:
    return len(self.events)

  def seconds_since(self, mark: int) -> float:
    return sum(d for _, d, _ in self.events[mark:])

  def compiled_since(self, mark: int) -> list[str]:
    return [name for event, _, name in self.events[mark:] if event == BACKEND_COMPILE]


def settings(name: str, args: argparse.Namespace) -> dict:
  """The preset's defaults, overridden by the non-zero flags."""
  s = dict(DEFAULTS.get(name, FALLBACK))
  for key in s:
    s[key] = getattr(args, key) or s[key]
  return s


def left_padded_prompts(vocab_size: int, batch: int, length: int, seed: int) -> dict:
  """Uniform random tokens, each row 1/2 to all of `length` long, padded on the left."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(max(1, length // 2), length + 1, size=batch)
  mask = (np.arange(length)[None] >= length - lengths[:, None]).astype(np.int32)
  tokens = np.where(mask > 0, rng.integers(1, vocab_size, (batch, length)), PAD_ID)
  return {"prompt_tokens": tokens.astype(np.int32), "prompt_mask": mask}


def build(name: str, s: dict, cfg: ModelConfig | None = None) -> dict:
  """Roles, algorithm and sampler built by the library as an RL run builds them
  (`instruct.rl.driver.build`), from architectures and random parameters instead of runs.
  `cfg` (default: the preset `name`) is the architecture of every role."""
  config = rl_config.base_config("ppo")
  config.ppo.update(epochs=s["epochs"], num_minibatches=s["num_minibatches"], penalize_no_eos=False)
  config.ppo.kl.update(controller="fixed", initial_beta=0.02)
  config.train.global_batch_size = s["batch"]
  assert tuple(config.mesh.shape) == (-1, 1, 1), config.mesh.shape
  mesh, rules = shd.make_mesh(config.mesh), shd.rules_from_config(config.mesh)
  cfg = cfg or ModelConfig(**preset(name))
  roles = build_roles(cfg, cfg, mesh, rules, critic=ppo.critic_kind(config))
  algorithm = ppo.ALGORITHM(config, roles)
  with jax.set_mesh(mesh):
    frozen = {
        "reference": algorithm.policy_factory.init(jax.random.key(0)).params,
        "reward": algorithm.value_factory.init(jax.random.key(1)).params,
        "reward_gain": jnp.float32(1.0), "reward_bias": jnp.float32(0.0)
    }
    state = algorithm.init_state(frozen)
  sampler = lambda new_tokens: roles.sampler(
      SamplingConfig(new_tokens, NEVER_EOS, PAD_ID, temperature=1.0))
  return dict(cfg=cfg, mesh=mesh, rules=rules, batch_sharding=roles.batch_sharding, state=state,
              frozen=frozen, sample=sampler(s["new_tokens"]), sample_one=sampler(1),
              experience=algorithm.make_experience_fn(), update=algorithm.make_update_fn())


def prompt_batch(run: dict, s: dict, seed: int) -> dict:
  host = left_padded_prompts(run["cfg"].vocab_size, s["batch"], s["prompt_length"], seed)
  return shd.host_batch_to_global(host, run["batch_sharding"])


def time_calls(fn, args_fn, reps: int, log: CompileLog) -> tuple[float, float, list, object]:
  """(compile s, first call s, timed call s, last output): 1 first call, `reps` timed ones."""
  mark, start = log.mark(), time.perf_counter()
  out = jax.block_until_ready(fn(*args_fn(0)))
  first_s, compile_s = time.perf_counter() - start, log.seconds_since(mark)
  times = []
  for i in range(1, reps + 1):
    args = args_fn(i)
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return compile_s, first_s, times, out


def bench_sampler(run: dict, s: dict, log: CompileLog) -> dict:
  """Sampler compile time, call time, tokens/s and the prefill / decode split."""
  b, r = s["batch"], s["new_tokens"]
  params = run["state"]["policy"].params
  prompts = [prompt_batch(run, s, 100 + i) for i in range(s["sampler_reps"] + 1)]
  args_fn = lambda i: (params, prompts[i]["prompt_tokens"], prompts[i]["prompt_mask"],
                       jax.random.key(200 + i))
  compile_s, first_s, times, out = time_calls(run["sample"], args_fn, s["sampler_reps"], log)
  if int(out.num_decode_steps) != r or int(out.response_mask.sum()) != b * r:
    raise AssertionError(f"Not full-length decoding: {int(out.num_decode_steps)} steps, "
                         f"{int(out.response_mask.sum())} of {b * r} tokens.")
  one_compile_s, _, one_times, _ = time_calls(run["sample_one"], args_fn, s["sampler_reps"], log)
  call_s, one_s = statistics.median(times), statistics.median(one_times)
  decode_s = (call_s - one_s) / (r - 1) if r > 1 else float("nan")
  return {
      "sampler_compile_s": compile_s, "sampler_first_call_s": first_s, "sampler_call_s": call_s,
      "sampler_call_s_min": min(times), "sampler_call_s_max": max(times),
      "generated_tokens_per_s": b * r / call_s, "sampler_1_token_call_s": one_s,
      "sampler_1_token_compile_s": one_compile_s, "decode_s_per_token": decode_s,
      "prefill_s": one_s - decode_s, "decode_fraction": decode_s * r / call_s
  }


def ppo_iteration(run: dict, state: dict, prompts: dict, rng) -> tuple[dict, dict, list]:
  """One rollout -> experience -> update, each phase blocked on; returns seconds per phase."""
  pt, pm = prompts["prompt_tokens"], prompts["prompt_mask"]
  timer = time.perf_counter()
  samples = jax.block_until_ready(run["sample"](state["policy"].params, pt, pm,
                                                jax.random.fold_in(rng, 0)))
  rollout_s, timer = time.perf_counter() - timer, time.perf_counter()
  experience, metrics = jax.block_until_ready(run["experience"](state, run["frozen"], samples, pt,
                                                                pm))
  scoring_s, timer = time.perf_counter() - timer, time.perf_counter()
  state, update_metrics = jax.block_until_ready(run["update"](state, experience, metrics, {},
                                                              jax.random.fold_in(rng, 1)))
  update_s = time.perf_counter() - timer
  return state, dict(metrics, **update_metrics), [rollout_s, scoring_s, update_s]


def cache_sizes(run: dict) -> dict:
  return {
      "sample": run["sample"]._cache_size(),
      **{k: run[k].jitted._cache_size() for k in ("experience", "update")}
  }


def bench_ppo(run: dict, s: dict, log: CompileLog) -> dict:
  """Iteration 0 (warm-up, compiles) then `iterations` timed ones; medians and compile check."""
  state = run["state"]
  prompts = [prompt_batch(run, s, 300 + i) for i in range(s["iterations"] + 1)]
  mark = log.mark()
  state, metrics, first = ppo_iteration(run, state, prompts[0], jax.random.key(0))
  first_compile_s, after_first, mark = log.seconds_since(mark), cache_sizes(run), log.mark()
  phases = []
  for i in range(1, s["iterations"] + 1):
    state, metrics, seconds = ppo_iteration(run, state, prompts[i], jax.random.key(i))
    phases.append(seconds)
  after_last, compiled = cache_sizes(run), log.compiled_since(mark)
  record = {k: float(v) for k, v in jax.device_get(metrics).items()}
  bad = sorted(k for k, v in record.items() if not np.isfinite(v))
  if bad:
    raise FloatingPointError(f"Non-finite PPO metrics {bad}.")
  med = [statistics.median(p[j] for p in phases) for j in range(3)]
  total = statistics.median(sum(p) for p in phases)
  return {
      "iteration_0_s": sum(first), "iteration_0_phases_s": first,
      "iteration_0_compile_s": first_compile_s, "iteration_phases_s": phases, "rollout_s": med[0],
      "scoring_s": med[1], "update_s": med[2], "iteration_s": total,
      "fractions": [m / sum(med) for m in med], "cache_sizes_after_iteration_0": after_first,
      "cache_sizes_after_last": after_last, "compiled_after_iteration_0": compiled,
      "recompiled": bool(compiled) or after_first != after_last, "final_metrics": record
  }


def bench_preset(name: str, args: argparse.Namespace, log: CompileLog) -> dict:
  s = settings(name, args)
  if s["batch"] % s["num_minibatches"]:
    raise ValueError(f"--batch={s['batch']} is not divisible by "
                     f"--num_minibatches={s['num_minibatches']}.")
  start = time.perf_counter()
  run = build(name, s)
  with jax.set_mesh(run["mesh"]), nn.logical_axis_rules(run["rules"]):
    result = dict(preset=name, params=count_params(run["cfg"]), **s)
    result.update(bench_sampler(run, s, log))
    result.update(bench_ppo(run, s, log))
  result["wall_s"] = time.perf_counter() - start
  return result


SAMPLER_HEADER = ("| preset | params | B x prompt + new | compile s | call s, median (min-max) "
                  "| generated tokens/s | prefill s | decode ms/token step | decode share |\n"
                  "|---|---|---|---|---|---|---|---|---|")
PPO_HEADER = ("| preset | B | epochs x minibatches | iteration 0 s (compile s) "
              "| iteration s, median | rollout s | scoring s | update s "
              "| rollout / scoring / update | recompiled after first iteration |\n"
              "|---|---|---|---|---|---|---|---|---|---|")


def sampler_row(r: dict) -> str:
  return (f"| {r['preset']} | {r['params'] / 1e6:.2f}M "
          f"| {r['batch']} x {r['prompt_length']} + {r['new_tokens']} "
          f"| {r['sampler_compile_s']:.1f} | {r['sampler_call_s']:.3g} "
          f"({r['sampler_call_s_min']:.3g}-{r['sampler_call_s_max']:.3g}) "
          f"| {r['generated_tokens_per_s']:,.0f} | {r['prefill_s']:.3g} "
          f"| {r['decode_s_per_token'] * 1e3:.3g} | {r['decode_fraction']:.0%} |")


def ppo_row(r: dict) -> str:
  fractions = " / ".join(f"{f:.0%}" for f in r["fractions"])
  compiled = r["compiled_after_iteration_0"]
  recompiled = (f"yes ({len(compiled)}: {', '.join(sorted(set(compiled)))})"
                if r["recompiled"] else "no")
  return (f"| {r['preset']} | {r['batch']} | {r['epochs']} x {r['num_minibatches']} "
          f"| {r['iteration_0_s']:.1f} ({r['iteration_0_compile_s']:.1f}) "
          f"| {r['iteration_s']:.3g} | {r['rollout_s']:.3g} | {r['scoring_s']:.3g} "
          f"| {r['update_s']:.3g} | {fractions} | {recompiled} |")


def main(argv=None) -> None:
  args = parse_args(argv)
  presets = [p.strip() for p in args.presets.split(",") if p.strip()]
  devices = jax.devices()
  print(f"jax {jax.__version__}; {len(devices)} x {devices[0].device_kind} "
        f"({devices[0].platform}); host CPU: {cpu_model()}, {os.cpu_count()} cores; "
        f"load average {os.getloadavg()[0]:.2f}")
  log, start = CompileLog(), time.perf_counter()
  results = []
  for name in presets:
    results.append(bench_preset(name, args, log))
    print(f"{name}: done in {results[-1]['wall_s']:.0f} s", flush=True)
  print(f"\nload average {os.getloadavg()[0]:.2f}; total {time.perf_counter() - start:.0f} s\n")
  print(SAMPLER_HEADER)
  for r in results:
    print(sampler_row(r))
  print("\n" + PPO_HEADER)
  for r in results:
    print(ppo_row(r))
  if args.json_out:
    write_json(args, results)


def write_json(args: argparse.Namespace, results: list[dict]) -> None:
  out = dict(run_record(), args=vars(args), results=results)
  with open(args.json_out, "w") as f:
    json.dump(out, f, indent=2)
  print(f"\nwrote {args.json_out}")


if __name__ == "__main__":
  from instruct import cli  # One-line errors (`--debug` for the traceback).
  cli.run_plain(main)
