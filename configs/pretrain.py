r"""Language-model pretraining on plain text (`{"text": ...}` JSON lines or .txt paragraphs).

The same step as SFT with the loss on every real token. Run:

  python -m instruct.train --config=configs/pretrain.py:tiny --workdir=/tmp/pretrain_tiny

Presets: `tiny`, `tiny_llama` (CPU), `gpt2`, `llama_1b` (accelerators).
"""

from instruct import config_lib


def get_config(arg: str = "tiny"):
  """The pretraining config for a preset name."""
  config = config_lib.base_config()
  config.stage = "pretrain"
  files = config_lib.embedded_files("pretrain")
  config.data.kind = "text"
  config.data.train_file = files["train"]
  config.data.validation_file = files["validation"]
  preset = arg or "tiny"
  if config_lib.apply_preset(config, preset, "configs/pretrain.py"):
    config.train.num_steps = 100
    config.train.log_every = 10
    config.train.eval_every = 50
    config.train.checkpoint_every = 50
    config.optimizer.learning_rate = 3e-3
  else:
    config.data.buckets = (1024,)
    config.train.global_batch_size = 256
    config.train.num_steps = 100_000
    config.optimizer.learning_rate = 6e-4 if preset == "gpt2" else 3e-4
    config.optimizer.warmup_steps = 2000
    config.optimizer.weight_decay = 0.1
  return config
