"""Device meshes, logical-to-mesh rules and global arrays.

The mesh shape, its axis names and the rule table come from the experiment config
(`config.mesh`); model code only names logical axes. Meshes are built with explicit
`axis_types` (Auto: GSPMD propagation inside `jax.jit`, with shardings given at the jit
boundary and as logical constraints inside).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

Rules = tuple[tuple[str, Any], ...]

# The default rule table: FSDP shards weights over 'fsdp', tensor parallelism splits heads, MLP
# and vocabulary over 'tensor', and the batch is split over ('data', 'fsdp').
DEFAULT_RULES: Rules = (
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_kv", None),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("length", None),
    ("norm", None),
    ("layers", None),
)


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Fills one -1 entry with the remaining devices; errors name `config.mesh.shape`."""
  shape = tuple(int(s) for s in shape)
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"config.mesh.shape={shape}: use positive sizes and at most one -1.")
  known = math.prod(s for s in shape if s != -1)
  if num_devices % known:
    raise ValueError(
        f"config.mesh.shape={shape} does not divide the {num_devices} available devices "
        f"(the product of the fixed sizes is {known}).")
  shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != num_devices:
    raise ValueError(
        f"config.mesh.shape={shape} uses {math.prod(shape)} devices but {num_devices} are "
        "available; set one entry to -1 to use the rest.")
  return shape


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the mesh of `config.mesh` (shape, axis names) over `devices` (default: all)."""
  devices = list(jax.devices() if devices is None else devices)
  names = tuple(mesh_config.axis_names)
  if len(names) != len(mesh_config.shape):
    raise ValueError(f"config.mesh.axis_names={names} and config.mesh.shape="
                     f"{tuple(mesh_config.shape)} have different lengths.")
  axis_types = (AxisType.Auto,) * len(names)
  dcn = tuple(int(d) for d in (getattr(mesh_config, "dcn_shape", None) or ()))
  if dcn and math.prod(dcn) != 1:
    return Mesh(_hybrid_devices(mesh_config.shape, dcn, names, devices), names,
                axis_types=axis_types)
  shape = resolve_mesh_shape(mesh_config.shape, len(devices))
  if len(devices) == len(jax.devices()):
    return jax.make_mesh(shape, names, axis_types=axis_types)
  return Mesh(np.asarray(devices).reshape(shape), names, axis_types=axis_types)


def _hybrid_devices(ici_shape, dcn: tuple[int, ...], names, devices) -> np.ndarray:
  """Devices arranged for a mesh over several slices (MaxText's ICI x DCN split).

  `config.mesh.shape` is then the mesh inside one slice (fast interconnect, ICI; its -1 takes
  a slice's remaining devices) and `config.mesh.dcn_shape` how each axis repeats across
  slices (data-centre network, DCN): the mesh is their elementwise product. Slices are the
  devices' `slice_index` (TPU); where devices have none (GPU, CPU), each process is one.
  """
  if len(dcn) != len(names) or any(d < 1 for d in dcn):
    raise ValueError(f"config.mesh.dcn_shape={dcn}: expected {len(names)} positive sizes, one "
                     f"per mesh axis {names}.")
  slices = {getattr(d, "slice_index", 0) for d in devices}
  per_process = len(slices) == 1  # One slice (GPU and CPU devices are all slice 0): hosts.
  granules = {d.process_index for d in devices} if per_process else slices
  unit = "processes" if per_process else "slices"
  if len(granules) != math.prod(dcn):
    raise ValueError(f"config.mesh.dcn_shape={dcn} spans {math.prod(dcn)} slices, but the "
                     f"{len(devices)} devices are in {len(granules)} {unit}.")
  ici = resolve_mesh_shape(ici_shape, len(devices) // len(granules))
  return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=per_process)


def rules_from_config(mesh_config) -> Rules:
  """The logical-to-mesh rule table from `config.mesh.rules`, checked against the axis names."""
  names = set(mesh_config.axis_names)
  rules = tuple((str(logical), _as_mesh_axes(axes)) for logical, axes in mesh_config.rules)
  for logical, axes in rules:
    for axis in (axes if isinstance(axes, tuple) else (axes,)):
      if axis is not None and axis not in names:
        raise ValueError(f"config.mesh.rules maps {logical!r} to unknown mesh axis {axis!r}; "
                         f"mesh axes are {sorted(names)}.")
  return rules


def _as_mesh_axes(axes):
  if axes is None or isinstance(axes, str):
    return axes
  return tuple(axes)


def logical_sharding(mesh: Mesh, rules: Rules, logical_axes: Sequence[str | None]):
  """NamedSharding of one array given its logical axis names."""
  return NamedSharding(mesh, nn.logical_to_mesh_axes(tuple(logical_axes), rules))


def tree_shardings(mesh: Mesh, rules: Rules, abstract_boxed_tree):
  """Shardings for a (boxed, abstract) pytree whose leaves carry `nn.Partitioned` names.

  Unboxed leaves (step counters, optimiser scalars) are replicated.
  """
  specs = nn.get_partition_spec(abstract_boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
  """Sharding of host batches: the leading (batch) dimension over the 'act_batch' mesh axes."""
  return logical_sharding(mesh, rules, ("act_batch",))


def data_parallel_size(mesh: Mesh, rules: Rules) -> int:
  """How many ways the batch dimension is split."""
  spec = batch_sharding(mesh, rules).spec
  axes = spec[0] if spec else None
  if axes is None:
    return 1
  axes = axes if isinstance(axes, tuple) else (axes,)
  return math.prod(mesh.shape[a] for a in axes)


def host_batch_to_global(batch: dict[str, np.ndarray], sharding: NamedSharding):
  """Assembles each host's slice of the global batch into global jax arrays."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      batch)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
