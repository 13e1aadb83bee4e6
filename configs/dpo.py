r"""Direct preference optimisation (DPO) of an SFT policy on ranked comparisons.

  python -m instruct.train --config=configs/sft.py:tiny --workdir=/tmp/sft_tiny
  python -m instruct.train --config=configs/dpo.py:tiny --workdir=/tmp/dpo_tiny \
      --config.init_from=/tmp/sft_tiny

The policy starts from the SFT run's last checkpoint, and that checkpoint is also the frozen
reference pi_ref (loaded again on resume, never saved with the DPO run). The data are the reward
model's comparison records, any of:
  {"prompt", "responses": [...], "ranking": [best index, ..., worst index]}
  {"prompt", "chosen", "rejected"}
  {"prompt", "responses": [...], "best": index}
One batch element is one prompt with its K responses (padded to `config.rm.max_responses`, the
same key as the reward model's, since the same data code reads them); the K sequences are
scored by one forward pass of the policy and one of the reference, summing the log-probs of
the response tokens (not the prompt's). The implicit reward is
r = beta * (log pi - log pi_ref).

`config.dpo.loss` (instruct/preference.py):
  'dpo'            -log sigmoid(r_w - r_l) over every ranked pair, each prompt's pairs
                   weighted 1/(its pair count) (Rafailov et al. 2023); with
                   `config.dpo.label_smoothing` eps > 0, conservative DPO.
  'ipo'            (h - 1/(2 beta))^2 over the same pairs, h the log-ratio margin
                   (Azar et al. 2023).
  'plackett_luce'  listwise DPO: the Plackett-Luce likelihood of the whole ranking, ties as
                   unordered groups (Breslow), averaged over its terms; equal to 'dpo' for K=2.

Anthropic HH-RLHF pairs (a subset directory gives train.jsonl.gz and test.jsonl.gz), from an
SFT run on the same data:

  python -m instruct.train --config=configs/dpo.py:gpt2 --workdir=/tmp/dpo_hh \
      --config.init_from=/tmp/sft_hh --config.data.tokenizer=/path/to/gpt2_tokenizer \
      --config.data.format=hh_rlhf \
      --config.data.train_file=/data/hh-rlhf/helpful-base \
      --config.data.validation_file=/data/hh-rlhf/helpful-base

Other settings: `--config.dpo.beta=0.05`, `--config.dpo.loss=ipo`,
`--config.data.skip_invalid=True` (skip and count malformed rows).

Presets: `tiny`, `tiny_llama` (CPU, embedded comparisons); on accelerators (bf16, scanned and
rematerialised layers, FSDP over all devices; see `config_lib.apply_preset`) `gpt2`,
`gpt2_medium`, `gpt2_large`, `gpt2_xl`, `pythia_1b`, `pythia_2_8b`, `pythia_6_9b`,
`llama_1b`, `llama_8b`: use the preset of the SFT run given as `init_from` (its architecture
must match). Each step runs 64 prompts x up to 9 responses through the policy and the
reference; on few devices `--config.train.grad_accum_steps` splits them.

The run is a policy (head 'lm'): export, evaluation and `policy_from` take it like an SFT run.
"""

import ml_collections

from instruct import config_lib
from instruct import preference


# yapf: disable
def dpo_config() -> ml_collections.ConfigDict:
  """`config.dpo`: the DPO stage's own fields."""
  d = ml_collections.ConfigDict()
  d.loss = "dpo"             # 'dpo' | 'ipo' | 'plackett_luce' (instruct/preference.py).
  d.beta = 0.1               # Inverse temperature of the implicit reward; > 0.
  d.label_smoothing = 0.0    # 'dpo' only: the probability that a label is flipped (conservative
  # DPO), in [0, 0.5).
  return d
# yapf: enable


# yapf: disable
def get_config(arg: str = "tiny"):
  """The DPO config for a preset name."""
  config = config_lib.base_config()
  config.stage = "dpo"
  config.dpo = dpo_config()
  config.rm = ml_collections.ConfigDict()
  config.rm.max_responses = 4               # K_max of the comparison data (2..9), under the reward
  # model's key: the data code that reads both names it.
  files = config_lib.embedded_files("comparisons")
  config.data.kind = "comparisons"
  config.data.train_file = files["train"]
  config.data.validation_file = files["validation"]
  config.data.buckets = (64,)
  config.optimizer.schedule = "constant"    # After warmup (Rafailov et al. 2023).
  preset = config_lib.stage_arg(arg).preset
  if config_lib.apply_preset(config, preset, "configs/dpo.py"):
    config.train.num_steps = 32             # One epoch of the 512 embedded comparisons.
    config.train.global_batch_size = 16
    config.train.log_every = 8
    config.train.eval_every = 16
    config.train.checkpoint_every = 16
    config.optimizer.learning_rate = 1e-4
    config.optimizer.warmup_steps = 4
  else:
    config.rm.max_responses = 9
    config.data.buckets = (512, 1024)
    config.train.global_batch_size = 64
    config.train.num_steps = 1000           # Set to about one epoch of your comparisons.
    config.optimizer.learning_rate = 1e-6   # Rafailov et al. 2023: 1e-6, warmup 150 steps.
    config.optimizer.warmup_steps = 150
  return config
# yapf: enable


def sweep(add, arg: str = "tiny"):
  """Sweeps of `python -m instruct.sweep --config=configs/dpo.py:PRESET[,sweep=NAME]`: `lr`
  (the default: the preset's learning rate x 0.3, 1, 3), `beta` (0.03, 0.1, 0.3), `loss`
  (every preference loss) and `seeds` (0, 1, 2). A trial needs `--config.init_from` (an SFT
  run), given once to the sweep."""
  lr = get_config(arg).optimizer.learning_rate
  config_lib.add_sweep(
      add, arg, {
          "lr": [{"optimizer.learning_rate": v} for v in config_lib.scaled(lr)],
          "beta": [{"dpo.beta": v} for v in (0.03, 0.1, 0.3)],
          "loss": [{"dpo.loss": loss} for loss in sorted(preference.PREFERENCE_LOSSES)],
          "seeds": [{"seed": s} for s in (0, 1, 2)],
      }, "configs/dpo.py")


def metrics():
  """What ranks a sweep's trials (the first) and what its summary shows."""
  return {"val_accuracy": "max", "val_loss": "min", "val_token_kl": "min"}
