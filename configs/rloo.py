r"""RLOO (REINFORCE leave-one-out) against a trained reward model, from an SFT policy.

  python -m instruct.train --config=configs/rloo.py:tiny --workdir=/tmp/rloo_tiny \
      --config.policy_from=/tmp/sft_tiny --config.reward_from=/tmp/rm_tiny

Each iteration samples `rloo.samples_per_prompt` (k = 4) responses to each of
`train.global_batch_size` prompts (the rollout has k x the prompts), scores them with the
reward model as PPO does (normalised score, `rloo.no_eos_score` for responses without EOS)
minus beta times the summed per-token KL to the SFT reference (`rloo.kl_estimator`, fixed
beta `rloo.kl.initial_beta` = 0.05), and takes the leave-one-out baseline: response i's
advantage is R_i - mean_{j != i} R_j over the other responses to its prompt. No critic. The
default update (`rloo.epochs` = 1, `rloo.num_minibatches` = 1, `rloo.loss_aggregation` =
'sequence_sum') is REINFORCE, loss -A_i * sum_t log pi(y_it); more epochs or minibatches give
PPO's clipped ratio form (`rloo.clip_eps`). With `rloo.ptx_coef` > 0 every gradient step
also takes the pretraining LM loss (as PPO-ptx). Running the command again resumes.

Presets:
  - `tiny`: CPU, embedded prompts, 16 prompts x 4 responses per iteration;
  - `tiny_ptx`: the same with the pretraining mix (`ptx_coef` 1.0);
  - `fsdp` / `fsdp_ptx`: for accelerator runs of the published architectures, as
    configs/ppo.py's: mesh `(1, -1, 1)` (the three models FSDP-sharded over every device),
    prompts of up to 512 tokens, 128 new tokens, 64 prompts x 8 responses = 512 responses per
    iteration (PPO's 512 episodes) in 8 minibatches of 64 for one epoch, fixed beta 0.02,
    policy learning rate 3e-6 after 10 iterations of warm-up; `fsdp_ptx` adds PPO-ptx (set
    `config.ptx.train_file`). The learning rates are starting points, not tuned values.

Sweeps: `python -m instruct.sweep --config=configs/rloo.py:tiny[,sweep=NAME]` (see `sweep`).
The data options (public prompt sets, `config.data.format`) are those of configs/ppo.py.
"""

from instruct import config_lib
from instruct.rl import group

PRESETS = group.PRESETS


def get_config(arg: str = "tiny"):
  """The RLOO config for a preset name."""
  return group.preset_config("rloo", arg)


def sweep(add, arg: str = "tiny"):
  """Sweeps of `python -m instruct.sweep --config=configs/rloo.py:PRESET[,sweep=NAME]`:
  - `k` (the default): 2, 4, 8 responses per prompt;
  - `kl`: a fixed KL coefficient beta of 0.01, 0.05, 0.2;
  - `lr`: the policy's learning rate x 0.3, 1, 3;
  - `seeds`: 0, 1, 2."""
  lr = get_config(arg).optimizer.learning_rate
  config_lib.add_sweep(
      add, arg, {
          "k": [{"rloo.samples_per_prompt": k} for k in (2, 4, 8)],
          "kl": [{"rloo.kl.initial_beta": b} for b in (0.01, 0.05, 0.2)],
          "lr": [{"optimizer.learning_rate": v} for v in config_lib.scaled(lr)],
          "seeds": [{"seed": s} for s in (0, 1, 2)],
      }, "configs/rloo.py")


def metrics():
  """What ranks a sweep's trials (the first) and what its summary shows."""
  return {"score": "max", "kl_k1": "min"}
