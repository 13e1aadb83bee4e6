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

Presets: `tiny`, `tiny_llama` (CPU, embedded comparisons), `gpt2`, `llama_1b`.
"""

from instruct import config_lib


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
  preset = arg or "tiny"
  if config_lib.apply_preset(config, preset, "configs/rm.py"):
    config.train.num_steps = 64             # 2 epochs of the 512 embedded comparisons.
    config.train.global_batch_size = 16
    config.train.log_every = 8
    config.train.eval_every = 32
    config.train.checkpoint_every = 32
    config.optimizer.learning_rate = 1e-3
    config.optimizer.warmup_steps = 4
  else:
    config.rm.max_responses = 9
    config.data.buckets = (512, 1024)
    config.train.global_batch_size = 64
    config.train.num_steps = 1000
    config.optimizer.learning_rate = 9e-6
    config.optimizer.warmup_steps = 50
  return config
