"""Test setup: 8 fake CPU devices (set before jax is imported) so sharding is exercised."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (must come after XLA_FLAGS)
import pytest  # noqa: E402
from flax import linen as nn  # noqa: E402


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory) -> str:
  """One TFDS data directory for the whole test session (datasets are prepared once)."""
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="session")
def tokenizer():
  """The embedded tokenizer."""
  from instruct import data
  return data.load_tokenizer(data.DEFAULT_TOKENIZER)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
  """A TFDS data directory of the test module's own."""
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.hookimpl(trylast=True)  # After the tmpdir plugin's: its factory exists.
def pytest_configure(config):
  """JAX's persistent compilation cache for the test session: one directory, shared by the
  xdist workers and, through the environment, by the commands tests run in subprocesses.

  Much of the suite's time is XLA compiling the same small programs again: every
  `driver.train` or `trainer.train_and_evaluate` call, every command, every rerun that
  resumes. A hit is the executable XLA built for the same key (program, devices, compile
  options, XLA_FLAGS), so what a test computes does not change. Set before the test modules
  are imported (some copy `os.environ` then). No size limit: eviction rescans the directory
  on every write. Writes are not locked; an entry torn by two processes writing it at once
  fails its checksum when read (a warning) and the program is compiled again.
  """
  factory = getattr(config, "_tmp_path_factory", None)
  if factory is None:  # The tmpdir plugin is off (-p no:tmpdir): no cache.
    return
  shared = factory.getbasetemp()
  if hasattr(config, "workerinput"):  # An xdist worker: its basetemp is under the session's.
    shared = shared.parent
  settings = {
      "jax_compilation_cache_dir": str(shared / "jax_cache"),
      "jax_persistent_cache_min_compile_time_secs": 0.0,
  }
  for name, value in settings.items():
    jax.config.update(name, value)
    os.environ[name.upper()] = str(value)


def pytest_report_header(config):
  return f"jax {jax.__version__}, devices: {jax.device_count()} x {jax.devices()[0].platform}"


# --- Helpers shared by test modules (`from tests.conftest import ...`). ------------------


def write_lines(path, lines):
  """Writes `lines` to the `pathlib.Path` `path`, one a line (UTF-8); returns `path`."""
  path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
  return path


def wait_for_line(process, text, timeout=600):
  """Reads a `subprocess.Popen`'s stderr until a line holds `text`; returns the lines read."""
  import time
  seen, deadline = [], time.time() + timeout
  for line in process.stderr:
    seen.append(line)
    if text in line or time.time() > deadline:
      break
  assert any(text in line for line in seen), "".join(seen)[-3000:]
  return seen


def is_boxed(x) -> bool:
  """Whether `x` is a parameter boxed with its logical axis names (`nn.Partitioned`)."""
  return isinstance(x, nn.Partitioned)


def run_test_pipeline(root: str, tfds: str) -> str:
  """A finished `--preset=test` run of the main job under `root` (TFDS data in `tfds`)."""
  from experiments import instructgpt_mini
  previous = os.environ.get("TFDS_DATA_DIR")
  os.environ["TFDS_DATA_DIR"] = tfds
  try:
    instructgpt_mini.run(root, "test")
  finally:
    if previous is None:
      os.environ.pop("TFDS_DATA_DIR", None)
    else:
      os.environ["TFDS_DATA_DIR"] = previous
  return root


@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory, worker_id) -> str:
  """The root of a finished `--preset=test` pipeline run, made once per test session.

  Under pytest-xdist the workers share one run: the first to get the lock makes it, the
  others wait for it and read it (the run is read-only for tests).
  """
  import filelock
  shared = tmp_path_factory.getbasetemp()
  if worker_id != "master":
    shared = shared.parent
  root = str(shared / "pipeline_run")
  with filelock.FileLock(root + ".lock"):
    done = os.path.join(root, "report.md")
    if not os.path.exists(done):
      run_test_pipeline(root, str(shared / "pipeline_tfds"))
  return root


def execute_notebook(path: str, env: dict, root: str, timeout: int = 300):
  """The notebook at `path` executed top to bottom in a `python3` kernel (this interpreter's
  ipykernel), with `env` set in the environment the kernel inherits (then restored) and
  `root` as its working directory."""
  import nbformat
  from nbclient import NotebookClient
  notebook = nbformat.read(path, as_version=4)
  previous = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  try:
    NotebookClient(notebook, kernel_name="python3", timeout=timeout,
                   resources={"metadata": {"path": root}}).execute()
  finally:
    for key, value in previous.items():
      if value is None:
        os.environ.pop(key, None)
      else:
        os.environ[key] = value
  return notebook


def notebook_outputs(notebook, output_type=None):
  """The outputs of a notebook's code cells (of one type, e.g. 'stream', or all)."""
  return [
      o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs
      if output_type in (None, o.output_type)
  ]


def notebook_stdout(notebook) -> str:
  return "".join(o.text for o in notebook_outputs(notebook, "stream") if o.name == "stdout")


def check_stored_notebook(path: str, min_cells: int) -> None:
  """The notebook at `path` is valid nbformat 4 for a `python3` kernel, with at least
  `min_cells` markdown and code cells each, stored clean (no outputs, no counts)."""
  import nbformat
  notebook = nbformat.read(path, as_version=4)
  nbformat.validate(notebook)
  assert notebook.nbformat == 4
  assert notebook.metadata.kernelspec.name == "python3"
  kinds = [c.cell_type for c in notebook.cells]
  assert kinds.count("markdown") >= min_cells and kinds.count("code") >= min_cells
  code = [c for c in notebook.cells if c.cell_type == "code"]
  assert all(not c.outputs and c.execution_count is None for c in code)
