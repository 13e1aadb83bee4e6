"""Best-of-N sampling against a reward model: the baseline that needs no training.

For each prompt, N responses are sampled from the policy (an SFT run) and the one the reward
model scores highest is kept (Nakano et al. 2021; Stiennon et al. 2020; Gao et al. 2022).

The KL divergence of the best-of-N distribution from the policy is, for responses that the
reward model ranks without ties,

  KL_bon(N) = log N - (N - 1) / N                      (`analytic_kl`)

(Stiennon et al. 2020, appendix G.3; Gao et al. 2022, eq. 2). With ties or a discrete response
space it is an upper bound (Beirami et al. 2024).

One set of n samples per prompt gives an estimate for every N <= n: the expected value of a
quantity (the proxy score, or the held-out labelers' score of the selected response) at the
best of N responses drawn without replacement from the n is

  E_N = sum_i w_i(N) x_(i),   w_i(N) = C(i - 1, N - 1) / C(n, N)          (`expected_at_best`)

with the responses sorted by proxy score in increasing order (i = 1..n) and x_(i) the quantity
of the i-th: the probability that the i-th is the best of a random N-subset. It is unbiased for
best-of-N with N fresh samples and has lower variance than using only the first N samples
(Nakano et al. 2021, appendix; Gao et al. 2022 use it for their best-of-N curves).

`run(config, workdir)` is the `best_of_n` stage (`configs/best_of_n.py`): n samples per prompt
of a prompt file with the jitted sampler of the RL stage, scored by the frozen reward model
with its normalisation (a fixed score for responses that never emit EOS, as PPO), and for
every N in 1, 2, 4, ..., n the expected best score and the analytic KL, written as metrics
(step = N), `results.json`, and every sample with its score in `samples.jsonl` (one record
per prompt, in the data pipeline's order: deterministic, not the file's).
"""

from __future__ import annotations

import json
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from instruct import config_lib
from instruct import data as data_lib
from instruct import loop as loop_lib
from instruct import paths
from instruct import reward as reward_lib
from instruct import sharding as shd
from instruct.rl import config as rl_config
from instruct.rl.roles import build_roles, load_frozen, source_architectures
from instruct.rl.scoring import reward_scores
from instruct.stages import common

RESULTS = "results.json"
SAMPLES = "samples.jsonl"


def analytic_kl(n: int) -> float:
  """KL(best-of-n || policy) = log n - (n - 1) / n nats, for n >= 1 (0 at n = 1)."""
  if n < 1:
    raise ValueError(f"best-of-n needs n >= 1, got {n}.")
  return math.log(n) - (n - 1) / n


def sizes(n: int) -> tuple[int, ...]:
  """The N reported for n samples per prompt: 1, 2, 4, ... up to n, and n itself."""
  out = [1 << i for i in range(n.bit_length()) if (1 << i) <= n]
  return tuple(out + ([n] if out[-1] != n else []))


def order_weights(n: int, k: int) -> np.ndarray:
  """[n] w_i = C(i - 1, k - 1) / C(n, k), i = 1..n: the probability that the i-th smallest of
  n items is the largest of a uniformly random k-subset. Sums to 1."""
  if not 1 <= k <= n:
    raise ValueError(f"best-of-{k} from {n} samples: need 1 <= N <= n.")
  return np.asarray([math.comb(i - 1, k - 1) for i in range(1, n + 1)], np.float64) / math.comb(
      n, k)


def expected_at_best(proxy_pn, k: int, values_pn=None) -> np.ndarray:
  """[p] the expected `values` (default: the proxy itself) of the response with the highest
  proxy among k drawn without replacement from each prompt's n (see the module docstring).

  proxy_pn: [prompts, n] proxy (reward-model) scores; values_pn: [prompts, n] any quantity of
  the same responses (e.g. the held-out labelers' score). Ties in the proxy are broken by
  position (a stable sort), as `np.argmax` breaks them.
  """
  proxy = np.asarray(proxy_pn, np.float64)
  values = proxy if values_pn is None else np.asarray(values_pn, np.float64)
  if proxy.ndim != 2 or values.shape != proxy.shape:
    raise ValueError(f"proxy {proxy.shape} and values {values.shape} must be [prompts, n].")
  # Ascending by proxy; among equal scores the earliest sample sorts last (argmax's choice).
  order = np.lexsort((-np.arange(proxy.shape[1])[None, :].repeat(len(proxy), 0), proxy), axis=1)
  return np.take_along_axis(values, order, axis=1) @ order_weights(proxy.shape[1], k)


def best_of(proxy_pn, k: int) -> np.ndarray:
  """[p] the index of the response kept by best-of-k over each prompt's FIRST k samples."""
  return np.argmax(np.asarray(proxy_pn)[:, :k], axis=1)


# ----------------------------------------------------------------------------- the stage


# yapf: disable
def default_config() -> ml_collections.ConfigDict:
  """`config.best_of_n`."""
  c = ml_collections.ConfigDict()
  c.n = 16                      # Samples per prompt; every N = 1, 2, 4, ... <= n is reported.
  c.split = "validation"        # Which prompt file: data.train_file or data.validation_file.
  c.max_prompts = 0             # 0: every prompt of the split.
  c.penalize_no_eos = True      # Responses without EOS score no_eos_score (as PPO's).
  c.no_eos_score = -1.0
  return c
# yapf: enable


def base_config() -> ml_collections.ConfigDict:
  """Every field of a best-of-N run: the RL stage's sources, prompts, sampler and mesh."""
  c = rl_config.base_config("ppo")
  for key in ("algorithm", "ppo", "ptx", "optimizer", "value_optimizer"):
    del c[key]
  c.stage = "best_of_n"
  c.train.global_batch_size = 16  # Prompts per batch (x n rows through the sampler).
  c.best_of_n = default_config()
  return c


def validate(config, data_parallel: int, process_count: int) -> None:
  """ValueError naming the key; the RL stage's checks of sources, prompts and sampler."""
  b = config.best_of_n
  if not (config_lib.is_int(b.n) and b.n >= 1):
    raise ValueError(f"config.best_of_n.n={b.n!r} must be an integer >= 1.")
  if b.split not in ("train", "validation"):
    raise ValueError(f"config.best_of_n.split={b.split!r}; expected 'train' or 'validation'.")
  if not (config_lib.is_int(b.max_prompts) and b.max_prompts >= 0):
    raise ValueError(f"config.best_of_n.max_prompts={b.max_prompts!r} must be an integer >= 0.")
  if not math.isfinite(b.no_eos_score):
    raise ValueError(f"config.best_of_n.no_eos_score={b.no_eos_score}: must be finite.")
  rows = config.train.global_batch_size * b.n
  if rows % data_parallel or config.train.global_batch_size % process_count:
    raise ValueError(f"config.train.global_batch_size={config.train.global_batch_size} x "
                     f"config.best_of_n.n={b.n} = {rows} rows is not divisible by the "
                     f"data-parallel size {data_parallel} (or the {process_count} processes).")
  for key in ("policy_from", "reward_from"):
    if not config[key]:
      raise ValueError(f"config.{key} is empty: best-of-N needs the workdir of the "
                       f"{'SFT' if key == 'policy_from' else 'reward-model'} run.")
  config_lib.validate_data_format(config, "prompts", reader="best-of-N samples from")
  config_lib.validate_sampling(config.sampling)


def _summary(scores_pn: np.ndarray, ns: Sequence[int]) -> dict[int, dict[str, float]]:
  out = {}
  for k in ns:
    best = expected_at_best(scores_pn, k)
    out[k] = {
        "score": float(best.mean()),
        "score_sem": float(best.std(ddof=1) / math.sqrt(len(best))) if len(best) > 1 else 0.0,
        "kl": analytic_kl(k)
    }
  return out


def run(config, workdir: str, devices=None) -> dict:
  """The `best_of_n` stage (module docstring); returns the results written."""
  from instruct.rl import driver  # The RL stage's sampler settings (imports this stage table).
  tokenizer = data_lib.load_tokenizer(config.data.tokenizer,
                                      pad_token=config.data.get("pad_token", ""))
  mesh = shd.make_mesh(config.mesh, devices)
  rules = shd.rules_from_config(config.mesh)
  validate(config, shd.data_parallel_size(mesh, rules), jax.process_count())
  policy_cfg, reward_cfg = source_architectures(config.policy_from, config.reward_from)
  rl_config.check_tokenizer_fits(config, len(tokenizer), policy_cfg, reward_cfg)
  roles = build_roles(policy_cfg, reward_cfg, mesh, rules, critic="none")
  sampling = driver.sampling_config(config, tokenizer)
  sample = roles.sampler(sampling)
  b = config.best_of_n
  no_eos = b.no_eos_score if b.penalize_no_eos else None

  def score_fn(frozen, prompt_tokens, prompt_mask, samples):
    raw = reward_scores(roles.reward.model, frozen["reward"], prompt_tokens, prompt_mask,
                        samples.response_tokens, samples.response_mask)
    score = reward_lib.normalize(raw, frozen["reward_gain"], frozen["reward_bias"])
    if no_eos is not None:
      score = jnp.where(samples.ended_with_eos, score, jnp.float32(no_eos))
    return score

  batch_sh = roles.batch_sharding
  score = jax.jit(score_fn, out_shardings=batch_sh)
  paths.makedirs(workdir)
  checkpointer, writer = loop_lib.open_run(workdir, config)
  try:
    frozen = load_frozen(roles, config.policy_from, config.reward_from)
    files = {"train": config.data.train_file, "validation": config.data.validation_file}
    batches = data_lib.make_prompt_batches(
        files, b.split, tokenizer, global_batch_size=config.train.global_batch_size,
        batch_size_name="config.train.global_batch_size", prompt_length=config.data.prompt_length,
        seed=config.seed, shuffle=False, repeat=False, data_dir=common.tfds_dir(config),
        process_index=jax.process_index(), process_count=jax.process_count(),
        data_format=config.data.get("format",
                                    "records"), skip_invalid=config.data.get("skip_invalid", False),
        allow_truncation=config.data.get("allow_truncation", True))
    rows, rng = [], jax.random.key(config.seed)
    with jax.set_mesh(roles.mesh):
      for i, batch in enumerate(batches):
        real = batch["prompt_mask"].sum(axis=1) > 0
        host = {k: np.repeat(v, b.n, axis=0) for k, v in batch.items() if k.startswith("prompt")}
        arrays = shd.host_batch_to_global(host, batch_sh)
        samples = sample(frozen["reference"], arrays["prompt_tokens"], arrays["prompt_mask"],
                         jax.random.fold_in(rng, i))
        scores = score(frozen, arrays["prompt_tokens"], arrays["prompt_mask"], samples)
        got = multihost_utils.process_allgather(
            (scores, samples.response_tokens, samples.response_mask, samples.ended_with_eos),
            tiled=True)
        prompt_rows = multihost_utils.process_allgather(
            (batch["prompt_tokens"], batch["prompt_mask"], real), tiled=True)
        rows.extend(_rows(tokenizer, b.n, prompt_rows, got))
        if b.max_prompts and len(rows) >= b.max_prompts:
          rows = rows[:b.max_prompts]
          break
    if not rows:
      raise ValueError(f"config.best_of_n.split={b.split!r}: the prompt file has no prompts.")
    scores_pn = np.asarray([r["scores"] for r in rows])
    summary = _summary(scores_pn, sizes(b.n))
    results = {
        "n": b.n, "prompts": len(rows), "sizes": list(summary),
        "score": [s["score"] for s in summary.values()],
        "score_sem": [s["score_sem"] for s in summary.values()],
        "kl": [s["kl"] for s in summary.values()]
    }
    if jax.process_index() == 0:
      for k, s in summary.items():
        writer.write(k, {"best_of_n/score": s["score"], "best_of_n/kl_analytic": s["kl"]})
      paths.write_text_atomic(paths.join(workdir, SAMPLES),
                              "".join(json.dumps(r) + "\n" for r in rows))
      paths.write_text_atomic(paths.join(workdir, RESULTS), json.dumps(results, indent=1))
    for k, s in summary.items():
      logging.info("best-of-%d: score %.4f +- %.4f, KL %.3f nats", k, s["score"], s["score_sem"],
                   s["kl"])
  finally:
    checkpointer.close()
    writer.close()
  return results


def _rows(tokenizer, n: int, prompt_rows, got) -> list[dict[str, Any]]:
  """One record per real prompt: its text, its n responses (text, token ids up to and with EOS,
  ended) and their scores."""
  prompt_tokens, prompt_mask, real = (np.asarray(x) for x in prompt_rows)
  scores, tokens, mask, ended = (np.asarray(x) for x in got)
  out = []
  for p in np.flatnonzero(real):
    rows = range(p * n, (p + 1) * n)
    out.append({
        "prompt": tokenizer.decode(prompt_tokens[p][prompt_mask[p] > 0].tolist()), "responses": [
            tokenizer.decode(tokens[r][mask[r] > 0].tolist(), skip_special_tokens=True)
            for r in rows
        ], "response_ids": [tokens[r][mask[r] > 0].tolist() for r in rows],
        "ended": [bool(ended[r]) for r in rows], "scores": [float(scores[r]) for r in rows]
    })
  return out
