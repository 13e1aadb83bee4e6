r"""Exports a run's model as a Hugging Face checkpoint directory.

  python -m instruct.export --workdir=RUN_DIR --out=HF_DIR [--step=N] [--overwrite]
      [--dtype=float32|bfloat16] [--max_shard_size=5GB] [--mesh_shape=1,-1,1]

Runs whose stage makes a policy (pretrain, sft, rl) give it as `...ForCausalLM`; a reward
model (rm) gives a `...ForSequenceClassification` with one label (its scalar head's bias and
the reward normalisation are recorded in config.json and README.md, see
instruct/hf/exporting.py). The directory holds config.json, the weights (model.safetensors,
or model-0000k-of-0000n.safetensors files with model.safetensors.index.json past
--max_shard_size) and the run's tokenizer, and loads with
`transformers.AutoModelForCausalLM` / `AutoModelForSequenceClassification`.

The checkpoint is restored sharded over the run's mesh (its -1 entry takes the devices
present; --mesh_shape overrides it) and written one tensor at a time, so neither a device nor
the host holds the whole model. A failed export leaves --out as it was.
"""

from absl import flags

from instruct import cli
from instruct import hf

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (pretrain, sft, rl or rm).")
_OUT = flags.DEFINE_string("out", None, "Output directory for the Hugging Face checkpoint.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the latest).")
_FAMILY = flags.DEFINE_enum("family", None, list(hf.FAMILIES),
                            "HF architecture (default: inferred from the model config).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace files in a non-empty --out.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", sorted(hf.EXPORT_DTYPES),
                           "Weight dtype of the exported safetensors.")
_MAX_SHARD_SIZE = flags.DEFINE_string("max_shard_size", "5GB",
                                      "Largest safetensors file, e.g. 5GB, 500MB, 2GiB.")
_MESH_SHAPE = flags.DEFINE_list(
    "mesh_shape", None, "Mesh to restore the parameters over (default: the run's "
    "config.mesh.shape), e.g. 1,-1,1.")
flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
  del argv
  cli.quiet_library_logs()
  mesh_shape = None
  if _MESH_SHAPE.value:
    try:
      mesh_shape = tuple(int(x) for x in _MESH_SHAPE.value)
    except ValueError:
      raise ValueError(f"--mesh_shape={','.join(_MESH_SHAPE.value)}: expected integers, "
                       "e.g. 1,-1,1.") from None
  out = hf.export(_WORKDIR.value, _OUT.value, _STEP.value, family=_FAMILY.value,
                  overwrite=_OVERWRITE.value, dtype=_DTYPE.value,
                  max_shard_size=_MAX_SHARD_SIZE.value, mesh_shape=mesh_shape)
  print(f"Exported {_WORKDIR.value} to {out}")


if __name__ == "__main__":
  cli.run(main)
