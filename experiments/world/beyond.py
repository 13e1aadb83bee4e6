"""The methods that came after InstructGPT's PPO, on the same rankings and reward model.

`dpo`: direct preference optimisation from SFT on the comparisons the reward model learns
from (`instruct.stages.dpo`): `dpo`, every ranked pair of each K-wise ranking (Rafailov et al.
2023), and `dpo_pl`, the Plackett-Luce form on the whole ranking (the DPO paper's appendix).
One epoch, as the reward model, with beta = 0.1.

`critic_free`: RLOO (Ahmadian et al. 2024) and GRPO (Shao et al. 2024) from SFT against the
reward model (`instruct.rl.rloo`, `instruct.rl.grpo`), on equal terms with PPO: the same
iterations, prompts, KL coefficient and learning rate, and the same responses per iteration
(`ppo_batch / k` prompts x k = 4 responses each). RLOO puts the KL in the reward as PPO does;
GRPO keeps the paper's k3 KL loss term.

`best_of_n`: N samples of the SFT policy per evaluation prompt, the reward model's best kept
(`instruct.rl.best_of_n`; no training), for N = 1, 2, 4, ..., `BEST_OF_N[preset]`.

`iterated`: rounds of comparisons on the current policy, a continued reward model and PPO-ptx
again (`experiments.world.iterated`).

The over-optimisation frontier (Gao et al. 2022): for every method, the held-out labelers'
score ("gold") and the reward model's ("proxy") against d = sqrt(KL from SFT), the KL of each
checkpoint's answers measured as PPO's are (`kl_points`) and best-of-N's the analytic one.
`fit_gold` fits the paper's forms to the gold score's gain over SFT: best-of-N
R(d) = d (alpha - beta d), RL R(d) = d (alpha - beta log d).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from experiments.world import evaluate as ev
from instruct import paths
from instruct.rl import best_of_n as bon

DPO_STAGES = {"dpo": "dpo", "dpo_pl": "plackett_luce"}
ONLINE_STAGES = {"rloo": "rloo", "grpo": "grpo"}
BEST_OF_N = "best_of_n"
STAGES = {"dpo": tuple(DPO_STAGES), "critic_free": tuple(ONLINE_STAGES), "best_of_n": (BEST_OF_N,)}
LABELS = {
    "ppo": "PPO", "ppo_ptx": "PPO-ptx", "dpo": "DPO (all ranked pairs)",
    "dpo_pl": "DPO, Plackett-Luce (K-wise)", "rloo": "RLOO", "grpo": "GRPO", BEST_OF_N: "Best-of-N",
    "iterated": "Iterated RLHF"
}
SAMPLES_PER_PROMPT = 4  # k of RLOO and GRPO.
DPO_BETA = 0.1
DPO_CHECKPOINTS = 4  # Saved along DPO's epoch: its points on the frontier.
# N of best-of-N: up to this many samples per evaluation prompt.
BEST_OF_N_SIZE = {"test": 4, "quick": 16, "full": 32}
# How the fitted curves weight the points: every checkpoint and every N alike.


def upstream(stage: str) -> tuple[str, ...]:
  """What a stage of these methods is built from (the main job fingerprints it)."""
  if stage in DPO_STAGES:
    return ("world", "sft", "comparisons")
  return ("world", "sft", "rm")


def as_dpo(config, rm_config, stage: str, num_steps: int) -> None:
  """Turns `configs/dpo.py:tiny` into `stage`'s: the RM stage's data, model, batch and epoch,
  from SFT, with its loss; `DPO_CHECKPOINTS` checkpoints along the way."""
  config.init_from = rm_config.init_from
  config.model = rm_config.model
  for key in ("train_file", "validation_file", "buckets", "tokenizer"):
    config.data[key] = rm_config.data[key]
  config.rm.max_responses = rm_config.rm.max_responses
  config.dpo.loss = DPO_STAGES[stage]
  config.dpo.beta = DPO_BETA
  config.seed = rm_config.seed
  config.train.num_steps = num_steps
  config.train.global_batch_size = rm_config.train.global_batch_size
  config.train.checkpoint_every = max(1, num_steps // DPO_CHECKPOINTS)
  config.train.keep_checkpoints = DPO_CHECKPOINTS + 2
  config.train.eval_every = max(1, num_steps // 3)
  config.train.log_every = max(1, num_steps // 10)
  config.optimizer.warmup_steps = min(8, num_steps // 5)


def as_online(config, ppo_config, stage: str) -> None:
  """Turns `configs/<rloo|grpo>.py:tiny` into `stage`'s: PPO's sources, prompts, sampler,
  iterations, learning rate, fixed KL coefficient and checkpoints, with the same responses per
  iteration (`SAMPLES_PER_PROMPT` per prompt)."""
  section = config[ONLINE_STAGES[stage]]
  for key in ("policy_from", "reward_from", "seed"):
    config[key] = ppo_config[key]
  for key in ("train_file", "validation_file", "prompt_length", "tokenizer"):
    config.data[key] = ppo_config.data[key]
  config.sampling = ppo_config.sampling
  for key in ("num_steps", "checkpoint_every", "keep_checkpoints", "log_every"):
    config.train[key] = ppo_config.train[key]
  config.train.global_batch_size = max(1, ppo_config.train.global_batch_size // SAMPLES_PER_PROMPT)
  config.optimizer.learning_rate = ppo_config.optimizer.learning_rate
  section.samples_per_prompt = SAMPLES_PER_PROMPT
  section.kl.controller = "fixed"
  section.kl.initial_beta = ppo_config.ppo.kl.initial_beta


def as_best_of_n(config, ppo_config, preset, eval_prompts: str) -> None:
  """Turns `configs/best_of_n.py:tiny` into the main job's: the SFT policy and the reward
  model, the evaluation prompts and the evaluation's sampler, N up to `BEST_OF_N_SIZE`."""
  for key in ("policy_from", "reward_from", "seed"):
    config[key] = ppo_config[key]
  config.data.tokenizer = ppo_config.data.tokenizer
  config.data.prompt_length = ppo_config.data.prompt_length
  config.data.train_file = config.data.validation_file = eval_prompts
  config.sampling.max_new_tokens = ppo_config.sampling.max_new_tokens
  config.sampling.temperature = preset.eval_temperature
  config.best_of_n.n = BEST_OF_N_SIZE[preset.name]
  config.best_of_n.split = "validation"


def best_of_n_finished(workdir: str) -> bool:
  return paths.exists(paths.join(workdir, bon.RESULTS))


# ----------------------------------------------------------------------------- evaluation


def kl_points(workdir: str, preset, tokenizer, prompts, facts, judges, rm, reference) -> list[dict]:
  """The reward model's score ("proxy"), the held-out labelers' ("gold") and the KL to the SFT
  policy (`reference`) of the answers at each saved checkpoint of the run in `workdir` (step 0:
  SFT itself).

  KL: the mean over prompts of log pi(y) - log pi_SFT(y) of one sampled answer y each, under the
  distribution `ev.generate` samples from (special tokens banned, as `Answer.logprob` is).
  """
  points = []
  for step in [0] + ev.checkpoint_steps(workdir):
    policy = reference if step == 0 else ev.load_policy(workdir, step)
    answers = ev.generate(policy, tokenizer, prompts, seed=preset.seed + 31,
                          temperature=preset.eval_temperature)
    arrays = ev.response_arrays(tokenizer, prompts, answers)
    logp_ref = ev.sequence_logprob(reference, arrays, preset.eval_temperature,
                                   banned_ids=ev.banned_token_ids(tokenizer))
    logp = np.asarray([a.logprob for a in answers])
    scores = ev.judge_all(prompts, answers, facts)
    points.append({
        "step": step, "kl": float(np.mean(logp - logp_ref)),
        "rm_score": float(np.mean(ev.reward_scores(rm, arrays))),
        "labeler_score": ev.mean_utility(scores, judges)
    })
  return points


def _answers(rows, tokenizer) -> list[list[ev.Answer]]:
  """The best-of-N stage's responses as the evaluation's answers (words as `ev.generate`)."""
  out = []
  for r in rows:
    answers = []
    for ids, ended in zip(r["response_ids"], r["ended"]):
      words = tokenizer.decode(ids[:-1] if ended else ids, skip_special_tokens=True).split()
      answers.append(ev.Answer(words, ended, tuple(ids)))
    out.append(answers)
  return out


def evaluate_best_of_n(root: str, preset, tokenizer, prompts, categories, facts, judges, rm,
                       sft_scores, ppo_ptx_scores, seed: int) -> dict[str, Any]:
  """Best-of-N on the evaluation prompts: per N the expected proxy (the reward model's score,
  as the frontier's other points) and gold (held-out labelers') scores of the response kept and
  the analytic KL; the row of the largest N (its answers judged against SFT's and PPO-ptx's)."""
  workdir = paths.join(root, BEST_OF_N)
  by_prompt: dict[tuple, list] = {}
  for r in paths.read_jsonl(paths.join(workdir, bon.SAMPLES)):  # In the data pipeline's order.
    by_prompt.setdefault(tuple(r["prompt"].split()), []).append(r)
  try:
    rows = [by_prompt[tuple(p.split())].pop(0) for p in prompts]
  except (KeyError, IndexError):
    raise ValueError(f"{workdir}/{bon.SAMPLES} does not hold the evaluation prompts.") from None
  answers = _answers(rows, tokenizer)
  n = len(answers[0])
  selection = np.asarray([r["scores"] for r in rows])  # With the no-EOS penalty, as chosen.
  flat = [a for group in answers for a in group]
  flat_prompts = [p for p in prompts for _ in range(n)]
  proxy = ev.reward_scores(rm, ev.response_arrays(tokenizer, flat_prompts, flat)).reshape(-1, n)
  judged = ev.judge_all(flat_prompts, flat, facts)
  gold = np.asarray([ev.mean_utility([s], judges) for s in judged]).reshape(-1, n)
  curve = []
  for k in bon.sizes(n):
    curve.append({
        "n": k, "kl": bon.analytic_kl(k),
        "rm_score": float(bon.expected_at_best(selection, k, proxy).mean()),
        "labeler_score": float(bon.expected_at_best(selection, k, gold).mean())
    })
  best = bon.best_of(selection, n)
  scores = [judged[i * n + j] for i, j in enumerate(best)]
  rates = ev.rates(scores, categories)
  row = {
      "stage": BEST_OF_N, "label": f"Best-of-{n} (RM-selected SFT samples)", "n": n,
      "win_vs_sft": ev.win_rate(scores, sft_scores, judges, seed=seed), **ev.head_to_head(
          scores, ppo_ptx_scores, judges, seed), "mean_utility": ev.mean_utility(scores, judges),
      "kl": bon.analytic_kl(n),
      **{k: rates[k] for k in ("honest", "harmless", "toxic_respectful", "complied_harmful")}
  }
  return {"row": row, "curve": curve}


def fit_gold(points: Sequence[dict], form: str) -> dict[str, float] | None:
  """Least-squares fit of Gao et al.'s form to the gold score's gain over the first point
  (d = 0, SFT): 'bon' R(d) = d (alpha - beta d), 'rl' R(d) = d (alpha - beta log d), with
  d = sqrt(max(KL, 0)). Linear in (alpha, beta): R / d = alpha - beta g(d). None with fewer than
  two points at d > 0."""
  if form not in ("bon", "rl"):
    raise ValueError(f"form={form!r}; expected 'bon' or 'rl'.")
  base = points[0]["labeler_score"]
  d = np.sqrt(np.maximum([p["kl"] for p in points[1:]], 0.0))
  gain = np.asarray([p["labeler_score"] - base for p in points[1:]])
  keep = d > 1e-6
  if keep.sum() < 2:
    return None
  d, gain = d[keep], gain[keep]
  g = d if form == "bon" else np.log(d)
  design = np.stack([np.ones_like(d), -g], axis=1)
  (alpha, beta), *_ = np.linalg.lstsq(design, gain / d, rcond=None)
  predicted = d * (alpha - beta * g)
  return {
      "form": form, "alpha": float(alpha), "beta": float(beta), "points": int(len(d)),
      "rmse": float(math.sqrt(np.mean((predicted - gain) ** 2)))
  }


def frontier(curves: dict[str, list[dict]], best_of_n_curve: list[dict] | None) -> dict:
  """Every method's points (d = sqrt(KL), gold, proxy) and its fitted gold curve."""
  out = {}
  for name, points in curves.items():
    out[name] = {"points": points, "fit": fit_gold(points, "rl")}
  if best_of_n_curve:
    out[BEST_OF_N] = {"points": best_of_n_curve, "fit": fit_gold(best_of_n_curve, "bon")}
  return out
