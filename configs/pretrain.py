r"""Language-model pretraining on plain text (`{"text": ...}` JSON lines or .txt paragraphs).

The same step as SFT with the loss on every real token. Run:

  python -m instruct.train --config=configs/pretrain.py:tiny --workdir=/tmp/pretrain_tiny

Presets: `tiny`, `tiny_llama` (CPU); on accelerators (bf16, scanned and rematerialised
layers, FSDP over all devices; see `config_lib.apply_preset`) the published architectures
`gpt2`, `gpt2_medium`, `gpt2_large`, `gpt2_xl`, `pythia_1b`, `pythia_2_8b`, `pythia_6_9b`,
`llama_1b`, `llama_8b`, with published peak learning rates (below) and sequences of 1024
tokens (2048, their training context, for Pythia).
"""

from instruct import config_lib
from instruct.model.config import learning_rate


def get_config(arg: str = "tiny"):
  """The pretraining config for a preset name."""
  config = config_lib.base_config()
  config.stage = "pretrain"
  files = config_lib.embedded_files("pretrain")
  config.data.kind = "text"
  config.data.train_file = files["train"]
  config.data.validation_file = files["validation"]
  preset = config_lib.stage_arg(arg).preset
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
  `lr` (the default: the preset's learning rate x 0.3, 1, 3) and `seeds` (0, 1, 2)."""
  lr = get_config(arg).optimizer.learning_rate
  config_lib.add_sweep(
      add, arg, {
          "lr": [{"optimizer.learning_rate": v} for v in config_lib.scaled(lr)],
          "seeds": [{"seed": s} for s in (0, 1, 2)],
      }, "configs/pretrain.py")


def metrics():
  """What ranks a sweep's trials (the first) and what its summary shows."""
  return {"val_loss": "min", "loss": "min"}
