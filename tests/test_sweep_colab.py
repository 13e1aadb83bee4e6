"""colabs/explore_sweep.ipynb runs top to bottom in a real Jupyter kernel on a sweep directory.

The sweep is built here in the real formats without training anything: `trials.json` from
`instruct.sweeps.write_trials`, a status file per trial, each trial's `metrics.jsonl` with
deterministic synthetic curves (the loss falls faster with a larger learning rate), and the
comparison written by `instruct.sweep_summary.write`.
"""

import base64
import json
import math
import os

import pytest

from instruct import sweeps as sweep_lib
from instruct import sweep_summary
from tests.conftest import check_stored_notebook, execute_notebook, notebook_outputs, notebook_stdout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "colabs", "explore_sweep.ipynb")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CONFIG = "configs/sft.py:tiny"
FLAGS = ["--config.train.num_steps=40"]
METRICS = {"val_loss": "min", "val_accuracy": "max"}
OVERRIDES = [
    {"optimizer.learning_rate": 0.001, "seed": 0},
    {"optimizer.learning_rate": 0.01, "seed": 0},
    {"optimizer.learning_rate": 0.01, "seed": 1},
]
FAILED_AT = 20  # The third trial fails after this step.
ERROR = "FloatingPointError: the loss is nan at step 21"


def synthetic_records(lr: float, seed: int, last_step: int) -> list[dict]:
  """A training record every 2 steps and an evaluation record every 10 (and at the end)."""
  records = []
  for step in range(2, last_step + 1, 2):
    loss = 2.0 + 3.0 * math.exp(-10 * lr * step) + 0.05 * seed
    records.append({"step": step, "loss": loss, "learning_rate": lr})
    if step % 10 == 0 or step == last_step:
      records.append({"step": step, "val_loss": loss + 0.1, "val_accuracy": 1.0 - loss / 10})
  return records


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
  """A finished sweep of three trials (two done, one failed) and its summary."""
  sweep_dir = str(tmp_path_factory.mktemp("sweep"))
  names = sweep_lib.trial_names(OVERRIDES)
  trials = [sweep_lib.Trial(n, o) for n, o in zip(names, OVERRIDES)]
  sweep_lib.write_trials(sweep_dir, CONFIG, trials, FLAGS)
  os.makedirs(os.path.join(sweep_dir, "status"))
  for i, trial in enumerate(trials):
    failed = i == 2
    status = {
        "status": "failed" if failed else "done", "runs": 2 if failed else 1,
        "failures": 2 if failed else 0, "errors": [ERROR, ERROR] if failed else [],
        "wall_seconds": 30.0 + i
    }
    with open(os.path.join(sweep_dir, "status", f"{trial.name}.json"), "w") as f:
      json.dump(status, f)
    workdir = os.path.join(sweep_dir, "trials", trial.name)
    os.makedirs(workdir)
    records = synthetic_records(trial.overrides["optimizer.learning_rate"], trial.overrides["seed"],
                                FAILED_AT if failed else 40)
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in records)
  summary = sweep_summary.write(sweep_dir, trials, METRICS)
  return sweep_dir, trials, summary


@pytest.fixture(scope="module")
def executed(sweep):
  """The notebook executed top to bottom in a `python3` kernel (this interpreter's ipykernel)."""
  sweep_dir, _, _ = sweep
  return execute_notebook(NOTEBOOK, {"INSTRUCT_SWEEP": sweep_dir}, ROOT, timeout=120)


outputs, stdout = notebook_outputs, notebook_stdout


def test_notebook_is_nbformat_4_with_explanations():
  check_stored_notebook(NOTEBOOK, min_cells=5)


def test_the_synthetic_sweep_ranks_the_fastest_run_first(sweep):
  sweep_dir, trials, summary = sweep
  assert summary == sweep_summary.load(sweep_dir)
  assert [r["name"] for r in summary["trials"]] == [trials[i].name for i in (1, 2, 0)]
  assert summary["best"] == os.path.join(sweep_dir, "trials", trials[1].name)
  assert summary["counts"]["done"] == 2 and summary["counts"]["failed"] == 1


def test_explore_sweep_executes_without_errors(executed):
  assert not outputs(executed, "error")
  assert all(c.execution_count for c in executed.cells if c.cell_type == "code")


def test_explore_sweep_prints_the_table_and_the_best_trial(executed, sweep):
  sweep_dir, trials, summary = sweep
  out = stdout(executed)
  best = summary["trials"][0]
  assert f"sweep: {sweep_dir}" in out
  assert f"progress: {summary['progress']}" in out
  for rank, row in enumerate(summary["trials"], 1):
    line = next(line for line in out.splitlines() if f" {row['name']} " in line)
    assert line.split()[:4] == [str(rank), row["name"], row["status"], str(row["steps"])]
  assert f"best trial: {trials[1].name} (val_loss {best['metrics']['val_loss']['best']:.4g})" in out
  assert f"workdir: {summary['best']}" in out
  assert f"overrides: {json.dumps(trials[1].overrides)}" in out
  assert f"{trials[2].name} (failed, 2 runs): {ERROR}" in out
  assert (f"resume: python -m instruct.sweep --config={CONFIG} --workdir={sweep_dir} "
          f"{' '.join(FLAGS)}") in out


def test_explore_sweep_shows_the_curves_and_one_plot_per_swept_key(executed):
  images = [
      base64.b64decode(o.data["image/png"]) for o in outputs(executed, "display_data")
      if "image/png" in o.data
  ]
  # The curves, then the ranking metric against optimizer.learning_rate and against seed.
  assert len(images) == 3
  assert all(image.startswith(PNG_MAGIC) and len(image) > 5000 for image in images)
