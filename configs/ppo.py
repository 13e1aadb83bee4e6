r"""PPO (and PPO-ptx) against a trained reward model, from an SFT policy.

  python -m instruct.train --config=configs/ppo.py:tiny --workdir=/tmp/ppo_tiny \
      --config.policy_from=/tmp/sft_tiny --config.reward_from=/tmp/rm_tiny

The policy and the frozen reference start from the SFT run's last checkpoint, the reward model
(with its stored normalisation) and the critic from the RM run's. Each iteration samples
responses to a batch of prompts with the jitted KV-cache sampler, scores them, and runs
`ppo.epochs` passes of clipped PPO over shuffled minibatches; with `ppo.ptx_coef` > 0 every
minibatch step also takes a pretraining LM gradient (PPO-ptx). Running the command again
resumes (policy, critic, both optimiser states, KL controller, rng, data positions).

Presets: `tiny` (CPU, embedded prompts and pretraining text), `tiny_ptx` (the same with
PPO-ptx), and for accelerator runs of the published architectures (policy and reward model
from `configs/sft.py:PRESET` / `configs/rm.py:PRESET` runs, whatever their size) `fsdp` and
`fsdp_ptx`:
  - mesh `(1, -1, 1)`: the four models (policy, reference, reward model, critic) are FSDP
    sharded over every device, and the rollout batch is split over all of them;
  - 512 prompts per iteration (InstructGPT's batch size) in 8 minibatches of 64, 4 PPO epochs,
    500 iterations (256k episodes); prompts of up to 512 tokens, 128 new tokens;
  - a fixed KL coefficient of 0.02 (InstructGPT's beta), learning rates 3e-6 (policy) and
    5e-6 (critic) after 10 iterations of warm-up (the schedules count minibatch updates:
    10 x 4 epochs x 8 minibatches), decayed linearly to 0;
  - `fsdp_ptx`: PPO-ptx with 64 fresh pretraining rows of 1024 tokens per epoch (8 per
    minibatch step; 256 per iteration) and `ptx_coef` 0.45, the paper's gamma = 27.8 under
    `ptx_gamma = ptx_coef * T * sigma_A` (instruct.rl.ppo.ptx_gamma_equivalent) for responses
    of T ~ 64 tokens and whitening-scale advantages (sigma_A ~ 1); a run logs the value it
    actually reaches as `ptx_gamma_equivalent`. Set `config.ptx.train_file` to pretraining
    text of the policy's domain ({"text"} JSON lines or .txt), which has no default here.
The policy's and critic's numerics (bf16, scan, remat) come from their runs. The learning
rates are starting points, not tuned values. benchmarks/memory.py gives the memory per
device.

Prompts from public data, read from a local copy in its published files (`config.data.format`,
see instruct/data/public.py), with the policy and reward model trained on the same data.
Anthropic HH-RLHF (each pair's dialogue up to its final "\n\nAssistant:"):

  python -m instruct.train --config=configs/ppo.py:tiny --workdir=/tmp/ppo_hh \
      --config.policy_from=/tmp/sft_hh --config.reward_from=/tmp/rm_hh \
      --config.data.tokenizer=/path/to/gpt2_tokenizer --config.data.format=hh_rlhf \
      --config.data.train_file=/data/hh-rlhf/helpful-base \
      --config.data.validation_file=/data/hh-rlhf/helpful-base \
      --config.data.prompt_length=512 --config.sampling.max_new_tokens=128

The filtered Reddit TL;DR queries ("SUBREDDIT: r/...\n\nTITLE: ...\n\nPOST: ...\n\nTL;DR:";
Stiennon et al. 2020):

  python -m instruct.train --config=configs/ppo.py:tiny --workdir=/tmp/ppo_tldr \
      --config.policy_from=/tmp/sft_tldr --config.reward_from=/tmp/rm_tldr \
      --config.data.tokenizer=/path/to/gpt2_tokenizer --config.data.format=tldr \
      --config.data.train_file=/data/tldr_3_filtered \
      --config.data.validation_file=/data/tldr_3_filtered \
      --config.data.prompt_length=512 --config.sampling.max_new_tokens=48

Prompts longer than `data.prompt_length` tokens keep their end. With PPO-ptx, point
`config.ptx.train_file` at pretraining text of the same domain.
"""

from instruct import config_lib
from instruct.rl import config as rl_config

PRESETS = ("tiny", "tiny_ptx", "fsdp", "fsdp_ptx")


def get_config(arg: str = "tiny"):
  """The PPO config for a preset name."""
  preset = config_lib.stage_arg(arg).preset
  if preset not in PRESETS:
    raise ValueError(f"Unknown preset {preset!r} for configs/ppo.py; use one of {PRESETS}.")
  config = rl_config.base_config("ppo")  # Every field, with the CPU-sized defaults.
  config.ppo.ptx_coef = 1.0 if preset.endswith("_ptx") else 0.0
  if preset.startswith("fsdp"):
    _accelerator(config)
  return config


def _accelerator(config) -> None:
  """The `fsdp` / `fsdp_ptx` settings (see the module docstring)."""
  config.mesh.shape = (1, -1, 1)
  config.data.prompt_length = 512
  config.sampling.max_new_tokens = 128
  config.train.global_batch_size = 512
  config.train.num_steps = 500
  config.train.checkpoint_every = 25
  config.ppo.num_minibatches = 8
  config.ppo.kl.controller = "fixed"
  config.ppo.kl.initial_beta = 0.02
  for opt, lr in ((config.optimizer, 3e-6), (config.value_optimizer, 5e-6)):
    opt.learning_rate = lr
    opt.warmup_steps = 10 * config.ppo.epochs * config.ppo.num_minibatches
  config.ptx.train_file = ""
  config.ptx.batch_size = 64
  if config.ppo.ptx_coef > 0:
    config.ppo.ptx_coef = 0.45  # gamma 27.8 / (T ~ 64 tokens * sigma_A ~ 1); see above.
  config.ptx.length = 1024


def sweep(add, arg: str = "tiny"):
  """Sweeps of `python -m instruct.sweep --config=configs/ppo.py:PRESET[,sweep=NAME]` (give
  `--config.policy_from` and `--config.reward_from` once to the sweep):
  - `ptx` (the default): the pretraining mix's coefficient 0, 0.5, 1, 2 (PPO vs PPO-ptx);
  - `kl`: a fixed KL coefficient beta of 0.01, 0.05, 0.2 (the reward / KL trade-off);
  - `lr`: the policy's learning rate x 0.3, 1, 3;
  - `seeds`: 0, 1, 2."""
  lr = get_config(arg).optimizer.learning_rate
  config_lib.add_sweep(
      add, arg, {
          "ptx": [{"ppo.ptx_coef": c} for c in (0.0, 0.5, 1.0, 2.0)],
          "kl": [{"ppo.kl.controller": "fixed", "ppo.kl.initial_beta": b} for b in (0.01, 0.05, 0.2)
                ],
          "lr": [{"optimizer.learning_rate": v} for v in config_lib.scaled(lr)],
          "seeds": [{"seed": s} for s in (0, 1, 2)],
      }, "configs/ppo.py")


def metrics():
  """What ranks a sweep's trials (the first) and what its summary shows."""
  return {"score": "max", "kl_k1": "min"}
