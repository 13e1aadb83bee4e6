r"""The main job (`experiments.instructgpt_mini`) as a config: its preset, seed and the PPO
settings a sweep varies.

  python -m experiments.instructgpt_mini --config=configs/instructgpt_mini.py:quick \
      --workdir=/tmp/mini --config.seed=1 --config.ppo.ptx_coef=4

is the same run as `--preset=quick --seed=1` with PPO-ptx's pretraining coefficient 4. The
config argument is `PRESET[,sweep=NAME]`, PRESET one of quick (the default), full and test.

Fields:
  preset, seed      the pipeline's sizes and its seed (as --preset / --seed)
  ppo.kl_beta       the fixed KL coefficient of PPO and PPO-ptx (default 0.05)
  ppo.ptx_coef      PPO-ptx's pretraining-loss coefficient (default 1.0; PPO keeps 0)
  ppo.learning_rate the policy's learning rate (default: the preset's)
  ppo.iterations    PPO iterations (default: the preset's)
  methods           other routes to alignment to add, comma-separated, or `all` (default:
                    the preset's, none in quick and test, all in full; "" for none):
                    `feedback` (pretraining with human preferences, Korbak et al. 2023),
                    `flan` (instruction-tuning mixtures), `hir` (hindsight instruction
                    relabeling), `correction` (self-correction), `dpo` (DPO on every ranked
                    pair and its K-wise Plackett-Luce form), `critic_free` (RLOO and GRPO),
                    `best_of_n`, `iterated` (iterated RLHF); each adds its stages, a
                    report section and rows in "Every method against SFT"
                    (experiments/world/methods.py)
  hir.KEY           HIR's settings (default: the preset's; experiments/world/hindsight.py):
                    rounds, samples_per_prompt, steps_per_round, learning_rate, alpha
                    (contrastive term), beta (entropy bonus), validation_prompts
  correction.KEY    self-correction's (instruct/data/correction.py `Correction`): samples,
                    prompts, validation_fraction, pairs_per_prompt, alpha (improvement),
                    beta (proximity), rounds, steps, learning_rate, temperature, passes,
                    keep_perfect
  iterated.KEY      iterated RLHF's (experiments/world/iterated.py): rounds (default 2),
                    iterations (PPO-ptx iterations per round; default half the preset's)
  upstream          a run directory whose stages before PPO (world .. rm) this run copies
                    instead of training them; they are built there first (under its lock)
                    when they are not. A relative path is taken from the workdir. Only runs
                    of the same preset and seed share it.

Sweeps (`python -m instruct.sweep --config=configs/instructgpt_mini.py:quick[,sweep=NAME]
--workdir=DIR`; each trial is a run of the main job in DIR/trials/NAME):
  ptx (the default)  ppo.ptx_coef 0.25, 1, 4, 16: the paper's trade-off between the
                     preference win rate and the regression on pretraining text
  kl                 ppo.kl_beta 0.01, 0.05, 0.2
  seeds              seed 0, 1, 2 (each its own world; pool them with
                     experiments.results_table)
The `ptx` and `kl` trials share one upstream, DIR/upstream (each sets `upstream=../../upstream`,
from DIR/trials/NAME): the world, base models, SFT, comparisons and reward model are trained once,
so the trials differ only in what the sweep varies.
"""

import dataclasses

from ml_collections import config_dict

from instruct import config_lib
from instruct.data import correction

_TYPES = {"int": int, "float": float, "bool": bool, int: int, float: float, bool: bool}

SHARED_UPSTREAM = "../../upstream"
# What runs a trial of this config's sweeps (instruct.sweep's default --command).
SWEEP_COMMAND = "python -m experiments.instructgpt_mini"


def get_config(arg: str = "quick"):
  arg = config_lib.parse_arg(arg, preset="quick", sweep="")
  config = config_dict.ConfigDict()
  config.preset = arg.preset
  config.seed = 0
  config.ppo = config_dict.ConfigDict()
  config.ppo.kl_beta = 0.05
  config.ppo.ptx_coef = 1.0
  config.ppo.learning_rate = config_dict.placeholder(float)
  config.ppo.iterations = config_dict.placeholder(int)
  config.upstream = ""
  config.methods = config_dict.placeholder(str)  # None: the preset's.
  # The methods' settings; None keeps the method's default for the preset.
  config.hir = config_dict.ConfigDict({
      k: config_dict.placeholder(t)
      for k, t in (("rounds", int), ("samples_per_prompt", int), ("steps_per_round", int),
                   ("learning_rate", float), ("alpha", float), ("beta",
                                                                float), ("validation_prompts", int))
  })
  config.correction = config_dict.ConfigDict({
      f.name: config_dict.placeholder(_TYPES[f.type])
      for f in dataclasses.fields(correction.Correction)
  })
  config.iterated = config_dict.ConfigDict(
      {"rounds": config_dict.placeholder(int), "iterations": config_dict.placeholder(int)})
  return config


def sweep(add, arg: str = "quick"):
  """The named sweeps of the module docstring."""
  config_lib.add_sweep(
      add, arg, {
          "ptx": [{"ppo.ptx_coef": c, "upstream": SHARED_UPSTREAM} for c in (0.25, 1.0, 4.0, 16.0)],
          "kl": [{"ppo.kl_beta": b, "upstream": SHARED_UPSTREAM} for b in (0.01, 0.05, 0.2)],
          "seeds": [{"seed": s} for s in (0, 1, 2)],
      }, "configs/instructgpt_mini.py")


def metrics():
  """What ranks a sweep's trials (the first) and what its summary plots against each swept
  value: PPO-ptx's and PPO's win rate against SFT (held-out labelers, with intervals over
  prompts) and their perplexity regression against the base model."""
  return {
      "ppo_ptx/win_vs_sft": "max", "ppo_ptx/perplexity_regression": "min", "ppo/win_vs_sft": "max",
      "ppo/perplexity_regression": "min"
  }
