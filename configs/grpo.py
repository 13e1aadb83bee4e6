r"""GRPO (group relative policy optimisation) against a trained reward model, from SFT.

  python -m instruct.train --config=configs/grpo.py:tiny --workdir=/tmp/grpo_tiny \
      --config.policy_from=/tmp/sft_tiny --config.reward_from=/tmp/rm_tiny

Each iteration samples `grpo.samples_per_prompt` (k = 4) responses to each of
`train.global_batch_size` prompts, scores them with the reward model as PPO does
(normalised score, `grpo.no_eos_score` for responses without EOS) and normalises each
response's reward within its group: A_i = (R_i - mean) / (std + `grpo.std_eps`), on every
token. No critic. The loss is PPO's clipped ratio objective (`grpo.clip_eps`) aggregated as
the paper does (`grpo.loss_aggregation` = 'sequence_mean': mean over a response's tokens,
then over responses; 'token_mean' is DAPO's) plus beta times the k3 estimate of the KL to
the SFT reference (`grpo.kl_in` = 'loss', fixed beta `grpo.kl.initial_beta` = 0.04, the
paper's); `grpo.kl_in='reward'` subtracts beta * sum_t KL_t from R_i instead (as RLOO). The
default update is one epoch of one minibatch (the paper's single update per rollout; the
ratio is then 1); more make the clip matter. `grpo.ptx_coef` > 0 adds the pretraining LM
loss to every gradient step (as PPO-ptx). Running the command again resumes.

Presets: `tiny` (CPU, 16 prompts x 4 responses), `tiny_ptx` (with the pretraining mix),
`fsdp` / `fsdp_ptx` (accelerator runs of the published architectures: as configs/rloo.py's,
64 prompts x 8 responses in 8 minibatches of 64, fixed beta 0.02, learning rate 3e-6; set
`config.ptx.train_file` for `fsdp_ptx`). The learning rates are starting points.

Sweeps: `python -m instruct.sweep --config=configs/grpo.py:tiny[,sweep=NAME]` (see `sweep`).
The data options (public prompt sets, `config.data.format`) are those of configs/ppo.py.
"""

from instruct import config_lib
from instruct.rl import group

PRESETS = group.PRESETS


def get_config(arg: str = "tiny"):
  """The GRPO config for a preset name."""
  return group.preset_config("grpo", arg)


def sweep(add, arg: str = "tiny"):
  """Sweeps of `python -m instruct.sweep --config=configs/grpo.py:PRESET[,sweep=NAME]`:
  - `kl_in` (the default): the KL as a k3 loss term or in the reward;
  - `k`: 2, 4, 8 responses per prompt;
  - `kl`: a fixed KL coefficient beta of 0.01, 0.04, 0.2;
  - `lr`: the policy's learning rate x 0.3, 1, 3;
  - `seeds`: 0, 1, 2."""
  lr = get_config(arg).optimizer.learning_rate
  config_lib.add_sweep(
      add, arg, {
          "kl_in": [{"grpo.kl_in": "loss"}, {"grpo.kl_in": "reward", "grpo.kl_estimator": "k1"}],
          "k": [{"grpo.samples_per_prompt": k} for k in (2, 4, 8)],
          "kl": [{"grpo.kl.initial_beta": b} for b in (0.01, 0.04, 0.2)],
          "lr": [{"optimizer.learning_rate": v} for v in config_lib.scaled(lr)],
          "seeds": [{"seed": s} for s in (0, 1, 2)],
      }, "configs/grpo.py")


def metrics():
  """What ranks a sweep's trials (the first) and what its summary shows."""
  return {"score": "max", "kl_k1": "min"}
