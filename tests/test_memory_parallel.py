"""memjax.ops.memory_parallel: the lookup with the table's columns split over a mesh axis equals
the unsharded op, and keeps the table's gradient on its devices."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax.ops import embedding_bag
from memjax.ops.memory_parallel import sharded_embedding_bag
from support.lookup import AXES, IMPLS, explicit_mesh, placed, random_case

MESHES = [  # (data, fsdp, memory) over the 8 test devices
    (8, 1, 1), (1, 8, 1), (2, 1, 4), (1, 2, 4), (1, 1, 8),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_equals_the_unsharded_lookup_and_its_gradients(shape, impl):
  values, idx, w, cot = random_case(0, 300, 64, 64, 24, dup_pool=40)
  mesh = explicit_mesh(shape)
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
  values, idx, w, cot = random_case(0, 512, 64, 64, 24, dup_pool=40)
  mesh = explicit_mesh((2, 1, 4))
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
  values, idx, w, _ = random_case(0, 300, 60, 64, 24, dup_pool=40)
  mesh = explicit_mesh((1, 1, 8))
  with pytest.raises(ValueError, match="value dim 60 must be divisible by the 'memory' mesh axis"):
    sharded_embedding_bag(values, idx, w, mesh=mesh, token_axes=AXES, memory_axis="memory")
  with pytest.raises(ValueError, match="must include the memory axis"):
    sharded_embedding_bag(values, idx, w, mesh=mesh, token_axes=("data",), memory_axis="memory")
