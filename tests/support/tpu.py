"""Ahead-of-time compiles for TPU chips through libtpu, on a machine with no TPU."""

import importlib.util

import jax
import pytest

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None, reason="libtpu not installed (the tpu extra)"
)


def compile_for_chip(fn, topology, *shapes_dtypes):
  """`fn` jitted and compiled for one chip of `topology` (e.g. "v5e:2x2"), its arguments given
  as (shape, dtype) pairs."""
  from jax.experimental import topologies

  device = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices[0]
  sharding = jax.sharding.SingleDeviceSharding(device)
  args = [jax.ShapeDtypeStruct(s, d, sharding=sharding) for s, d in shapes_dtypes]
  return jax.jit(fn).lower(*args).compile()
