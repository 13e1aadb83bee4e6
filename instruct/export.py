r"""Exports a run's model as a Hugging Face checkpoint directory.

  python -m instruct.export --workdir=RUN_DIR --out=HF_DIR [--step=N] [--overwrite]

pretrain / sft / ppo runs give the policy as `...ForCausalLM`; an rm run gives a
`...ForSequenceClassification` with one label (its scalar head's bias and the reward
normalisation are recorded in config.json and README.md, see instruct/hf.py). The directory
holds config.json, model.safetensors (float32) and the run's tokenizer, and loads with
`transformers.AutoModelForCausalLM` / `AutoModelForSequenceClassification.from_pretrained`.
"""

from absl import app, flags, logging

from instruct import cli
from instruct import hf

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (pretrain, sft, ppo or rm).")
_OUT = flags.DEFINE_string("out", None, "Output directory for the Hugging Face checkpoint.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the latest).")
_FAMILY = flags.DEFINE_enum("family", None, list(hf.FAMILIES),
                            "HF architecture (default: inferred from the model config).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace files in a non-empty --out.")
flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
  cli.quiet_library_logs()
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    out = hf.export(_WORKDIR.value, _OUT.value, _STEP.value, family=_FAMILY.value,
                    overwrite=_OVERWRITE.value)
  except (ValueError, FileNotFoundError, FileExistsError, OSError) as e:
    logging.error("%s", e)
    raise SystemExit(f"error: {e}") from None
  print(f"Exported {_WORKDIR.value} to {out}")


if __name__ == "__main__":
  app.run(main)
