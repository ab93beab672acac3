"""Checkpoints of a run directory with orbax: the train state, the data iterator and the config.

Layout: `<run_dir>/checkpoints/<step>/{state,data,config}`. Saves are asynchronous (the next steps
run while the last one is written); the newest `keep` are kept. A restore checks the saved shapes
against the model the config builds before reading any array, and names the first parameter that
differs.

Failures end in one `CheckpointError` line: a folder that cannot be written is found before the
save starts (orbax would wait forever for it); a background save that fails is reported on the
main thread by `check_for_errors`, which the loop calls every step; its partial
`<step>.orbax-checkpoint-tmp*` folder is never restored and is removed at the next start. A step
that cannot be read is an `UnreadableCheckpoint`; the loop then falls back to the one before it.

In a multi-process run every process saves and restores: orbax writes each process's shards of
the state, and `data/` holds one file per data shard, written by the process that reads it.

The run directory may be local or an object store's URI (gs://bucket/runs/x): paths are
`etils.epath` paths (`memjax.paths`), which orbax takes as they are.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
import uuid
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
    if not counts:
      raise UnreadableCheckpoint("its data/ holds no data shard file")
    if counts != {args.shard_count}:
      raise DataError(
          f"{directory} holds the data order of {sorted(counts)} shards, this run reads "
          f"{args.shard_count} (data.shards, or one per process when 0): set data.shards="
          f"{min(counts, default=0)} to continue the saved order"
      )
    shards = {}
    for i in args.shard_ids:
      if (i, args.shard_count) in saved:
        path = saved[i, args.shard_count]
        try:
          shards[str(i)] = json.loads(path.read_text())
        except (ValueError, OSError) as error:
          raise UnreadableCheckpoint(
              f"its data/{path.name} is not JSON: {_reason(error)}") from None
    return {"shard_count": args.shard_count, "shards": shards}


@ocp.args.register_with_handler(DataShardsHandler, for_save=True)
@dataclasses.dataclass
class DataShardsSave(ocp.args.CheckpointArgs):
  item: dict  # ShardGroup.get_state()


@ocp.args.register_with_handler(DataShardsHandler, for_restore=True)
@dataclasses.dataclass
class DataShardsRestore(ocp.args.CheckpointArgs):
  shard_ids: tuple[int, ...]  # the shards this process reads
  shard_count: int


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be written or read; the message names the step and the reason."""


class CheckpointMismatch(CheckpointError, ValueError):
  """A checkpoint that does not fit the model of the current config."""


class UnreadableCheckpoint(CheckpointError):
  """A checkpoint whose files are missing or damaged (not one of another model)."""


class _SaveErrors(logging.Filter):
  """Keeps the errors orbax's background save threads log, and drops their tracebacks.

  orbax 0.12 catches a failed asynchronous commit in its finalize thread and only logs it, so
  the main thread would never hear of it; the loop reads them from here instead."""

  def __init__(self):
    super().__init__()
    self.errors: list[str] = []

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR or "orbax" not in record.pathname:
      return True
    error = record.exc_info[1] if record.exc_info else None
    self.errors.append(_reason(error) if error is not None else record.getMessage())
    return False


def _reason(error: BaseException) -> str:
  """One short line: the innermost cause's first line (orbax wraps tensorstore's errors)."""
  while (inner := error.__cause__ or error.__context__) is not None:
    error = inner
  if isinstance(error, OSError) and error.strerror:
    return f"{error.strerror}: {error.filename}" if error.filename else error.strerror
  line = str(error).partition("\n")[0].partition(" See full TensorStore details")[0]
  return line[:300] or type(error).__name__


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

  def __init__(self, run_dir: epath.PathLike, *, every: int, keep: int, async_save: bool = True,
               read_only: bool = False):
    self.directory = paths.as_path(run_dir) / "checkpoints"
    self.every = every
    self._pending: int | None = None  # the step of a save started and not yet seen complete
    if not read_only:
      self._check_writable()
    self._errors = _SaveErrors()
    logging.getLogger("absl").addFilter(self._errors)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep or None,  # 0: keep all
            enable_async_checkpointing=async_save,
            create=not read_only,
            # A save cut short (a kill, a full disk) leaves <step>.orbax-checkpoint-tmp*: never
            # a step a restore picks, and removed at the next start.
            cleanup_tmp_directories=not read_only,
        ),
        item_handlers={
            "state": ocp.StandardCheckpointHandler(),
            "data": DataShardsHandler(),
            "config": ocp.JsonCheckpointHandler(),
        },
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def set_aside_after(self, step: int) -> list[int]:
    """Moves the checkpoints newer than `step` to <run_dir>/set_aside/ (nothing is deleted), so
    that the run continues from `step`; returns the steps moved."""
    moved = [s for s in self.steps() if s > step]
    if moved:
      aside = self.directory.parent / "set_aside"
      aside.mkdir(parents=True, exist_ok=True)
      for s in moved:
        target = aside / str(s)
        if target.exists():
          target = aside / f"{s}-{uuid.uuid4().hex[:8]}"
        (self.directory / str(s)).rename(target)
      self._manager.reload()
    return moved

  def _check_writable(self) -> None:
    """Raises CheckpointError unless a step folder can be made here now.

    orbax makes the step's folder in a background thread, and when that fails its main thread
    waits for a signal that never comes; the same mkdir, tried first, fails here instead."""
    if paths.is_remote(self.directory):  # an object store has no folders to make
      return
    probe = self.directory / f".write-check-{uuid.uuid4().hex}"
    if self.directory.exists() and not self.directory.is_dir():
      raise CheckpointError(
          f"cannot write checkpoints to {self.directory}: a file is in the way; move it or "
          "choose another train.run_dir"
      )
    try:
      self.directory.mkdir(parents=True, exist_ok=True)
      probe.mkdir()
      probe.rmdir()
    except OSError as error:
      raise CheckpointError(
          f"cannot write checkpoints to {self.directory} ({_reason(error)}); free it or choose "
          "another train.run_dir"
      ) from None

  def check_for_errors(self) -> None:
    """Raises CheckpointError for a background save that failed (its partial folder is ignored
    and cleaned up at the next start; earlier checkpoints are kept)."""
    if self._pending is None:
      return
    if not self._errors.errors and self._saving():
      return
    try:
      self._manager.wait_until_finished()
    except Exception as error:  # orbax re-raises some background failures here, logs others
      self._errors.errors.insert(0, _reason(error))
    self._manager.reload()  # orbax lists a step from its start; the disk says if it completed
    if not self._errors.errors:
      if self._pending in self._manager.all_steps():
        self._pending = None
        return
    step, self._pending = self._pending, None
    reason = self._errors.errors[0] if self._errors.errors else "it did not complete"
    self._errors.errors.clear()
    kept = self._manager.latest_step()
    raise CheckpointError(
        f"the checkpoint of step {step} failed ({reason}); "
        + (f"the newest complete one is step {kept}" if kept is not None else "no checkpoint "
           "was completed") + f", in {self.directory}"
    )

  def _saving(self) -> bool:
    # orbax's is_saving_in_progress() stays true after a failed background commit; the
    # liveness of its finalize thread (private) does not.
    thread = getattr(self._manager, "_finalize_thread", None)
    if thread is None:
      return self._manager.is_saving_in_progress()
    return thread.map(lambda t: t is not None and t.is_alive())

  def due(self, step: int) -> bool:
    return step % self.every == 0

  def save(self, step: int, state, data_state: dict, cfg: config_lib.Config, *, force: bool = False) -> bool:
    """Saves at multiples of `every` (or when forced); returns whether a save started. Raises
    CheckpointError when the folder cannot be written or an earlier save failed."""
    if not (force or self.due(step)):
      return False
    if self._pending is not None:  # orbax waits for it anyway; its failure is its own
      while self._saving():
        time.sleep(0.01)
      self.check_for_errors()
    self._check_writable()
    self._errors.errors.clear()  # anything orbax logged before is not this save's
    try:
      started = self._manager.save(
          step,
          args=ocp.args.Composite(
              state=ocp.args.StandardSave(state),
              data=DataShardsSave(data_state),
              config=ocp.args.JsonSave(config_lib.to_dict(cfg)),
          ),
          force=True,  # the cadence is decided above (orbax would also save the first step)
      )
    except OSError as error:  # a synchronous save, or the start of an asynchronous one
      kept = self._manager.latest_step()
      raise CheckpointError(
          f"the checkpoint of step {step} failed ({_reason(error)}); the newest complete one is "
          f"step {kept}, in {self.directory}"
      ) from None
    if started:
      self._pending = step
    self.check_for_errors()
    return started

  def check_fits(self, step: int, abstract_state) -> set[str]:
    """Raises CheckpointMismatch naming the first leaf whose shape or dtype differs, and
    UnreadableCheckpoint when the step's description of its arrays cannot be read. Returns the
    scalar fields of a NamedTuple state that the checkpoint predates (restored as zeros)."""
    where = f"checkpoint {self.directory / str(step)}"
    try:
      metadata = self._manager.item_metadata(step)["state"]
    except Exception as error:  # orbax raises many kinds for a damaged folder
      raise UnreadableCheckpoint(f"{where} cannot be read ({_reason(error)})") from None
    saved = flat_shapes(metadata) if metadata is not None else {}
    if not saved:
      raise UnreadableCheckpoint(f"{where} cannot be read (its state has no array metadata)")
    wanted = flat_shapes(abstract_state)
    added = {name for name in getattr(abstract_state, "_fields", ())
             if name in wanted and name not in saved and wanted[name][0] == ()}
    for name in sorted(set(saved) | set(wanted) - added):
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
    return added

  def restore(self, step: int, abstract_state, data_shards=None) -> tuple[Any, dict | None]:
    """The state (with the shardings of `abstract_state`) and, given `data_shards` (a ShardGroup
    to restore into: its shard ids and count), the state of those data shards."""
    added = self.check_fits(step, abstract_state)
    target = abstract_state
    if added:  # a NamedTuple is stored as a dict of its fields: restore the saved ones
      target = {k: v for k, v in abstract_state._asdict().items() if k not in added}
    items = {"state": ocp.args.StandardRestore(target)}
    if data_shards is not None:
      items["data"] = DataShardsRestore(data_shards.shard_ids, data_shards.shard_count)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except UnreadableCheckpoint as error:  # from the data handler
      raise UnreadableCheckpoint(
          f"checkpoint {self.directory / str(step)} cannot be read ({error})") from None
    except (CheckpointError, DataError):
      raise
    except Exception as error:  # a truncated or deleted array file, in any of orbax's words
      raise UnreadableCheckpoint(
          f"checkpoint {self.directory / str(step)} cannot be read ({_reason(error)[:300]})"
      ) from None
    state = restored["state"]
    if added:
      zeros = {k: jax.device_put(jax.numpy.zeros((), getattr(abstract_state, k).dtype),
                                 getattr(abstract_state, k).sharding) for k in added}
      state = type(abstract_state)(**state, **zeros)
    return state, restored.get("data")

  def saved_config(self, step: int | None = None) -> dict:
    step = self.latest_step() if step is None else step
    try:
      return self._manager.restore(
          step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    except Exception as error:
      raise UnreadableCheckpoint(
          f"checkpoint {self.directory / str(step)} cannot be read (its config: "
          f"{_reason(error)[:300]})"
      ) from None

  def wait_until_finished(self) -> None:
    if self._pending is not None:
      while self._saving():
        time.sleep(0.01)
    self.check_for_errors()
    self._manager.wait_until_finished()

  def close(self) -> None:
    try:
      self._manager.close()
    finally:
      logging.getLogger("absl").removeFilter(self._errors)


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
  checkpointer = Checkpointer(run_dir, every=1, keep=1, async_save=False, read_only=True)
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

