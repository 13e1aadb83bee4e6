"""The repo has one formatter (yapf, configured in pyproject.toml) and every file follows it."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ("instruct", "configs", "experiments", "benchmarks", "tests", "setup.py")


def test_every_python_file_is_formatted_by_yapf():
  result = subprocess.run([sys.executable, "-m", "yapf", "--diff", "-r", "-p", *SOURCES], cwd=ROOT,
                          capture_output=True, text=True, check=False)
  changed = sorted(
      {line[4:].split("\t")[0] for line in result.stdout.splitlines() if line.startswith("--- ")})
  assert result.returncode == 0 and not changed, (
      f"Not formatted: {changed}; run `yapf -i -r -p {' '.join(SOURCES)}` from the repo root."
      f"\n{result.stderr}")
