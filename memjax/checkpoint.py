"""Checkpoints of a run directory with orbax: the train state, the data iterator and the config.

Layout: `<run_dir>/checkpoints/<step>/{state,data,config}`. Saves are asynchronous (the next steps
run while the last one is written); the newest `keep` are kept. A restore checks the saved shapes
against the model the config builds before reading any array, and names the first parameter that
differs.

In a multi-process run every process saves and restores: orbax writes each process's shards of
the state, and `data/` holds one file per data shard, written by the process that reads it.

The run directory may be local or an object store's URI (gs://bucket/runs/x): paths are
`etils.epath` paths (`memjax.paths`), which orbax takes as they are.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from memjax import config as config_lib
from memjax import paths
from memjax.data import DataError


class DataShardsHandler(ocp.CheckpointHandler):
  """The data iterators' state (`memjax.data.ShardGroup`): a JSON file per data shard."""

  def save(self, directory, args: DataShardsSave):
    count = args.item["shard_count"]
    for shard, state in args.item["shards"].items():
      (directory / f"shard_{shard}-of-{count}.json").write_text(json.dumps(state))

  def restore(self, directory, args: DataShardsRestore) -> dict:
    saved = {
        (int(m[1]), int(m[2])): path
        for path in directory.iterdir()
        if (m := re.fullmatch(r"shard_(\d+)-of-(\d+)\.json", path.name))
    }
    counts = {count for _, count in saved}
    if counts != {args.shard_count}:
      raise DataError(
          f"{directory} holds the data order of {sorted(counts)} shards, this run reads "
          f"{args.shard_count} (data.shards, or one per process when 0): set data.shards="
          f"{min(counts, default=0)} to continue the saved order"
      )
    return {
        "shard_count": args.shard_count,
        "shards": {
            str(i): json.loads(saved[i, args.shard_count].read_text())
            for i in args.shard_ids
            if (i, args.shard_count) in saved
        },
    }


@ocp.args.register_with_handler(DataShardsHandler, for_save=True)
@dataclasses.dataclass
class DataShardsSave(ocp.args.CheckpointArgs):
  item: dict  # ShardGroup.get_state()


@ocp.args.register_with_handler(DataShardsHandler, for_restore=True)
@dataclasses.dataclass
class DataShardsRestore(ocp.args.CheckpointArgs):
  shard_ids: tuple[int, ...]  # the shards this process reads
  shard_count: int


class CheckpointMismatch(ValueError):
  """A checkpoint that does not fit the model of the current config."""


def _flat_name(path) -> str:
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
  return ".".join(parts)


def _stored(x) -> tuple[tuple[int, ...], str]:
  """Shape and dtype as stored: a typed PRNG key is stored as its uint32 key data."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
  return tuple(x.shape), str(x.dtype)


def flat_shapes(tree) -> dict[str, tuple[tuple[int, ...], str]]:
  """Dotted leaf name -> stored (shape, dtype), for arrays, ShapeDtypeStructs and orbax metadata."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {_flat_name(p): _stored(x) for p, x in leaves}


class Checkpointer:
  """One run directory's checkpoints."""

  def __init__(self, run_dir: epath.PathLike, *, every: int, keep: int, async_save: bool = True):
    self.directory = paths.as_path(run_dir) / "checkpoints"
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep or None,  # 0: keep all
            save_interval_steps=every,
            enable_async_checkpointing=async_save,
            create=True,
        ),
        item_handlers={
            "state": ocp.StandardCheckpointHandler(),
            "data": DataShardsHandler(),
            "config": ocp.JsonCheckpointHandler(),
        },
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state, data_state: dict, cfg: config_lib.Config, *, force: bool = False) -> bool:
    """Saves at multiples of `every` (or when forced); returns whether a save started."""
    return self._manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=DataShardsSave(data_state),
            config=ocp.args.JsonSave(config_lib.to_dict(cfg)),
        ),
        force=force,
    )

  def check_fits(self, step: int, abstract_state) -> None:
    """Raises CheckpointMismatch naming the first leaf whose shape or dtype differs."""
    saved = flat_shapes(self._manager.item_metadata(step)["state"])
    wanted = flat_shapes(abstract_state)
    where = f"checkpoint {self.directory / str(step)}"
    for name in sorted(set(saved) | set(wanted)):
      if name not in saved:
        raise CheckpointMismatch(f"{where} has no {name}, which this config's model has")
      if name not in wanted:
        raise CheckpointMismatch(f"{where} holds {name}, which this config's model does not have")
      if saved[name] != wanted[name]:
        (s_shape, s_dtype), (w_shape, w_dtype) = saved[name], wanted[name]
        raise CheckpointMismatch(
            f"{where} holds {name} as {s_dtype}{list(s_shape)}; this config makes "
            f"{w_dtype}{list(w_shape)}"
        )

  def restore(self, step: int, abstract_state, data_shards=None) -> tuple[Any, dict | None]:
    """The state (with the shardings of `abstract_state`) and, given `data_shards` (a ShardGroup
    to restore into: its shard ids and count), the state of those data shards."""
    self.check_fits(step, abstract_state)
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_shards is not None:
      items["data"] = DataShardsRestore(data_shards.shard_ids, data_shards.shard_count)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"], restored.get("data")

  def saved_config(self, step: int | None = None) -> dict:
    step = self.latest_step() if step is None else step
    return self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def find_run_dir(path: epath.PathLike) -> tuple[epath.Path, int | None]:
  """A run directory, its checkpoints directory, or one checkpoint step -> (run dir, step)."""
  p = paths.as_path(path)
  if (p / "checkpoints").is_dir():
    return p, None
  if p.name == "checkpoints" and p.is_dir():
    return p.parent, None
  if p.parent.name == "checkpoints" and p.name.isdigit():
    return p.parent.parent, int(p.name)
  raise FileNotFoundError(
      f"{path}: not a memjax run directory (no checkpoints/ inside) nor one of its checkpoints"
  )


def load_for_inference(path: epath.PathLike, *, on_run_mesh: bool = False):
  """(config, model with the checkpoint's parameters, tokenizer) from a run dir or checkpoint.

  The arrays land on one device, or with `on_run_mesh` straight in their shardings on the run's
  `mesh` config over this machine's devices (`sharding.make_mesh(cfg.mesh)`).
  """
  from flax import nnx

  from memjax import data, sharding
  from memjax.training import state as state_lib

  run_dir, step = find_run_dir(path)
  checkpointer = Checkpointer(run_dir, every=1, keep=1, async_save=False)
  try:
    step = checkpointer.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"{run_dir}: holds no checkpoint yet")
    cfg = config_lib.from_dict(config_lib.Config, checkpointer.saved_config(step))
    mesh = sharding.make_mesh(cfg.mesh) if on_run_mesh else None
    restored, _ = checkpointer.restore(step, state_lib.abstract_state(cfg, mesh))
  finally:
    checkpointer.close()
  model = nnx.merge(state_lib.model_graphdef(cfg), restored.params, restored.other)
  tokenizer = data.make_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_path or None)
  return cfg, model, tokenizer

