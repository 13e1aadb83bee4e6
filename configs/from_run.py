r"""The config a run saved (`RUN_DIR/config.json`): rerun or sweep one stage of a finished run.

  python -m instruct.train --config=configs/from_run.py:/tmp/instructgpt_mini/sft \
      --workdir=/tmp/sft_lr_sweep --config.optimizer.learning_rate=3e-3

Every stage writes its full config beside its checkpoints, so this reproduces the stage
exactly (same data files, model, seed), and any field can be overridden on the command line.
"""

import json
import os

import ml_collections


def _tuples(value):
  """JSON lists back to the tuples the configs use (buckets, mesh shape, sharding rules)."""
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  return value


def get_config(arg: str = ""):
  """The saved config of the run directory `arg`."""
  path = os.path.join(arg or ".", "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"configs/from_run.py:{arg}: no saved config at {path}; give the "
                            "directory of a run (it holds config.json).")
  with open(path) as f:
    saved = _tuples(json.load(f))
  model = saved.get("model")
  if isinstance(model, dict) and "attention_bias" in model and model["attention_bias"] is None:
    # As in config_lib.model_config: a typed placeholder stays settable from the command line.
    model["attention_bias"] = ml_collections.config_dict.placeholder(bool)
  return ml_collections.ConfigDict(saved)
