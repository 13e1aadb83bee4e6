r"""Reward model on K-wise ranked comparisons, initialised from an SFT run.

  python -m instruct.train --config=configs/rm.py:tiny --workdir=/tmp/rm_tiny \
      --config.init_from=/tmp/sft_tiny

The backbone comes from the SFT run's last checkpoint, the unembedding is replaced by a
scalar head (N(0, 1/sqrt(d+1)), bias 0), and the reward is read at the last token of
prompt+response. One batch element is one prompt with its K responses; all ranked pairs are
formed in the step (loss weighted 1/C(K,2) per prompt). After training, the reward bias that
makes demonstrations score mean 0 is stored with the final checkpoint.

Comparison records (JSON lines), any of:
  {"prompt", "responses": [...], "ranking": [best index, ..., worst index]}
  {"prompt", "chosen", "rejected"}
  {"prompt", "responses": [...], "best": index}

Public comparisons, read from a local copy in their published files (`config.data.format`,
see instruct/data/public.py). Anthropic HH-RLHF (chosen ranked above rejected; a subset
directory gives train.jsonl.gz and test.jsonl.gz; normalise the reward on its chosen
responses):

  python -m instruct.train --config=configs/rm.py:gpt2 --workdir=/tmp/rm_hh \
      --config.init_from=/tmp/sft_hh --config.data.tokenizer=/path/to/gpt2_tokenizer \
      --config.data.format=hh_rlhf \
      --config.data.train_file=/data/hh-rlhf/helpful-base \
      --config.data.validation_file=/data/hh-rlhf/helpful-base \
      --config.rm.normalization_format=hh_rlhf \
      --config.rm.normalization_file=/data/hh-rlhf/helpful-base

TL;DR summary comparisons of Stiennon et al. 2020 (the comparisons/ directory of batch*.json;
rows with split "train" are the train split, "valid1" and "valid2" the validation split, so
both paths are the directory; normalise on the TL;DR reference summaries):

  python -m instruct.train --config=configs/rm.py:gpt2 --workdir=/tmp/rm_tldr \
      --config.init_from=/tmp/sft_tldr --config.data.tokenizer=/path/to/gpt2_tokenizer \
      --config.data.format=summarize_from_feedback \
      --config.data.train_file=/data/summarize-from-feedback/comparisons \
      --config.data.validation_file=/data/summarize-from-feedback/comparisons \
      --config.rm.normalization_format=tldr \
      --config.rm.normalization_file=/data/tldr_3_filtered

`--config.rm.skip_invalid=True` skips (and counts) malformed rows, e.g. identical responses.

Presets: `tiny`, `tiny_llama` (CPU, embedded comparisons); on accelerators (bf16, scanned and
rematerialised layers, FSDP over all devices; see `config_lib.apply_preset`) `gpt2`,
`gpt2_medium`, `gpt2_large`, `gpt2_xl`, `pythia_1b`, `pythia_2_8b`, `pythia_6_9b`,
`llama_1b`, `llama_8b`: use the preset of the SFT run given as `init_from` (its architecture
must match). Each step runs 64 prompts x 9 responses (576 sequences of up to 1024 tokens); on
few devices `--config.train.grad_accum_steps` splits them (benchmarks/memory.py).
"""

from instruct import config_lib


# yapf: disable
def get_config(arg: str = "tiny"):
  """The reward-model config for a preset name."""
  config = config_lib.base_config()
  config.stage = "rm"
  config.rm = config_lib.rm_config()
  files = config_lib.embedded_files("comparisons")
  config.data.kind = "comparisons"
  config.data.train_file = files["train"]
  config.data.validation_file = files["validation"]
  config.data.buckets = (64,)
  config.optimizer.schedule = "linear"      # Annealed linearly to 0, one epoch (InstructGPT).
  config.optimizer.end_lr_fraction = 0.0
  preset = config_lib.stage_arg(arg).preset
  if config_lib.apply_preset(config, preset, "configs/rm.py"):
    config.train.num_steps = 32             # One epoch of the 512 embedded comparisons.
    config.train.global_batch_size = 16
    config.train.log_every = 8
    config.train.eval_every = 16
    config.train.checkpoint_every = 16
    config.optimizer.learning_rate = 1e-3
    config.optimizer.warmup_steps = 4
  else:
    config.rm.max_responses = 9
    config.data.buckets = (512, 1024)
    config.train.global_batch_size = 64
    config.train.num_steps = 1000           # Set to one epoch of your comparisons: records /
    # global_batch_size (InstructGPT: one epoch).
    config.optimizer.learning_rate = 9e-6
    config.optimizer.warmup_steps = 50
  return config
# yapf: enable


def sweep(add, arg: str = "tiny"):
  """Sweeps of `python -m instruct.sweep --config=configs/rm.py:PRESET[,sweep=NAME]`: `lr`
  (the default: the preset's learning rate x 0.3, 1, 3), `loss` (every ranking loss) and
  `seeds` (0, 1, 2). A trial needs `--config.init_from` (an SFT run) or
  `--config.rm.random_init=True`, given once to the sweep."""
  lr = get_config(arg).optimizer.learning_rate
  config_lib.add_sweep(
      add, arg, {
          "lr": [{"optimizer.learning_rate": v} for v in config_lib.scaled(lr)],
          "loss": [{"rm.loss": loss} for loss in sorted(config_lib.RANKING_LOSSES)],
          "seeds": [{"seed": s} for s in (0, 1, 2)],
      }, "configs/rm.py")


def metrics():
  """What ranks a sweep's trials (the first) and what its summary shows."""
  return {"val_accuracy": "max", "val_loss": "min"}
