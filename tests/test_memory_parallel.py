"""memjax.ops.memory_parallel: the lookup with the table's columns split over a mesh axis equals
the unsharded op, and keeps the table's gradient on its devices."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lookup_impls import IMPLS
from memjax.ops import embedding_bag
from memjax.ops.memory_parallel import sharded_embedding_bag

MESHES = [  # (data, fsdp, memory) over the 8 test devices
    (8, 1, 1), (1, 8, 1), (2, 1, 4), (1, 2, 4), (1, 1, 8),
]
AXES = ("data", "fsdp", "memory")


def case(seed=0, slots=300, dim=64, tokens=64, bag=24):
  rng = np.random.default_rng(seed)
  values = jnp.asarray(rng.standard_normal((slots, dim)), jnp.float32)
  idx = jnp.asarray(rng.choice(rng.choice(slots, 40), (tokens, bag)), jnp.int32)  # duplicates
  w = jnp.asarray(rng.random((tokens, bag)), jnp.float32)
  cot = jnp.asarray(rng.standard_normal((tokens, dim)), jnp.float32)
  return values, idx, w, cot


def make_mesh(shape):
  return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Explicit,) * 3)


def placed(mesh, values, idx, w, cot):
  P, put = jax.sharding.PartitionSpec, jax.device_put
  tokens = jax.sharding.NamedSharding(mesh, P(AXES))
  return (
      put(values, jax.sharding.NamedSharding(mesh, P(None, "memory"))),
      put(idx, tokens), put(w, tokens), put(cot, tokens),
  )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_equals_the_unsharded_lookup_and_its_gradients(shape, impl):
  values, idx, w, cot = case()
  mesh = make_mesh(shape)
  bag = lambda v, i, w: sharded_embedding_bag(
      v, i, w, mesh=mesh, token_axes=AXES, memory_axis="memory", impl=impl
  )
  loss = lambda f: lambda v, w, i, c: jnp.sum(f(v, i, w) * c)
  got_out = jax.jit(bag)(*placed(mesh, values, idx, w, cot)[:3])
  v_p, i_p, w_p, c_p = placed(mesh, values, idx, w, cot)
  got = jax.jit(jax.grad(loss(bag), argnums=(0, 1)))(v_p, w_p, i_p, c_p)
  want_out = embedding_bag(values, idx, w, impl=impl)
  want = jax.grad(loss(lambda v, i, w: embedding_bag(v, i, w, impl=impl)), argnums=(0, 1))(
      values, w, idx, cot
  )
  for a, b in ((got_out, want_out), *zip(got, want)):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_array_less(np.abs(a - b).max(), 1e-5 * np.abs(b).max() + 1e-30)


def test_the_table_gradient_stays_on_its_devices():
  values, idx, w, cot = case(dim=64, slots=512)
  mesh = make_mesh((2, 1, 4))
  bag = lambda v, i, w: sharded_embedding_bag(
      v, i, w, mesh=mesh, token_axes=AXES, memory_axis="memory", impl="xla"
  )
  grad = jax.jit(jax.grad(lambda v, w, i, c: jnp.sum(bag(v, i, w) * c), argnums=(0, 1)))
  v_p, i_p, w_p, c_p = placed(mesh, values, idx, w, cot)
  dvalues, _ = grad(v_p, w_p, i_p, c_p)
  assert dvalues.addressable_shards[0].data.shape == (512, 16)  # a quarter of the columns
  hlo = grad.lower(v_p, w_p, i_p, c_p).compile().as_text()
  collectives = re.findall(r"= (\S+) (?:all-reduce|all-gather|all-to-all|reduce-scatter|collective-permute)", hlo)
  assert collectives  # the lookup does talk
  for shape in collectives:  # but never moves the whole table or its whole gradient
    assert "512,64" not in shape, shape


def test_refuses_a_value_dim_the_memory_axis_does_not_divide_and_foreign_token_axes():
  values, idx, w, _ = case(dim=60)
  mesh = make_mesh((1, 1, 8))
  with pytest.raises(ValueError, match="value dim 60 must be divisible by the 'memory' mesh axis"):
    sharded_embedding_bag(values, idx, w, mesh=mesh, token_axes=AXES, memory_axis="memory")
  with pytest.raises(ValueError, match="must include the memory axis"):
    sharded_embedding_bag(values, idx, w, mesh=mesh, token_axes=("data",), memory_axis="memory")
