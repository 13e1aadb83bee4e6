"""Test setup: 8 fake CPU devices (set before jax is imported) so sharding is exercised."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (must come after XLA_FLAGS)
import pytest  # noqa: E402


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


def pytest_report_header(config):
  return f"jax {jax.__version__}, devices: {jax.device_count()} x {jax.devices()[0].platform}"
