"""Notebooks run top to bottom on a finished tiny run, so they cannot rot."""

import json
import os

from instruct import trainer
from tests.test_train import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_notebook(path: str) -> dict:
  """Executes the code cells of a notebook in one namespace; returns the namespace."""
  namespace = {"__name__": "__notebook__"}
  with open(path) as f:
    notebook = json.load(f)
  for cell in notebook["cells"]:
    if cell["cell_type"] == "code":
      exec(compile("".join(cell["source"]), path, "exec"), namespace)  # noqa: S102
  return namespace


def test_explore_run_notebook_reads_a_finished_run(tmp_path, tfds_dir, monkeypatch, capsys):
  workdir = str(tmp_path / "run")
  trainer.train_and_evaluate(tiny_config(tfds_dir, num_steps=4, eval_every=4), workdir)
  monkeypatch.setenv("INSTRUCT_WORKDIR", workdir)
  namespace = run_notebook(os.path.join(ROOT, "colabs", "explore_run.ipynb"))
  assert [r["step"] for r in namespace["train"]] == [2, 4]
  assert [r["step"] for r in namespace["val"]] == [4]
  assert "stage: sft" in capsys.readouterr().out
