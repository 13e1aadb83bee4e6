r"""Supervised fine-tuning (SFT) on demonstrations: loss on completion tokens only.

Run (tiny preset, embedded data, CPU in seconds):

  python -m instruct.train --config=configs/sft.py:tiny --workdir=/tmp/sft_tiny

Run it again to resume from the last checkpoint. Override any field on the command line:

  python -m instruct.train --config=configs/sft.py:tiny --workdir=/tmp/sft_tiny \
      --config.optimizer.learning_rate=3e-4 --config.train.num_steps=200

Presets (the argument after the colon): `tiny` (CPU), `tiny_llama` (the Llama-family layout at
tiny size), and on accelerators (bf16, scanned and rematerialised layers, FSDP over all
devices; see `config_lib.apply_preset`) the published architectures `gpt2` (124M),
`gpt2_medium` (355M), `gpt2_large` (774M), `gpt2_xl` (1.5B), `pythia_1b`, `pythia_2_8b`,
`pythia_6_9b`, `llama_1b` (Llama-3.2-1B), `llama_8b` (Llama-3.1-8B). Initialise
from a pretrained run with `--config.init_from=PRETRAIN_WORKDIR`, or from a Hugging Face
checkpoint of the same architecture with `--config.model.hf_checkpoint=DIR` (and its
tokenizer, `--config.data.tokenizer=DIR`).

Public data, read from a local copy in its published files (`config.data.format`, see
instruct/data/public.py; a directory is read per split). Anthropic HH-RLHF: demonstrations are
each pair's dialogue up to its final "\n\nAssistant:" and the chosen response; a subset
directory gives train.jsonl.gz (train) and test.jsonl.gz (validation); the repository root
reads every subset:

  python -m instruct.train --config=configs/sft.py:gpt2 --workdir=/tmp/sft_hh \
      --config.data.format=hh_rlhf --config.data.tokenizer=/path/to/gpt2_tokenizer \
      --config.data.train_file=/data/hh-rlhf/helpful-base \
      --config.data.validation_file=/data/hh-rlhf/helpful-base

The filtered Reddit TL;DR of Stiennon et al. 2020 (train.jsonl / valid.jsonl): the query
"SUBREDDIT: r/...\n\nTITLE: ...\n\nPOST: ...\n\nTL;DR:" and " " + the reference summary:

  python -m instruct.train --config=configs/sft.py:gpt2 --workdir=/tmp/sft_tldr \
      --config.data.format=tldr --config.data.tokenizer=/path/to/gpt2_tokenizer \
      --config.data.train_file=/data/tldr_3_filtered \
      --config.data.validation_file=/data/tldr_3_filtered

Add `--config.data.skip_invalid=True` to skip (and count) malformed rows instead of failing.

Instruction-tuning mixtures (FLAN): `mixture=DIR` in the argument trains on every
`NAME_train.jsonl` of DIR (with its `NAME_validation.jsonl`) as one weighted mixture
(`config.data.mixture`, instruct/data/mixture.py), equal weights to start from; reweight a
component with `--config.data.mixture.NAME.weight=W`. The embedded world's FLAN collection
(six task categories, five templates, zero- and few-shot; `python -m experiments.world.flan`):

  python -m experiments.world.generate --out=/tmp/world
  python -m experiments.world.flan --world=/tmp/world
  python -m instruct.train --config=configs/sft.py:tiny,mixture=/tmp/world/flan \
      --workdir=/tmp/flan --config.data.tokenizer=/tmp/world/tokenizer \
      --config.model.vocab_size=144 --config.data.buckets=128

Hindsight instruction relabeling (HIR, Zhang et al. 2023): `hir` in the argument reads
hindsight records (`config.data.kind='hindsight'`: demonstrations with a `satisfied` verdict,
see instruct/data/hindsight.py) and trains the relabeled likelihood plus the contrastive
instruction and entropy terms (`config.hindsight.alpha`, `beta`). The tokenizer needs the two
instruction tokens, e.g. the embedded world's `tokenizer_control/`; the main job's `hir`
method samples, judges and writes these records round after round
(experiments/world/hindsight.py):

  python -m instruct.train --config=configs/sft.py:tiny,hir --workdir=/tmp/hir \
      --config.data.tokenizer=/tmp/world/tokenizer_control --config.model.vocab_size=144 \
      --config.data.train_file=/tmp/hir_train.jsonl \
      --config.data.validation_file=/tmp/hir_validation.jsonl
"""

import dataclasses

from ml_collections import config_dict

from instruct import config_lib
from instruct.data import hindsight
from instruct.data import mixture
from instruct.model.config import learning_rate


def get_config(arg: str = "tiny"):
  """The SFT config for a preset name."""
  arg = config_lib.parse_arg(arg, preset="tiny", sweep="", hir=False, mixture="")
  config = config_lib.base_config()
  config.stage = "sft"
  # Read with data.kind='hindsight' only (see the module docstring).
  config.hindsight = config_dict.ConfigDict(dataclasses.asdict(hindsight.Hindsight()))
  if arg.hir:
    config.data.kind = hindsight.KIND
    config.data.train_file = config.data.validation_file = ""
  if arg.mixture:
    config.data.mixture = config_dict.ConfigDict(mixture.directory_mixture(arg.mixture))
    config.data.train_file = config.data.validation_file = ""
  preset = arg.preset
  if config_lib.apply_preset(config, preset, "configs/sft.py"):
    config.train.num_steps = 60
    config.train.global_batch_size = 16
    config.train.log_every = 10
    config.train.eval_every = 30
    config.train.checkpoint_every = 30
    config.optimizer.learning_rate = 3e-3
    config.optimizer.warmup_steps = 6
  else:
    # Point data.* at your demonstrations and a tokenizer matching the model's vocabulary.
    config.data.buckets = (256, 512, 1024)
    config.train.global_batch_size = 64
    config.train.num_steps = 2000
    config.optimizer.learning_rate = learning_rate(preset, "sft")
    config.optimizer.warmup_steps = 100
    config.optimizer.weight_decay = 0.1
  return config


def sweep(add, arg: str = "tiny"):
  """Sweeps of `python -m instruct.sweep --config=configs/sft.py:PRESET[,sweep=NAME]`: `lr`
  (the default: the preset's learning rate x 0.3, 1, 3), `lr_seeds` (those x seeds 0, 1) and
  `seeds` (0, 1, 2)."""
  lr = get_config(arg).optimizer.learning_rate
  config_lib.add_sweep(
      add, arg, {
          "lr": [{"optimizer.learning_rate": v} for v in config_lib.scaled(lr)],
          "lr_seeds": config_lib.grid(
              {"optimizer.learning_rate": config_lib.scaled(lr), "seed": (0, 1)}),
          "seeds": [{"seed": s} for s in (0, 1, 2)],
      }, "configs/sft.py")


def metrics():
  """What ranks a sweep's trials (the first) and what its summary shows."""
  return {"val_loss": "min", "val_accuracy": "max"}
