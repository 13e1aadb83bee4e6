r"""Language-model pretraining on plain text (`{"text": ...}` JSON lines or .txt paragraphs).

The same step as SFT with the loss on every real token. Run:

  python -m instruct.train --config=configs/pretrain.py:tiny --workdir=/tmp/pretrain_tiny

Presets: `tiny`, `tiny_llama` (CPU); on accelerators (bf16, scanned and rematerialised
layers, FSDP over all devices; see `config_lib.apply_preset`) the published architectures
`gpt2`, `gpt2_medium`, `gpt2_large`, `gpt2_xl`, `pythia_1b`, `pythia_2_8b`, `pythia_6_9b`,
`llama_1b`, `llama_8b`, with published peak learning rates (below) and sequences of 1024
tokens (2048, their training context, for Pythia).

Pretraining with human preferences (Korbak et al. 2023): `feedback=OBJECTIVE` in the argument
reads scored text (`config.data.kind='scored_text'`: documents cut into scored segments, see
instruct/data/feedback.py) and trains it with one of the paper's objectives, `mle`,
`filter`, `conditional`, `unlikelihood` or `rwr` (settings in `config.feedback`). Point the
data at scored files, e.g. the embedded world's (`python -m experiments.world.generate
--out=/tmp/world` writes them, and `tokenizer_control/`, its tokenizer with the control tokens):

  python -m instruct.train --config=configs/pretrain.py:tiny,feedback=conditional \
      --workdir=/tmp/pretrain_conditional --config.data.tokenizer=/tmp/world/tokenizer_control \
      --config.data.train_file=/tmp/world/pretrain_scored_train.jsonl \
      --config.data.validation_file=/tmp/world/pretrain_scored_validation.jsonl \
      --config.model.vocab_size=144

Validation reports every objective's plain likelihood of the held-out documents (`val_loss`,
`val_perplexity`), so the objectives compare on one scale.
"""

import dataclasses

from ml_collections import config_dict

from instruct import config_lib
from instruct.data import feedback
from instruct.model.config import learning_rate


def get_config(arg: str = "tiny"):
  """The pretraining config for a preset name."""
  arg = config_lib.parse_arg(arg, preset="tiny", sweep="", feedback="")
  config = config_lib.base_config()
  config.stage = "pretrain"
  files = config_lib.embedded_files("pretrain")
  config.data.kind = "text"
  config.data.train_file = files["train"]
  config.data.validation_file = files["validation"]
  # Read with data.kind='scored_text' only (see the module docstring).
  config.feedback = config_dict.ConfigDict(
      {k: v for k, v in dataclasses.asdict(feedback.Feedback()).items() if k != "seed"})
  if arg.feedback:
    config.data.kind = feedback.KIND
    config.feedback.objective = arg.feedback
    config.data.train_file = config.data.validation_file = ""
  preset = arg.preset
  if config_lib.apply_preset(config, preset, "configs/pretrain.py"):
    config.train.num_steps = 100
    config.train.log_every = 10
    config.train.eval_every = 50
    config.train.checkpoint_every = 50
    config.optimizer.learning_rate = 3e-3
  else:
    config.data.buckets = (2048,) if preset.startswith("pythia") else (1024,)
    config.train.global_batch_size = 256
    config.train.num_steps = 100_000
    config.optimizer.learning_rate = learning_rate(preset, "pretrain")
    config.optimizer.warmup_steps = 2000
    config.optimizer.weight_decay = 0.1
  return config


def sweep(add, arg: str = "tiny"):
  """Sweeps of `python -m instruct.sweep --config=configs/pretrain.py:PRESET[,sweep=NAME]`:
  `lr` (the default: the preset's learning rate x 0.3, 1, 3), `seeds` (0, 1, 2) and, with
  `feedback=...` and scored data, `objectives` (each of Korbak et al.'s)."""
  lr = get_config(arg).optimizer.learning_rate
  config_lib.add_sweep(
      add, arg, {
          "lr": [{"optimizer.learning_rate": v} for v in config_lib.scaled(lr)],
          "seeds": [{"seed": s} for s in (0, 1, 2)],
          "objectives": [{"feedback.objective": o} for o in feedback.OBJECTIVES],
      }, "configs/pretrain.py")


def metrics():
  """What ranks a sweep's trials (the first) and what its summary shows."""
  return {"val_loss": "min", "loss": "min"}
