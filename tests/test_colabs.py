"""Notebooks run top to bottom in a real Jupyter kernel on a finished run, so they cannot rot.

The run's root comes from the `pipeline_run` fixture (a session-scoped finished
`--preset=test` run of `experiments.instructgpt_mini`), or, for local development, from the
`INSTRUCT_TEST_RUN` environment variable (e.g. a copy of a finished run).
"""

import base64
import json
import os

import pytest

from experiments.world import report
from tests.conftest import check_stored_notebook, execute_notebook, notebook_outputs, notebook_stdout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "colabs", "explore_run.ipynb")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_root(request) -> str:
  """INSTRUCT_TEST_RUN if set, else the `pipeline_run` fixture (tests/conftest.py)."""
  if os.environ.get("INSTRUCT_TEST_RUN"):
    return os.environ["INSTRUCT_TEST_RUN"]
  return str(request.getfixturevalue("pipeline_run"))


@pytest.fixture(scope="module")
def results(run_root) -> dict:
  with open(os.path.join(run_root, "evaluate", "results.json")) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def executed(run_root):
  """The notebook executed top to bottom in a `python3` kernel (this interpreter's ipykernel)."""
  return execute_notebook(NOTEBOOK, {"INSTRUCT_RUN": run_root}, ROOT, timeout=300)


outputs, stdout = notebook_outputs, notebook_stdout


def test_notebook_is_nbformat_4_with_explanations():
  check_stored_notebook(NOTEBOOK, min_cells=6)


def test_explore_run_executes_without_errors(executed):
  assert not outputs(executed, "error")
  assert all(c.execution_count for c in executed.cells if c.cell_type == "code")


def test_explore_run_prints_the_results(executed, results, run_root):
  out = stdout(executed)
  assert f"run: {run_root}" in out
  w = results["models"]["ppo_ptx"]["win_vs_sft"]
  assert (f"PPO-ptx win rate vs SFT: {report.pct(w['win_rate'])} (95% CI {report.ci(w)}, "
          f"n = {w['n']})") in out
  w = results["ppo_ptx_vs_base_large"]
  assert f"PPO-ptx vs the larger base model: {report.pct(w['win_rate'])}" in out
  for t in report.targets(results):
    assert f"({t['id']}) {'met' if t['met'] else 'NOT met'} " in out
  for sample in results["samples"]:
    assert f"[{sample['category']}] {sample['prompt']}" in out
  for name, points in results["over_optimization"].items():
    assert sum(line.startswith(f"{name:8s} step") for line in out.splitlines()) == len(points)
  assert f"held-out accuracy {report.pct(results['rm']['heldout_accuracy'])}" in out
  for stage in report.TRAIN_STAGES:
    assert f"{stage}: " in out
  # The run layer opens the SFT and PPO-ptx runs (an RL run's policy has the SFT's shape).
  assert "sft: stage sft, step" in out and "ppo_ptx: stage rl, step" in out


def test_explore_run_shows_the_targets_table_and_plots(executed, results, run_root):
  markdown = [
      o.data["text/markdown"] for o in outputs(executed, "display_data")
      if "text/markdown" in o.data
  ]
  assert report.targets_markdown(results) in markdown
  images = [
      base64.b64decode(o.data["image/png"]) for o in outputs(executed, "display_data")
      if "image/png" in o.data
  ]
  has_calibration = report.rm_calibration(run_root, results) is not None
  # Win rates, training curves, over-optimisation, alignment tax, safety (+ calibration).
  assert len(images) == 5 + has_calibration
  assert all(image.startswith(PNG_MAGIC) and len(image) > 5000 for image in images)
  assert report.figure_png(report.plot_win_rates(results)) in images
