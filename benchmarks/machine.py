"""What machine a benchmark ran on (shared by the benchmark scripts)."""

import datetime
import os
import platform


def cpu_model() -> str:
  """The CPU model name from /proc/cpuinfo (else platform.processor())."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def run_record() -> dict:
  """When and where a benchmark ran: date, JAX version, devices, CPU and load average."""
  import jax  # Here, so that the PyTorch peer (peer_torch.py) can use `cpu_model` without JAX.
  devices = jax.devices()
  return {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "jax_version": jax.__version__, "platform": devices[0].platform,
      "device_kind": devices[0].device_kind, "device_count": len(devices), "cpu_model": cpu_model(),
      "cpu_count": os.cpu_count(), "load_average": list(os.getloadavg())
  }
