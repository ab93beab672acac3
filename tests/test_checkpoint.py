"""Checkpoints: the data shards' states, one file each, restored into any split of the shards."""

import jax
import jax.numpy as jnp
import pytest

from memjax import checkpoint, config
from memjax.data import DataError, ShardGroup


class _Shards:
  """What `Checkpointer.restore` reads of a ShardGroup: which shards, out of how many."""

  def __init__(self, shard_ids, shard_count):
    self.shard_ids, self.shard_count = tuple(shard_ids), shard_count


def _save(tmp_path, data_state):
  ckpt = checkpoint.Checkpointer(tmp_path, every=1, keep=1, async_save=False)
  ckpt.save(3, {"w": jnp.arange(4.0)}, data_state, config.Config())
  ckpt.wait_until_finished()
  return ckpt


STATE = {"shard_count": 4, "shards": {str(i): {"offset": 10 * i} for i in range(4)}}


def test_each_data_shard_is_one_file_and_any_split_restores(tmp_path):
  ckpt = _save(tmp_path, STATE)
  files = sorted(p.name for p in (tmp_path / "checkpoints" / "3" / "data").glob("shard_*"))
  assert files == [f"shard_{i}-of-4.json" for i in range(4)]
  abstract = {"w": jax.ShapeDtypeStruct((4,), jnp.float32)}
  state, data = ckpt.restore(3, abstract, _Shards([2, 3], 4))
  assert data == {"shard_count": 4, "shards": {"2": {"offset": 20}, "3": {"offset": 30}}}
  assert state["w"].tolist() == [0.0, 1.0, 2.0, 3.0]
  assert ckpt.restore(3, abstract)[1] is None  # inference reads no data state
  ckpt.close()


def test_another_shard_count_is_refused_with_the_saved_one(tmp_path):
  ckpt = _save(tmp_path, STATE)
  with pytest.raises(DataError, match="set data.shards=4 to continue the saved order"):
    ckpt.restore(3, {"w": jax.ShapeDtypeStruct((4,), jnp.float32)}, _Shards([0], 2))
  ckpt.close()


def test_a_shard_group_refuses_a_state_without_its_shards():
  group = ShardGroup({1: iter([])}, 2)  # never read: only its state handling is tested
  with pytest.raises(DataError, match="lacks shards"):
    group.set_state({"shard_count": 2, "shards": {"0": {}}})
  with pytest.raises(DataError, match="set data.shards=3"):
    group.set_state({"shard_count": 3, "shards": {}})
