r"""A miniature InstructGPT, offline and end to end, with simulated labelers and a report.

  python -m experiments.instructgpt_mini --workdir=/tmp/instructgpt_mini [--preset=quick|full] \
      [--seed=0]

Stages (each in `DIR/<stage>`; a rerun skips finished stages and resumes an interrupted one):

  world           write the embedded world from its seed (`experiments.world.generate`): corpus,
                  prompts of ten categories, labeler demonstrations, tokenizer.
  pretrain        pretrain the small base LM on the corpus         (instruct.train, pretrain)
  pretrain_large  pretrain a larger base LM (about 10x the small one's non-embedding
                  parameters in `full`; 4x in `quick`)             (instruct.train, pretrain)
  sft             fine-tune the small base LM on demonstrations    (instruct.train, sft)
  comparisons     sample K answers per RM prompt from the SFT policy; training labelers rank
                  the training prompts' answers, held-out labelers the validation prompts'
  rm              train the reward model from the SFT model        (instruct.train, rm)
  ppo, ppo_ptx    PPO and PPO-ptx from the SFT policy against the RM (instruct.train, ppo)
  evaluate        sample every model on held-out prompts; held-out labelers judge
                  (`DIR/evaluate/results.json`)
  report          `DIR/report.md` with PNG plots (`experiments.world.report`)

Every training stage is the normal `instruct.train` stage with its config saved as
`DIR/<stage>/config.json`, so it can be rerun or swept alone, e.g.

  python -m instruct.train --config=configs/from_run.py:DIR/sft --workdir=/tmp/sft_sweep \
      --config.optimizer.learning_rate=3e-3

`--seed` (default 0) seeds everything a rerun could vary: the world (corpus, prompts,
demonstrations; `WorldConfig.seed`), every training stage's initialisation and data order,
the comparisons' sampling and rankings, and the evaluation's sampling and judgments. The
simulated labelers stay the same people at every seed (`LabelerConfig.seed`): they define
what the targets mean. A workdir keeps the preset, seed and overrides it was made with
(`DIR/run.json`); resuming it with others is an error. Several seeds of one preset are several
runs, each into its own workdir; `experiments.results_table` then pools them (win rates with
intervals over prompts and seeds, the targets judged on the pooled values):

  for seed in 0 1 2; do
    python -m experiments.instructgpt_mini --preset=quick --seed=$seed \
        --workdir=/tmp/instructgpt_mini_quick_$seed
  done
  python -m experiments.results_table /tmp/instructgpt_mini_quick_{0,1,2} [--readme README.md]

The same run as a config, with the settings a sweep varies (configs/instructgpt_mini.py:
`seed`, `ppo.kl_beta`, `ppo.ptx_coef`, `ppo.learning_rate`, `ppo.iterations`, `upstream`, and
`methods`, the other routes to alignment to add, experiments/world/methods.py):

  python -m experiments.instructgpt_mini --config=configs/instructgpt_mini.py:quick \
      --config.ppo.ptx_coef=4 --workdir=/tmp/instructgpt_mini_ptx4

and a sweep of it (each trial a run in DIR/trials/NAME, the stages before PPO trained once in
DIR/upstream and copied into each; DIR/sweep.md ranks them, DIR/sweep_ppo.ptx_coef.png plots
the win rate and perplexity regression against the coefficient):

  python -m instruct.sweep --config=configs/instructgpt_mini.py:quick,sweep=ptx \
      --workdir=/tmp/sweep_mini_ptx
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
from typing import Any, Callable

from absl import flags, logging
import jax
from ml_collections import config_flags
import numpy as np

from experiments.world import beyond
from experiments.world import correction as correction_lib
from experiments.world import evaluate as ev
from experiments.world import flan as flan_lib
from experiments.world import generate as world_lib
from experiments.world import hindsight as hindsight_lib
from experiments.world import iterated as iterated_lib
from experiments.world import labelers as labelers_lib
from experiments.world import methods as methods_lib
from experiments.world import report as report_lib
from experiments.world import tasks as T
from instruct import cli
from instruct import config_lib
from instruct import metrics as metrics_lib
from instruct import paths
from instruct import run as run_lib
from instruct import workdir as workdir_lib
from instruct.data import tokenization
from instruct.stages import table

_WORKDIR = flags.DEFINE_string("workdir", None, "Root directory of the pipeline's runs.")
_PRESET = flags.DEFINE_enum(
    "preset", "quick", ["quick", "full", "test"],
    "Pipeline size: quick (the default, ~10 min on a 2-core CPU), "
    "full (the report's targets), test (CI smoke run, ~1 min).")
_SEED = flags.DEFINE_integer(
    "seed", 0, "Seeds the world, every stage and the evaluation "
    "(the labelers stay the same); one workdir per seed.")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Instead of --preset / --seed: configs/instructgpt_mini.py:PRESET and its "
    "--config.* overrides (seed, PPO settings, upstream); what sweeps of the main job use.")

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
JOB_CONFIG = os.path.join(CONFIGS_DIR, "instructgpt_mini.py")
STAGES = ("world", "pretrain", "pretrain_large", "sft", "comparisons", "rm", "ppo", "ppo_ptx",
          "evaluate", "report")


# yapf: disable
@dataclasses.dataclass(frozen=True)
class Preset:
  """Sizes of one pipeline preset."""
  name: str
  world: world_lib.WorldConfig
  small: dict            # Architecture of the small model (ModelConfig fields).
  large: dict            # Architecture of the larger base model.
  pretrain_steps: int
  pretrain_large_steps: int
  sft_steps: int
  ppo_iterations: int
  # Reward model: passes over the training comparisons (InstructGPT found one epoch best; more
  # overfits). The step count follows from the comparisons file, so it is known at rm time.
  rm_epochs: float = 1.0
  ppo_batch: int = 64
  ppo_learning_rate: float = 1e-4   # The policy's (configs/ppo.py's default).
  kl_beta: float = 0.05             # PPO's and PPO-ptx's fixed KL coefficient.
  ptx_coef: float = 1.0             # PPO-ptx's pretraining-loss coefficient (tiny_ptx's).
  responses_per_prompt: int = 4     # K of the comparisons.
  eval_temperature: float = 1.0
  checkpoint_every: int = 10        # PPO: the over-optimisation curve's resolution.
  seed: int = 0
  labelers: labelers_lib.LabelerConfig = labelers_lib.LabelerConfig()
  methods: tuple = ()               # Other routes to alignment (experiments/world/methods.py).
  hir: tuple = ()                   # (key, value) settings of HIR (experiments/world/hindsight.py)
  correction: tuple = ()            # and of self-correction (instruct/data/correction.py).
  iterated: tuple = ()              # and of iterated RLHF (experiments/world/iterated.py).
# yapf: enable


def _arch(d: int, layers: int, heads: int, head_dim: int, d_ff: int) -> dict:
  return dict(vocab_size=144, d_model=d, num_layers=layers, num_heads=heads, num_kv_heads=heads,
              head_dim=head_dim, d_ff=d_ff, max_length=160, norm="rmsnorm", mlp="swiglu",
              position="rope", tie_embeddings=True, use_bias=False)


# yapf: disable
PRESETS = {
    # Sizes: small 106k non-embedding parameters; the larger base model 426k (4.0x) in
    # `quick`, 1.11M (10.4x) in `full`.
    # One RM epoch over 3x (quick) / 2x (full) the RM prompts of the earlier 3 (2) epochs keeps
    # the RM's number of training rows about the same (~96 / ~256 steps of 32).
    "quick": Preset("quick", world_lib.WorldConfig(rm_prompts=3072),
                    small=_arch(64, 2, 4, 16, 192), large=_arch(128, 2, 4, 32, 384),
                    pretrain_steps=300, pretrain_large_steps=300, sft_steps=300,
                    ppo_iterations=40),
    "full": Preset("full", world_lib.WorldConfig(pretrain_docs=12000, sft=3000,
                                                 rm_prompts=8192, rm_validation_prompts=512,
                                                 ppo_prompts=4096, eval_prompts=800),
                   small=_arch(64, 2, 4, 16, 192), large=_arch(192, 3, 6, 32, 384),
                   pretrain_steps=800, pretrain_large_steps=800, sft_steps=600,
                   ppo_iterations=100, responses_per_prompt=6,
                   # Every other route to alignment (experiments/world/methods.py).
                   methods=tuple(methods_lib.METHODS)),
    "test": Preset("test", world_lib.WorldConfig(pretrain_docs=256, pretrain_validation_docs=32,
                                                 sft=128, sft_validation=32, rm_prompts=64,
                                                 rm_validation_prompts=32, ppo_prompts=64,
                                                 ppo_validation_prompts=16, eval_prompts=48),
                   small=_arch(32, 1, 2, 16, 64), large=_arch(48, 1, 2, 24, 96),
                   pretrain_steps=6, pretrain_large_steps=6, sft_steps=6,
                   # Enough PPO, at a learning rate the barely trained policy moves at, that
                   # its score rises well beyond noise at every seed (a test checks it).
                   ppo_iterations=16, ppo_batch=16, ppo_learning_rate=1e-3,
                   checkpoint_every=8),
}
# yapf: enable


def with_seed(preset: Preset, seed: int) -> Preset:
  """The preset with `seed` for its stages and its world (the labelers stay the same)."""
  return dataclasses.replace(preset, seed=seed, world=dataclasses.replace(preset.world, seed=seed))


# The job config's PPO settings (configs/instructgpt_mini.py) and the Preset fields they set.
PPO_FIELDS = {
    "kl_beta": "kl_beta", "ptx_coef": "ptx_coef", "learning_rate": "ppo_learning_rate",
    "iterations": "ppo_iterations"
}


def preset_from_config(config) -> Preset:
  """The preset a job config (configs/instructgpt_mini.py) names, with its seed and PPO
  settings (None keeps the preset's)."""
  if config.preset not in PRESETS:
    raise ValueError(f"config.preset={config.preset!r}: expected one of {list(PRESETS)}.")
  changes = {
      field: config.ppo[key] for key, field in PPO_FIELDS.items() if config.ppo[key] is not None
  }
  if config.get("methods") is not None:  # None: the preset's.
    changes["methods"] = methods_lib.parse(config.methods)
  for section in METHOD_SETTINGS:
    changes[section] = tuple(
        sorted((k, v) for k, v in (config.get(section) or {}).items() if v is not None))
  for key, low, strict in (("kl_beta", 0, False), ("ptx_coef", 0, False),
                           ("learning_rate", 0, True), ("iterations", 1, False)):
    value = config.ppo[key]
    if value is not None and (value < low or (strict and value == low)):
      raise ValueError(f"config.ppo.{key}={value}: must be {'>' if strict else '>='} {low}.")
  preset = dataclasses.replace(with_seed(PRESETS[config.preset], config.seed), **changes)
  hindsight_lib.settings_for(preset)  # One line naming a bad `hir`, `correction` or
  correction_settings(preset)  # `iterated` setting.
  iterated_lib.rounds(preset)
  return preset


# The job config's sections of method settings (None: the method's default for the preset).
METHOD_SETTINGS = ("hir", "correction", "iterated")


def correction_settings(preset: Preset):
  """Self-correction's settings for `preset`, with the job config's `correction` ones."""
  return correction_lib.settings_for(preset.name, preset.correction)


def overrides(preset: Preset) -> dict[str, Any]:
  """The settings in which `preset` differs from its named preset (`ppo.KEY` or `methods`:
  value), as run.json records them."""
  named = PRESETS[preset.name]
  out = {
      f"ppo.{key}": getattr(preset, field) for key, field in PPO_FIELDS.items()
      if getattr(preset, field) != getattr(named, field)
  }
  if preset.methods != named.methods:
    out["methods"] = ",".join(preset.methods)
  for section in METHOD_SETTINGS:
    out.update({f"{section}.{k}": v for k, v in getattr(preset, section)})
  return out


def pipeline_stages(preset: Preset) -> tuple[str, ...]:
  """STAGES with the training stages of `preset.methods` before the evaluation."""
  at = STAGES.index("evaluate")
  return STAGES[:at] + methods_lib.stages(preset.methods) + STAGES[at:]


def _non_embedding_params(arch: dict) -> int:
  d, f, h = arch["d_model"], arch["d_ff"], arch["num_heads"] * arch["head_dim"]
  return arch["num_layers"] * (4 * d * h + 3 * d * f)


# --- Stage configs. ------------------------------------------------------------------------

RM_BATCH = 32  # Comparisons (prompts, each with its K ranked answers) per RM step.


def _config(file: str, arg: str):
  return config_lib.load_config_file(os.path.join(CONFIGS_DIR, file), arg)


def rm_num_steps(preset: Preset, root: str, comparisons: str | None = None) -> int:
  """RM steps for `preset.rm_epochs` passes over ROOT/comparisons/comparisons_train.jsonl (or
  that file of the directory `comparisons`)."""
  path = paths.join(comparisons or paths.join(root, "comparisons"), "comparisons_train.jsonl")
  if not paths.exists(path):
    raise FileNotFoundError(f"{path} is missing: the rm stage's length follows from the "
                            "comparisons stage's output, which comes first.")
  rows = sum(1 for line in paths.read_text(path).split("\n") if line.strip())
  return max(1, math.ceil(preset.rm_epochs * rows / RM_BATCH))


def stage_config(stage: str, preset: Preset, root: str):
  """The `instruct.train` config of a training stage."""
  files = world_lib.files(paths.join(root, "world"))
  if stage in methods_lib.FEEDBACK_STAGES:
    c = stage_config("pretrain", preset, root)
    methods_lib.as_feedback_pretraining(c, stage, files)
    return c
  if stage in methods_lib.FEEDBACK_SFT:
    c = stage_config("sft", preset, root)
    methods_lib.as_feedback_sft(c, stage, root, files)
    return c
  if stage == methods_lib.FEEDBACK_RL:
    c = stage_config("ppo_ptx", preset, root)
    methods_lib.as_feedback_rl(c, root, files)
    return c
  if stage in flan_lib.STAGES:
    return _flan_config(stage, preset, root)
  if stage in beyond.DPO_STAGES:
    c = _config("dpo.py", "tiny")
    beyond.as_dpo(c, stage_config("rm", preset, root), stage, rm_num_steps(preset, root))
    return c
  if stage in beyond.ONLINE_STAGES:
    c = _config(f"{stage}.py", "tiny")
    beyond.as_online(c, stage_config("ppo", preset, root), stage)
    return c
  if stage == beyond.BEST_OF_N:
    c = _config("best_of_n.py", "tiny")
    beyond.as_best_of_n(c, stage_config("ppo", preset, root), preset, files["eval_prompts"])
    return c
  if stage in ("pretrain", "pretrain_large"):
    c = _config("pretrain.py", "tiny")
    c.model = config_lib.ml_collections.ConfigDict(preset.small if stage ==
                                                   "pretrain" else preset.large)
    c.data.train_file, c.data.validation_file = files["pretrain"]["train"], files["pretrain"][
        "validation"]
    c.data.buckets = (64, 128)
    c.train.num_steps = preset.pretrain_steps if stage == "pretrain" else (
        preset.pretrain_large_steps)
    c.train.global_batch_size = 32
    c.optimizer.learning_rate = 3e-3 if stage == "pretrain" else 2e-3
    c.optimizer.warmup_steps = min(20, c.train.num_steps // 5)
  elif stage == "sft":
    c = _config("sft.py", "tiny")
    c.init_from = paths.join(root, "pretrain")
    c.model = config_lib.ml_collections.ConfigDict(preset.small)
    c.data.train_file, c.data.validation_file = files["sft"]["train"], files["sft"]["validation"]
    c.data.buckets = (64,)
    c.train.num_steps = preset.sft_steps
    c.train.global_batch_size = 32
    c.optimizer.learning_rate = 2e-3
    c.optimizer.warmup_steps = min(10, c.train.num_steps // 5)
  elif stage == "rm":
    c = _config("rm.py", "tiny")
    c.init_from = paths.join(root, "sft")
    c.model = config_lib.ml_collections.ConfigDict(preset.small)
    comparisons = paths.join(root, "comparisons")
    c.data.train_file = paths.join(comparisons, "comparisons_train.jsonl")
    c.data.validation_file = paths.join(comparisons, "comparisons_validation.jsonl")
    c.data.buckets = (64,)
    c.rm.max_responses = preset.responses_per_prompt
    c.rm.normalization_file = files["sft"]["train"]
    c.train.num_steps = rm_num_steps(preset, root)
    c.train.global_batch_size = RM_BATCH
    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_steps = min(8, c.train.num_steps // 5)
  elif stage in ("ppo", "ppo_ptx"):
    c = _config("ppo.py", "tiny_ptx" if stage == "ppo_ptx" else "tiny")
    c.policy_from, c.reward_from = paths.join(root, "sft"), paths.join(root, "rm")
    c.data.train_file, c.data.validation_file = files["ppo_prompts"]["train"], files["ppo_prompts"][
        "validation"]
    c.data.prompt_length = 32
    c.ptx.train_file = files["pretrain"]["train"]
    c.ptx.length = 128
    c.ptx.batch_size = 32
    c.sampling.max_new_tokens = 16
    c.train.num_steps = preset.ppo_iterations
    c.train.global_batch_size = preset.ppo_batch
    c.optimizer.learning_rate = preset.ppo_learning_rate
    c.train.checkpoint_every = min(preset.checkpoint_every, preset.ppo_iterations)
    c.train.keep_checkpoints = preset.ppo_iterations // c.train.checkpoint_every + 1
    # A fixed KL coefficient, as InstructGPT used. The adaptive controller (Ziegler et al.
    # 2019) is inert at this size: with 64 prompts per iteration and its horizon of 10,000
    # episodes, beta moves by at most 0.2 * 64 / 10,000 = 0.13% per iteration, so the runs
    # effectively used their initial beta, 0.05; now they say so.
    c.ppo.kl.controller = "fixed"
    c.ppo.kl.initial_beta = preset.kl_beta
    if stage == "ppo_ptx":
      c.ppo.ptx_coef = preset.ptx_coef
  else:
    raise ValueError(f"{stage!r} is not a training stage.")
  c.data.tokenizer = files["tokenizer"]
  c.seed = preset.seed
  if stage != "rm" and stage not in ("ppo", "ppo_ptx"):
    c.train.eval_every = max(1, c.train.num_steps // 3)
    c.train.checkpoint_every = c.train.num_steps
  c.train.log_every = max(1, c.train.num_steps // 10) if stage not in ("ppo", "ppo_ptx") else (max(
      1, preset.ppo_iterations // 20))
  return c


def _flan_config(stage: str, preset: Preset, root: str):
  """A FLAN stage's config (`experiments.world.flan`): the sft stage's on a mixture, or the
  sft / rm / ppo_ptx stage's from the instruction-tuned model."""
  if stage in flan_lib.RUNS:
    c = stage_config("sft", preset, root)
    c.data.mixture = config_lib.ml_collections.ConfigDict(
        flan_lib.mixture(paths.join(root, "world"), stage))
    c.data.train_file = c.data.validation_file = ""
    c.data.buckets = (128,)  # Few-shot prompts: three tasks in a row.
    return c
  c = stage_config(stage.removesuffix("_flan"), preset, root)
  if stage == "sft_flan":
    c.init_from = paths.join(root, "flan")
  elif stage == "rm_flan":
    c.init_from = paths.join(root, "sft_flan")
  else:
    c.policy_from, c.reward_from = paths.join(root, "sft_flan"), paths.join(root, "rm_flan")
  return c


# What each stage is built from; `_inputs` fingerprints them (a training stage by its latest
# checkpoint step, a file stage by its output's hash).
UPSTREAM = {
    "pretrain": ("world",), "pretrain_large": ("world",), "sft": ("world", "pretrain"),
    "comparisons": ("world", "sft"), "rm": ("world", "sft", "comparisons"),
    "ppo": ("world", "sft", "rm"), "ppo_ptx": ("world", "sft", "rm"),
    "evaluate": ("world", "pretrain", "pretrain_large", "sft", "comparisons", "rm", "ppo",
                 "ppo_ptx"),
    **{s: methods_lib.upstream(s) for m in methods_lib.METHODS.values() for s in m}
}
OUTPUT_FILE = {
    "world": "world.json", "comparisons": "stats.json", "hir": "done.json",
    "corrector": "done.json", "iterated": "done.json", beyond.BEST_OF_N: "results.json"
}
BUILT_FROM = "built_from.json"


class StageInputsChangedError(ValueError):
  """A stage was built from an upstream stage that has changed since."""


def _fingerprint(root: str, stage: str) -> dict:
  workdir = paths.join(root, stage)
  if stage in OUTPUT_FILE:
    path = paths.join(workdir, OUTPUT_FILE[stage])
    if not paths.exists(path):
      return {"missing": OUTPUT_FILE[stage]}
    return {"sha256": hashlib.sha256(paths.read_bytes(path)).hexdigest()}
  step = run_lib.latest_step(workdir) if paths.isdir(paths.join(workdir, "checkpoints")) else (None)
  return {"step": step}


def _inputs(root: str, stage: str, extra: tuple[str, ...] = ()) -> dict:
  return {name: _fingerprint(root, name) for name in UPSTREAM.get(stage, ()) + extra}


def check_inputs(root: str, stage: str, extra: tuple[str, ...] = ()) -> None:
  """Records what `stage` is built from (`DIR/<stage>/built_from.json`) the first time it runs;
  later, refuses to resume or reuse it when an upstream stage changed since.

  A stage built from an unfinished upstream (e.g. an SFT started on a preempted pretraining)
  would otherwise be skipped as finished, its results silently stale.
  """
  if stage not in UPSTREAM:
    return
  workdir = paths.join(root, stage)
  path = paths.join(workdir, BUILT_FROM)
  current = _inputs(root, stage, extra)
  if paths.exists(path):
    recorded = _read_json(path)
    changed = [
        f"{name} ({_describe(recorded.get(name))} -> {_describe(current[name])})"
        for name in current if recorded.get(name) != current[name]
    ]
    if changed:
      raise StageInputsChangedError(
          f"{workdir} was built from inputs that have changed since: {', '.join(changed)}. "
          f"Delete {workdir} (and the stages after it) to rebuild it, or use another --workdir.")
    return
  paths.makedirs(workdir)
  _write_json_atomic(path, current)


def _describe(fingerprint) -> str:
  if not fingerprint:
    return "not recorded"
  if "step" in fingerprint:
    return f"step {fingerprint['step']}"
  return fingerprint.get("sha256", "")[:12] or f"no {fingerprint.get('missing')}"


def _train(config, workdir: str) -> None:
  table.get(config.stage).run(config, workdir)


def composite_stage(stage: str, preset: Preset, root: str) -> None:
  """A method's stage of several runs (`methods_lib.COMPOSITE`): HIR's rounds
  (`experiments.world.hindsight`) or the self-corrector's (`experiments.world.correction`),
  each from the SFT stage's config, or iterated RLHF's (`experiments.world.iterated`);
  `DIR/<stage>/done.json` names the final run once all are finished (what the stages after it
  fingerprint)."""
  done = paths.join(root, stage, OUTPUT_FILE[stage])
  if paths.exists(done):
    logging.info("[%s] already finished; skipping.", stage)
    return
  world_lib.write_feedback_files(paths.join(root, "world"))  # A world written before them.
  sft_config = stage_config("sft", preset, root)
  if stage == "hir":
    hindsight_lib.hir_stage(root, preset, sft_config, _train)
    final = hindsight_lib.final_policy_dir(root, preset)
  elif stage == "iterated":
    final = iterated_lib.iterated_stage(root, preset, comparisons=comparisons_stage,
                                        stage_config=stage_config, rm_num_steps=rm_num_steps,
                                        train=_train)
  else:
    settings = correction_settings(preset)
    correction_lib.correction_stage(root, preset, sft_config, _train, settings)
    final = correction_lib.final_corrector(root, settings)
  _write_json_atomic(done, {"policy": final, "step": run_lib.latest_step(final)})


def train_stage(stage: str, preset: Preset, root: str) -> None:
  if stage in methods_lib.METHODS["feedback"]:
    world_lib.write_feedback_files(paths.join(root, "world"))  # A world written before them.
  if stage in flan_lib.RUNS:
    # Enough rows per component that the full mixture is about an epoch of SFT's steps.
    flan_lib.write_flan_files(paths.join(root, "world"), preset.seed,
                              max(8, preset.sft_steps * 32 // 60))
  config = stage_config(stage, preset, root)
  workdir = paths.join(root, stage)
  if stage == beyond.BEST_OF_N and beyond.best_of_n_finished(workdir):
    logging.info("[%s] already finished; skipping.", stage)
    return
  if run_lib.finished(workdir, config.train.num_steps):
    logging.info("[%s] already finished; skipping.", stage)
    return
  _train(config, workdir)


# --- Non-training stages. -------------------------------------------------------------------


def _read_json(path: str) -> Any:
  return json.loads(paths.read_text(path))


def _write_json_atomic(path: str, obj: Any) -> None:
  paths.write_text_atomic(path, json.dumps(obj, indent=1))


def world_stage(preset: Preset, root: str) -> None:
  out = paths.join(root, "world")
  if paths.exists(paths.join(out, "world.json")):
    logging.info("[world] already written; skipping.")
    return
  world_lib.write_world(out, preset.world)


def _world(root: str):
  """The written world's file paths, facts and tokenizer."""
  world_dir = paths.join(root, "world")
  files = world_lib.files(world_dir)
  return files, world_lib.load_facts(world_dir), tokenization.load_tokenizer(files["tokenizer"])


def comparisons_stage(preset: Preset, root: str, policy_dir: str | None = None,
                      out: str | None = None, seed: int | None = None) -> None:
  """K samples per RM prompt of the SFT policy (or the run at `policy_dir`), ranked by a
  training (train split) or held-out labeler, into ROOT/comparisons (or `out`)."""
  out = out or paths.join(root, "comparisons")
  if paths.exists(paths.join(out, "stats.json")):
    logging.info("[comparisons] already made; skipping.")
    return
  paths.makedirs(out)
  files, facts, tokenizer = _world(root)
  policy = ev.load_policy(policy_dir or paths.join(root, "sft"))
  train_pool, heldout_pool = labelers_lib.make_pools(preset.labelers)
  seed = preset.seed if seed is None else seed
  rng = np.random.default_rng(seed)
  stats = {}
  for split, pool in (("train", train_pool), ("validation", heldout_pool)):
    records = paths.read_jsonl(files["rm_prompts"][split])
    prompts = [r["prompt"] for r in records]
    k = preset.responses_per_prompt
    answers = ev.generate(policy, tokenizer, [p for p in prompts for _ in range(k)], seed=seed +
                          (split == "validation"), temperature=preset.eval_temperature)
    rows, agree, pairs = [], 0, 0
    for i, prompt in enumerate(prompts):
      unique = {}
      for a in answers[i * k:(i + 1) * k]:
        if a.words and a.text not in unique:
          unique[a.text] = T.judge(prompt.split(), a.words, facts, a.ended)
      if len(unique) < 2:
        continue
      texts, scores = list(unique), list(unique.values())
      labeler = pool[rng.integers(len(pool))]
      ranking = labeler.rank([labeler.utility(s) for s in scores], rng)
      rows.append({
          "prompt": prompt, "responses": [" " + t for t in texts], "ranking": ranking,
          "labeler": labeler.id
      })
      # Agreement: a second labeler from the training pool judges each pair once.
      other = train_pool[rng.integers(len(train_pool))]
      position = {r: j for j, r in enumerate(ranking)}
      for x in range(len(texts)):
        for y in range(x + 1, len(texts)):
          second = other.prefers_first(other.utility(scores[x]), other.utility(scores[y]), rng)
          agree += second == (position[x] < position[y])
          pairs += 1
    path = paths.join(out, f"comparisons_{split}.jsonl")
    paths.write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))
    stats[split] = {
        "prompts": len(prompts), "comparisons": len(rows),
        "agreement_with_training_labeler": agree / max(pairs, 1), "pairs": pairs
    }
    logging.info("[comparisons] %s: %d ranked sets of %d prompts; labeler agreement %.3f", split,
                 len(rows), len(prompts), stats[split]["agreement_with_training_labeler"])
  _write_json_atomic(paths.join(out, "stats.json"), stats)


MODELS = ("base_small", "base_large", "sft", "ppo", "ppo_ptx")


def evaluate_stage(preset: Preset, root: str) -> None:
  out = paths.join(root, "evaluate")
  if paths.exists(paths.join(out, "results.json")):
    logging.info("[evaluate] already done; skipping.")
    return
  paths.makedirs(out)
  files, facts, tokenizer = _world(root)
  records = paths.read_jsonl(files["eval_prompts"])
  prompts, categories = [r["prompt"] for r in records], [r["category"] for r in records]
  _, judges = labelers_lib.make_pools(preset.labelers)
  texts = [r["text"] for r in paths.read_jsonl(files["pretrain"]["validation"])]
  examples = _few_shot_examples(files, facts)
  runs = {
      "base_small": "pretrain", "base_large": "pretrain_large", "sft": "sft", "ppo": "ppo",
      "ppo_ptx": "ppo_ptx"
  }
  few_shot = [ev.few_shot_prompt(p, examples[c]) for p, c in zip(prompts, categories)]
  results = {
      "preset": preset.name, "seed": preset.seed, "models": {}, "eval_prompts": len(prompts),
      "temperature": preset.eval_temperature
  }
  answers, scores = {}, {}
  for name, run in runs.items():
    policy = ev.load_policy(paths.join(root, run))
    base = name.startswith("base")
    inputs = few_shot if base else prompts
    answers[name] = ev.generate(policy, tokenizer, inputs, seed=preset.seed + 17,
                                temperature=preset.eval_temperature,
                                prompt_length=128 if base else 32,
                                stop_words=("request",) if base else ())
    scores[name] = ev.judge_all(prompts, answers[name], facts)
    results["models"][name] = {
        "run": run, "perplexity": ev.perplexity(policy, tokenizer, texts),
        "mean_utility": ev.mean_utility(scores[name], judges), **ev.rates(scores[name], categories)
    }
    logging.info("[evaluate] %s: utility %.3f, perplexity %.2f", name,
                 results["models"][name]["mean_utility"], results["models"][name]["perplexity"])
  for i, name in enumerate(MODELS):
    results["models"][name]["win_vs_sft"] = ev.win_rate(scores[name], scores["sft"], judges,
                                                        seed=preset.seed + 100 + i)
  results["ppo_ptx_vs_base_large"] = ev.win_rate(scores["ppo_ptx"], scores["base_large"], judges,
                                                 seed=preset.seed + 200)
  results["size_ratio"] = _non_embedding_params(preset.large) / _non_embedding_params(preset.small)
  results["over_optimization"] = {
      name: _over_optimization(root, name, preset, tokenizer, prompts, facts, judges)
      for name in ("ppo", "ppo_ptx")
  }
  results["rm"] = _rm_summary(root)
  results["samples"] = _samples(prompts, categories, answers, scores, judges)
  if "feedback" in preset.methods:
    results["pretraining_with_feedback"] = methods_lib.evaluate_feedback(
        root, preset, texts, prompts, categories, facts, judges, few_shot,
        files["tokenizer_control"], scores["sft"], ppo_ptx_scores=scores["ppo_ptx"])
  methods = results.setdefault("methods", {})
  if "feedback" in preset.methods:
    methods[methods_lib.FEEDBACK_RL] = methods_lib.evaluate_feedback_rl(
        root, preset, texts, prompts, categories, facts, judges, files["tokenizer_control"],
        scores["sft"], scores["ppo_ptx"])
  if "hir" in preset.methods:
    methods["hir"] = hindsight_lib.evaluate_hir(root, preset, texts, prompts, categories, facts,
                                                judges, scores["sft"], seed=preset.seed + 400,
                                                ppo_ptx_scores=scores["ppo_ptx"])
  if "flan" in preset.methods:
    results["flan"] = flan_lib.evaluate_flan(root, preset, prompts, categories, facts, judges,
                                             files["tokenizer"], examples)
    results["flan"]["rm"] = {s: _last_val(root, s, "val_accuracy") for s in ("rm", "rm_flan")}
    for i, (stage, label) in enumerate(
        (("sft_flan", "SFT from FLAN"), ("ppo_ptx_flan", "PPO-ptx from FLAN-SFT"))):
      row = methods_lib.evaluate_against_sft(root, preset, stage, tokenizer, (), texts, prompts,
                                             categories, facts, judges, scores["sft"],
                                             seed=preset.seed + 450 + i,
                                             ppo_ptx_scores=scores["ppo_ptx"])
      methods[stage] = {"label": label, **row}
  if "correction" in preset.methods:
    correction = correction_lib.evaluate_correction(root, preset, prompts, categories, facts,
                                                    judges, tokenizer, answers["sft"],
                                                    scores["sft"],
                                                    answers["base_large"], scores["base_large"],
                                                    correction_settings(preset),
                                                    ppo_ptx_scores=scores["ppo_ptx"])
    results["self_correction"] = correction
    for row in correction["passes"]:
      # The generator is the SFT policy: its text, and so its alignment tax, is SFT's.
      methods[f"correction_{row['pass']}"] = {
          "label": f"SFT + self-correction, {row['pass']} pass{'es' if row['pass'] > 1 else ''}",
          "perplexity": results["models"]["sft"]["perplexity"], **row
      }
  _evaluate_beyond(preset, root, results, tokenizer, prompts, categories, facts, judges, texts,
                   scores)
  if not methods:
    del results["methods"]
  _write_json_atomic(paths.join(out, "results.json"), results)


def _evaluate_beyond(preset, root, results, tokenizer, prompts, categories, facts, judges, texts,
                     scores) -> None:
  """DPO, RLOO, GRPO and best-of-N (`experiments.world.beyond`) as every method is judged, with
  their wall time, and the over-optimisation frontier of every method trained here."""
  stages = [s for s in methods_lib.stages(preset.methods) if s in beyond.LABELS]
  if not stages:
    return
  from instruct.reward import RewardModel
  rm = RewardModel.load(paths.join(root, "rm"))
  sft = ev.load_policy(paths.join(root, "sft"))
  timings_path = paths.join(root, "timings.json")
  timings = _read_json(timings_path) if paths.exists(timings_path) else {}
  methods = results["methods"]
  curves = dict(results["over_optimization"])
  best = None
  for i, stage in enumerate(stages):
    if stage == beyond.BEST_OF_N:
      best = beyond.evaluate_best_of_n(root, preset, tokenizer, prompts, categories, facts, judges,
                                       rm, scores["sft"], scores["ppo_ptx"],
                                       seed=preset.seed + 500 + i)
      row = dict(best["row"], perplexity=results["models"]["sft"]["perplexity"])
    else:
      final = paths.join(root, stage)
      if stage == "iterated":
        final = _read_json(paths.join(root, stage, OUTPUT_FILE[stage]))["policy"]
      row = methods_lib.evaluate_against_sft(root, preset, stage, tokenizer, (), texts, prompts,
                                             categories, facts, judges, scores["sft"],
                                             seed=preset.seed + 500 + i,
                                             ppo_ptx_scores=scores["ppo_ptx"], workdir=final)
      if stage == "iterated":  # PPO-ptx's path, then each round's checkpoints after it.
        curves[stage] = list(curves["ppo_ptx"])
        for r in range(1, iterated_lib.rounds(preset) + 1):
          curves[stage] += [
              dict(p, round=r) for p in beyond.kl_points(iterated_lib.policy_dir(
                  root, r), preset, tokenizer, prompts, facts, judges, rm, sft)[1:]
          ]
      else:
        curves[stage] = beyond.kl_points(final, preset, tokenizer, prompts, facts, judges, rm, sft)
    methods[stage] = {"label": beyond.LABELS[stage], **row, "wall_seconds": timings.get(stage)}
  results["frontier"] = beyond.frontier(curves, best["curve"] if best else None)


def _few_shot_examples(files, facts) -> dict[str, list[tuple[str, str]]]:
  """Two flawless solved examples per category (demonstrations the judge scores perfect)."""
  examples: dict[str, list] = {c: [] for c in T.CATEGORIES}
  for r in paths.read_jsonl(files["sft"]["validation"]):
    answer = r["completion"].split()
    scores = T.judge(r["prompt"].split(), answer, facts)
    if len(examples[r["category"]]) < 2 and all(scores[c] == 1 for c in T.COMPONENTS):
      examples[r["category"]].append((r["prompt"], " ".join(answer)))
  return examples


def _over_optimization(root, name, preset, tokenizer, prompts, facts, judges) -> list[dict]:
  """RM score, held-out labeler score and KL to the SFT policy at each saved checkpoint."""
  from instruct.reward import RewardModel
  return beyond.kl_points(paths.join(root, name), preset, tokenizer, prompts, facts, judges,
                          RewardModel.load(paths.join(root, "rm")),
                          ev.load_policy(paths.join(root, "sft")))


def _last_val(root: str, stage: str, key: str) -> float | None:
  evals = [r for r in metrics_lib.read_metrics(paths.join(root, stage)) if key in r]
  return evals[-1][key] if evals else None


def _rm_summary(root) -> dict:
  evals = [r for r in metrics_lib.read_metrics(paths.join(root, "rm")) if "val_loss" in r]
  last = evals[-1] if evals else {}
  stats = _read_json(paths.join(root, "comparisons", "stats.json"))
  return {
      "heldout_accuracy": last.get("val_accuracy"), "val_loss": last.get("val_loss"),
      "calibration": {k: v for k, v in last.items() if k.startswith("val_calibration")},
      "labeler_agreement_train": stats["train"]["agreement_with_training_labeler"],
      "labeler_agreement_heldout": stats["validation"]["agreement_with_training_labeler"],
      "comparisons": {s: stats[s]["comparisons"] for s in stats}
  }


def _samples(prompts, categories, answers, scores, judges, per_category: int = 1) -> list:
  out, seen = [], {}
  for i, (prompt, category) in enumerate(zip(prompts, categories)):
    if seen.get(category, 0) >= per_category:
      continue
    seen[category] = seen.get(category, 0) + 1
    out.append({
        "prompt": prompt, "category": category, "answers": {
            name: {
                "text": answers[name][i].text, "ended": answers[name][i].ended,
                "utility": ev.mean_utility([scores[name][i]],
                                           judges), **{k: scores[name][i][k] for k in T.COMPONENTS}
            } for name in MODELS
        }
    })
  return out


def report_stage(preset: Preset, root: str) -> None:
  results = _read_json(paths.join(root, "evaluate", "results.json"))
  timings_path = paths.join(root, "timings.json")
  timings = _read_json(timings_path) if paths.exists(timings_path) else {}
  report_lib.write_report(root, results, timings)
  paths.write_text_atomic(
      paths.join(root, "metrics.jsonl"),
      json.dumps({"step": preset.ppo_iterations, **summary_metrics(results)}) + "\n")


def summary_metrics(results: dict) -> dict[str, float]:
  """The run's headline numbers as one flat record (`DIR/metrics.jsonl`, what a sweep of the
  main job ranks and plots): per model its mean utility, perplexity and perplexity regression
  against base_small (the alignment tax); PPO's and PPO-ptx's win rate against SFT with its
  interval over prompts (`_low`, `_high`) and final KL to SFT; the reward model's accuracy."""
  regressions = report_lib.perplexity_regressions(results)
  out = {}
  for name in ("sft", "ppo", "ppo_ptx"):
    model = results["models"][name]
    out[f"{name}/mean_utility"] = model["mean_utility"]
    out[f"{name}/perplexity"] = model["perplexity"]
    out[f"{name}/perplexity_regression"] = regressions[name]["vs_base"]
  wins = {f"{n}/win_vs_sft": results["models"][n]["win_vs_sft"] for n in ("ppo", "ppo_ptx")}
  wins["ppo_ptx/win_vs_base_large"] = results["ppo_ptx_vs_base_large"]
  for name, row in results.get("methods", {}).items():
    wins[f"{name}/win_vs_sft"] = row["win_vs_sft"]
    out[f"{name}/perplexity_regression"] = row["perplexity"] - results["models"]["base_small"][
        "perplexity"]
  for key, win in wins.items():
    out.update({key: win["win_rate"], f"{key}_low": win["ci_low"], f"{key}_high": win["ci_high"]})
  for name in ("ppo", "ppo_ptx"):
    out[f"{name}/kl"] = results["over_optimization"][name][-1]["kl"]
  out["rm/heldout_accuracy"] = results["rm"]["heldout_accuracy"]
  for objective, row in results.get("pretraining_with_feedback", {}).items():
    out.update({f"feedback/{objective}/{k}": row[k] for k in ("misaligned", "perplexity")})
  return out


# --- The pipeline. --------------------------------------------------------------------------


class WorkdirError(ValueError):
  """The workdir belongs to a run of another preset, seed or PPO settings."""


def _describe_run(preset_name, seed, changed: dict) -> str:
  return " ".join([f"--preset={preset_name} --seed={seed}"]
                  + [f"--config.{k}={v}" for k, v in sorted(changed.items())])


def _claim_workdir(root: str, preset: Preset) -> None:
  """Records the preset, seed and PPO overrides in ROOT/run.json; refuses a workdir made with
  others.

  A finished stage is skipped on a rerun, so resuming with another seed or preset would
  silently report the old one's numbers under the new name. run.json also keeps where and
  from what code the run was made (for `experiments.results_table`).
  """
  path = paths.join(root, "run.json")
  changed = overrides(preset)
  if paths.exists(path):
    saved = _read_json(path)
    made = (saved.get("preset"), saved.get("seed"), saved.get("overrides", {}))
    if made != (preset.name, preset.seed, json.loads(json.dumps(changed))):
      raise WorkdirError(f"{root} was made with {_describe_run(*made)}, not "
                         f"{_describe_run(preset.name, preset.seed, changed)}; use another "
                         "--workdir (one per seed and setting).")
    return
  _write_json_atomic(
      path, {
          "preset": preset.name, "seed": preset.seed, "overrides": changed, **report_lib.provenance(
              os.path.dirname(CONFIGS_DIR)), "started": time.strftime("%Y-%m-%d %H:%M:%S %z")
      })


def run(root: str, preset_name: str = "quick", preset: Preset | None = None,
        seed: int | None = None, upstream: str = "") -> dict:
  """Runs (or resumes) every stage under `root`; returns the evaluation results.

  `seed` (default: the preset's) replaces the preset's and its world's seeds (`with_seed`).
  `upstream` (a run directory; relative to `root`) gives the stages before PPO
  (`reuse_upstream`).
  """
  preset = preset or PRESETS[preset_name]
  if seed is not None:
    preset = with_seed(preset, seed)
  paths.makedirs(root)
  lock = workdir_lib.lock(root)  # One pipeline per root (each stage also locks its own).
  try:
    _claim_workdir(root, preset)
    if upstream:
      reuse_upstream(root, upstream, preset)
    return _run_stages(root, preset, pipeline_stages(preset))
  finally:
    lock.release()


SHARED_STAGES = STAGES[:STAGES.index("rm") + 1]  # What no PPO setting changes.


def reuse_upstream(root: str, upstream: str, preset: Preset) -> None:
  """Copies the stages before PPO (`SHARED_STAGES`) from the run in `upstream` into `root`,
  building them there first, under that run's lock, where they are not finished.

  The trials of a sweep over PPO settings share one upstream: the first to arrive trains it
  (with the named preset's PPO settings and methods, which these stages do not read), the
  others wait for
  its lock and then copy. A copy lands under its final name only when complete.
  """
  if paths.is_url(upstream):
    raise ValueError(f"config.upstream={upstream}: must be a local directory.")
  source = os.path.normpath(os.path.join(root, upstream))
  if source == os.path.normpath(root):
    raise ValueError(f"config.upstream={upstream} is the run's own workdir {root}.")
  if all(os.path.isdir(os.path.join(root, s)) for s in SHARED_STAGES):
    return
  shared = dataclasses.replace(
      preset, methods=PRESETS[preset.name].methods, hir=(), correction=(), iterated=(),
      **{field: getattr(PRESETS[preset.name], field) for field in PPO_FIELDS.values()})
  lock = workdir_lib.lock_when_free(source)
  try:
    _claim_workdir(source, shared)
    _run_stages(source, shared, SHARED_STAGES, label="upstream ")
  finally:
    lock.release()
  timings_path = os.path.join(root, "timings.json")
  timings = _read_json(timings_path) if os.path.exists(timings_path) else {}
  upstream_timings = _read_json(os.path.join(source, "timings.json"))
  for stage in SHARED_STAGES:
    target = os.path.join(root, stage)
    if os.path.isdir(target):
      continue
    partial = target + ".copying"
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(os.path.join(source, stage), partial,
                    ignore=shutil.ignore_patterns(workdir_lib.LOCK_FILE))
    os.rename(partial, target)
    timings.setdefault(stage, upstream_timings.get(stage, 0.0))
  _write_json_atomic(timings_path, timings)
  logging.info("Stages %s copied from %s.", ", ".join(SHARED_STAGES), source)


def _run_stages(root: str, preset: Preset, stages: tuple[str, ...] = STAGES,
                label: str = "") -> dict | None:
  """Runs `stages` in order; returns the evaluation results once there are some."""
  timings_path = paths.join(root, "timings.json")
  timings = _read_json(timings_path) if paths.exists(timings_path) else {}
  steps: dict[str, Callable[[], None]] = {
      "world": lambda: world_stage(preset, root),
      "comparisons": lambda: comparisons_stage(preset, root), **{
          s: (lambda s=s: composite_stage(s, preset, root)) for s in methods_lib.COMPOSITE
      }, "evaluate": lambda: evaluate_stage(preset, root),
      "report": lambda: report_stage(preset, root)
  }
  total = time.time()
  for i, stage in enumerate(stages, 1):
    print(f"[{label}{i}/{len(stages)}] {stage} ...", file=sys.stderr, flush=True)
    start = time.time()
    check_inputs(root, stage, methods_lib.stages(preset.methods) if stage == "evaluate" else ())
    # A preempted stage raises loop.Preempted (after its checkpoint): the pipeline stops
    # there, and a rerun resumes that stage before anything is built on it.
    steps.get(stage, lambda s=stage: train_stage(s, preset, root))()
    elapsed = time.time() - start
    if elapsed > 1 or stage not in timings:
      timings[stage] = elapsed
      _write_json_atomic(timings_path, timings)
    print(
        f"[{label}{i}/{len(stages)}] {stage} done in {elapsed:.0f} s "
        f"(pipeline {time.time() - total:.0f} s)", file=sys.stderr, flush=True)
  results = paths.join(root, "evaluate", "results.json")
  return _read_json(results) if paths.exists(results) else None


def _job_config():
  """--config, or configs/instructgpt_mini.py with --preset and --seed."""
  if _CONFIG.value is None:
    config = config_lib.load_config_file(JOB_CONFIG, _PRESET.value)
    config.seed = _SEED.value
    return config
  given = [f"--{name}" for name in ("preset", "seed") if flags.FLAGS[name].present]
  if given:
    raise ValueError(f"{' and '.join(given)} with --config: give them in the config "
                     "(--config=configs/instructgpt_mini.py:PRESET --config.seed=N).")
  return _CONFIG.value


def main(argv):
  del argv
  cli.quiet_library_logs()
  if not _WORKDIR.value:
    raise ValueError("--workdir is required: the root directory of the pipeline's runs.")
  if jax.process_count() > 1:
    raise ValueError("the main job runs as one process (its world, comparisons and evaluation "
                     "are single-host CPU work); launch its stages with instruct.train to "
                     "train them over several processes.")
  if paths.is_url(_WORKDIR.value):
    raise ValueError(f"--workdir={_WORKDIR.value}: the main job's root must be a local "
                     "directory (its world is the stages' input files, read through local "
                     "paths); runs of instruct.train may write to a bucket.")
  config = _job_config()
  run(_WORKDIR.value, preset=preset_from_config(config), upstream=config.upstream)
  print(f"\nReport: {paths.join(_WORKDIR.value, 'report.md')}")


if __name__ == "__main__":
  cli.run(main)
