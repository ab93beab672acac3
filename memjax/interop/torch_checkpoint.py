"""The reference's consolidated checkpoints (`consolidated.pth` + `params.json`, spec 5) loaded into
memjax models, and written from them.

Parameter names match the reference's state dict (spec 5.2); three things differ:
- a torch Linear weight is (out, in), an nnx.Linear kernel (in, out): transposed;
- memory `keys` are (2*H*M, E) in torch, (H, 2, M, E) here: reshaped;
- the shared value table is one variable here; the reference's state dict holds it under its first
  memory layer and, probably, as aliases under the others (spec 1.4, 5.2).
PyTorch is imported lazily: `pip install memjax[torch]`.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from memjax import config_loading, paths
from memjax.config import Config, ConfigError, ModelConfig, from_dict
from memjax.interop import lingua
from memjax.layers.memory import ProductKeyMemory
from memjax.model import Transformer

CHECKPOINT_NAME = "consolidated.pth"
PARAMS_NAME = "params.json"
# Wrappers whose prefixes may survive in a state dict's names (torch.compile, activation ckpt).
_WRAPPER_PREFIXES = ("_orig_mod.", "_checkpoint_wrapped_module.")


class CheckpointError(ValueError):
  """A checkpoint that does not fit the model: the message names the key and what was expected."""


def _torch():
  try:
    import torch
  except ImportError as e:
    raise ImportError(
        "memjax.interop.torch_checkpoint needs PyTorch: pip install memjax[torch]"
    ) from e
  return torch


# ----------------------------------------------------------------------------------------------
# The layout: reference key -> (memjax variable, how its array is laid out in torch).
# "same": identical; "linear": transposed; "keys": (H, 2, M, E) <-> (2*H*M, E).
Layout = dict[str, tuple[nnx.Variable, str]]


def _torch_shape(shape: tuple[int, ...], kind: str) -> tuple[int, ...]:
  if kind == "linear":
    return shape[::-1]
  if kind == "keys":
    return (int(np.prod(shape[:-1])), shape[-1])
  return tuple(shape)


def _linear(layout: dict, key: str, linear: nnx.Linear | None) -> None:
  if linear is not None:
    layout[f"{key}.weight"] = (linear.kernel, "linear")
    if linear.bias is not None:
      layout[f"{key}.bias"] = (linear.bias, "same")


def _memory_layout(memory: ProductKeyMemory, prefix: str = "") -> Layout:
  """The reference `HashingMemory` keys of one memory layer, its table included (the selection's
  parameters, under `product_keys` in memjax, sit at the layer's top level there)."""
  layout = {f"{prefix}keys": (memory.product_keys.keys, "keys")}
  _linear(layout, f"{prefix}query_proj.query_mlps.0", memory.product_keys.query_proj)
  _linear(layout, f"{prefix}swilu_projection", memory.swilu_projection)
  _linear(layout, f"{prefix}value_proj", memory.value_proj)
  _linear(layout, f"{prefix}gating", memory.gating)
  layout[f"{prefix}values.weight"] = (memory.values, "same")
  return layout


def torch_layout(model: Transformer) -> Layout:
  """Every reference state-dict key of `model` with its variable and layout kind.

  A shared table is listed once, under the first memory layer (where the reference keeps it).
  """
  layout = {"tok_embeddings.weight": (model.tok_embeddings.embedding, "same")}
  first_memory = True
  for i, block in enumerate(model.layers):
    p = f"layers.{i}."
    for name in ("wq", "wk", "wv", "wo"):
      _linear(layout, f"{p}attention.{name}", getattr(block.attention, name))
    layout[f"{p}attention_norm.weight"] = (block.attention_norm.weight, "same")
    layout[f"{p}ffn_norm.weight"] = (block.ffn_norm.weight, "same")
    ff = block.feed_forward
    if isinstance(ff, ProductKeyMemory):
      memory = _memory_layout(ff, f"{p}feed_forward.")
      if model.cfg.memory.share_values and not first_memory:
        del memory[f"{p}feed_forward.values.weight"]
      first_memory = False
      layout.update(memory)
    else:
      for name in ("w1", "w2", "w3"):
        _linear(layout, f"{p}feed_forward.{name}", getattr(ff, name))
  layout["norm.weight"] = (model.norm.weight, "same")
  _linear(layout, "output", model.output)
  return layout


# ----------------------------------------------------------------------------------------------
# Loading.


def _numpy(tensor: Any) -> np.ndarray:
  """A torch tensor (or array) as numpy, without a copy; bfloat16 as ml_dtypes' bfloat16."""
  if hasattr(tensor, "detach"):
    tensor = tensor.detach().cpu()
    if tensor.dtype == _torch().bfloat16:  # numpy has no bfloat16: reinterpret the bits
      return tensor.view(_torch().int16).numpy().view(jnp.bfloat16)
    return tensor.numpy()
  return np.asarray(tensor)


def _abstract(make: Callable[[], nnx.Module], seed: int) -> nnx.Module:
  """`make()`'s module with no parameter materialised (to be filled from a checkpoint).

  Dropout RNG streams are not in a checkpoint: each gets its own key folded from `seed`.
  """
  module = nnx.eval_shape(make)
  for i, (_, var) in enumerate(nnx.to_flat_state(nnx.state(module, nnx.RngState))):
    if isinstance(var, nnx.RngKey):
      var.set_value(jax.random.fold_in(jax.random.key(seed), i))
    else:
      var.set_value(jnp.zeros(var.shape, var.dtype))
  return module


def _fill(layout: Layout, state_dict: dict, aliases: dict[str, str]) -> None:
  """Sets every variable of `layout` from `state_dict`, cast to the variable's dtype.

  `aliases` maps optional copies of the shared table (under the reference's other memory layers)
  to the table's key: each copy present must equal it. Anything else missing, extra, misshapen
  or not finite raises CheckpointError.
  """
  missing = [k for k in layout if k not in state_dict]
  if missing:
    var, kind = layout[missing[0]]
    raise CheckpointError(
        f"{missing[0]}: missing from the checkpoint (expected shape "
        f"{_torch_shape(var.shape, kind)}); {len(missing)} key(s) missing in all"
    )
  unexpected = sorted(set(state_dict) - set(layout) - set(aliases))
  if unexpected:
    raise CheckpointError(
        f"{unexpected[0]}: unexpected key for this config ({len(unexpected)} in all); check the "
        "config's layers, memory layers and memory options"
    )
  for key, (var, kind) in layout.items():
    array = _numpy(state_dict[key])
    expected = _torch_shape(var.shape, kind)
    if array.shape != expected:
      raise CheckpointError(f"{key}: expected shape {expected}, got {array.shape}")
    if kind == "linear":
      array = array.T
    elif kind == "keys":
      array = array.reshape(var.shape)
    value = jnp.asarray(array, dtype=var.dtype)
    # A diverged run's weights (or a cast that overflows) would load and only give nan logits.
    bad = int(jnp.size(value) - jnp.isfinite(value).sum())
    if bad:
      raise CheckpointError(f"{key}: {bad} non-finite value(s) (nan or inf) as {var.dtype}")
    var.set_value(value)
  for key, table_key in aliases.items():
    if key in state_dict:
      alias, table = _numpy(state_dict[key]), _numpy(state_dict[table_key])
      if alias.shape != table.shape or not np.array_equal(alias, table):
        raise CheckpointError(
            f"{key}: differs from {table_key}; with mem_share_values the memory layers share "
            "one table, so every copy must be identical"
        )


def _strip_wrappers(state_dict: dict) -> dict:
  out = {}
  for key, value in state_dict.items():
    for prefix in _WRAPPER_PREFIXES:
      key = key.replace(prefix, "")
    out[key] = value
  return out


def load_consolidated(
    path: str | os.PathLike, overrides: Sequence[str] = ()
) -> tuple[Config, Transformer]:
  """A reference consolidated checkpoint as a memjax config and model.

  Args:
    path: the `consolidated/` folder, or its `consolidated.pth`, local or a URI (gs://...);
      `params.json` lies beside it (the whole Lingua TrainArgs, mapped by
      `memjax.interop.lingua.to_memjax`).
    overrides: dotted `key=value`s merged into the mapped memjax config, e.g.
      "model.memory.value_dtype=float32" (Lingua's format keeps the table in bfloat16).

  The `.pth` holds {"model": state_dict, ...} (other entries such as "optim" are ignored) or a bare
  state dict. Weights are cast to the config's dtypes. The model is built abstractly and filled, so
  no parameter is initialised and then overwritten.

  Raises:
    FileNotFoundError: no checkpoint or params.json at `path`.
    ConfigError: params.json holds a setting memjax does not support.
    CheckpointError: params.json is not a JSON object; a missing, unexpected, misshapen or
      non-finite key, or differing copies of a shared table.
  """
  torch = _torch()
  path = epath.Path(path)
  ckpt = path / CHECKPOINT_NAME if path.is_dir() else path
  params = ckpt.parent / PARAMS_NAME
  for f in (ckpt, params):
    if not f.is_file():
      raise FileNotFoundError(f"{f}: not found (a consolidated checkpoint has {CHECKPOINT_NAME} "
                              f"and {PARAMS_NAME} side by side)")
  try:
    params_data = json.loads(params.read_bytes())
  except ValueError as e:  # not JSON, or not UTF-8
    raise CheckpointError(f"{params}: not a JSON file ({e})") from None
  if not isinstance(params_data, dict):
    raise CheckpointError(f"{params}: expected a JSON object of settings, got {params_data!r:.60}")
  try:
    data = lingua.to_memjax(params_data, training=False)
  except ConfigError as e:
    raise ConfigError(e.field, f"{e.detail} (in {params})") from None
  cfg = from_dict(Config, config_loading.merge_overrides(data, overrides))

  if paths.is_remote(ckpt):  # torch maps local files only: read whole into memory
    checkpoint = torch.load(io.BytesIO(ckpt.read_bytes()), map_location="cpu", weights_only=True)
  else:
    checkpoint = torch.load(os.fspath(ckpt), map_location="cpu", weights_only=True, mmap=True)
  state_dict = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
  if not isinstance(state_dict, dict):
    raise CheckpointError(f"{ckpt}: expected a state dict or {{'model': state_dict}}")
  state_dict = _strip_wrappers(state_dict)

  model = _abstract(lambda: Transformer(cfg.model, rngs=nnx.Rngs(cfg.seed)), cfg.seed)
  layout = torch_layout(model)
  memory = cfg.model.memory
  aliases = {}
  if memory.share_values and memory.layers:
    first, *others = [f"layers.{i}.feed_forward.values.weight" for i in sorted(memory.layers)]
    aliases = {key: first for key in others}
  _fill(layout, state_dict, aliases)
  return cfg, model


# ----------------------------------------------------------------------------------------------
# Export.


def _to_torch(array: jax.Array, kind: str):
  """A memjax parameter as a torch tensor in the reference's layout, in the same dtype."""
  torch = _torch()
  x = np.asarray(array)
  x = np.array(x.T if kind == "linear" else x.reshape(_torch_shape(x.shape, kind)))  # own copy
  if x.dtype == jnp.bfloat16:  # numpy has no bfloat16: reinterpret the bits
    return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
  return torch.from_numpy(x)


def export_consolidated(
    model: Transformer, cfg: Config, out_dir: str | os.PathLike, *, overwrite: bool = False
) -> pathlib.Path | epath.Path:
  """Writes `model` as a reference consolidated checkpoint; returns `out_dir` (local, or a URI such
  as gs://bucket/consolidated).

  `out_dir/consolidated.pth` holds {"model": state_dict} with the reference's names and layouts,
  each tensor in its parameter's dtype; a shared table is stored once, under the first memory
  layer (the reference's owner; `load_consolidated` also accepts copies under the others).
  `out_dir/params.json` is `memjax.interop.lingua.from_memjax(cfg)`: Lingua's model section with
  productkey_args, what both `load_consolidated` and the reference's loader read.

  Raises:
    FileExistsError: `out_dir` exists and is not empty, unless `overwrite`.
    ConfigError: `cfg` has settings the reference's format cannot express (see `from_memjax`).
    ValueError: `cfg.model` is not the config `model` was built from.
  """
  torch = _torch()
  if cfg.model != model.cfg:
    raise ValueError("cfg.model differs from the config the model was built from (model.cfg)")
  params = lingua.from_memjax(cfg)
  out = epath.Path(out_dir) if paths.is_remote(out_dir) else pathlib.Path(out_dir)
  if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
    raise FileExistsError(f"{out}: exists and is not empty; pass overwrite=True to replace it")
  layout = torch_layout(model)
  state_dict = {key: _to_torch(var.get_value(), kind) for key, (var, kind) in layout.items()}
  if paths.is_remote(out):
    # An object is replaced only once whole: each file is serialised, then written in one go.
    checkpoint = io.BytesIO()
    torch.save({"model": state_dict}, checkpoint)
    (out / CHECKPOINT_NAME).write_bytes(checkpoint.getvalue())
    (out / PARAMS_NAME).write_text(json.dumps(params, indent=2))
    return out
  out.mkdir(parents=True, exist_ok=True)
  # Both files are written beside and then renamed: a failed export replaces nothing.
  tmp = {name: out / f".{name}.tmp" for name in (CHECKPOINT_NAME, PARAMS_NAME)}
  try:
    torch.save({"model": state_dict}, tmp[CHECKPOINT_NAME])
    tmp[PARAMS_NAME].write_text(json.dumps(params, indent=2))
    for name, path in tmp.items():
      os.replace(path, out / name)
  finally:
    for path in tmp.values():
      path.unlink(missing_ok=True)
  return out


# ----------------------------------------------------------------------------------------------
# One memory layer.


def memory_layer_from_torch(
    state_dict: dict,
    *,
    input_dim: int,
    output_dim: int,
    mem_n_keys: int = 1024,
    mem_heads: int = 4,
    mem_knn: int = 32,
    mem_k_dim: int = 512,
    mem_v_dim: int = -1,
    swilu_projection: bool = True,
    mem_gated: bool = False,
    mem_share_values: bool = True,
    value_fixed_lr: float | None = 0.001,
    mem_query_bias: bool = True,
    mem_query_batchnorm: bool = False,
    mem_input_dropout: float = 0.0,
    mem_query_dropout: float = 0.0,
    mem_value_dropout: float = 0.0,
    peer_variant: bool = False,
    dtype: str = "float32",
) -> tuple[ModelConfig, ProductKeyMemory]:
  """A memjax memory layer with the weights of a reference `HashingMemory`.

  Args:
    state_dict: the layer's own state dict: `keys` (2*H*M, E), `values.weight` (M*M, V),
      `query_proj.query_mlps.0.weight`/`.bias` (H*k_dim, D), and as configured
      `swilu_projection.*` (V, D), `value_proj.*` (D, V), `gating.*` (1, D).
    input_dim, output_dim, mem_*, ...: `HashingMemory`'s constructor arguments.
    dtype: parameters, table and compute dtype of the memjax layer.

  Returns:
    The `ModelConfig` the layer is built from (its `memory` holds the layer; its attention fields
    are placeholders) and the layer.
  """
  if output_dim != input_dim:
    raise ConfigError(
        "output_dim", f"must equal input_dim={input_dim} (memjax memory layers keep the model "
        f"dim), got {output_dim}"
    )
  if mem_query_batchnorm:
    raise ConfigError("mem_query_batchnorm", "must be false (the reference's batchnorm query "
                      "is broken and never used)")
  pk = {
      "is_enabled": True, "layers": "0", "mem_n_keys": mem_n_keys, "mem_heads": mem_heads,
      "mem_knn": mem_knn, "mem_k_dim": mem_k_dim, "mem_v_dim": mem_v_dim,
      "mem_share_values": mem_share_values, "swilu_projection": swilu_projection,
      "value_fixed_lr": value_fixed_lr, "mem_gated": mem_gated, "peer_variant": peer_variant,
  }
  memory = lingua.memory_from_productkey_args(pk, field="HashingMemory")
  memory.update(
      query_bias=mem_query_bias, input_dropout=mem_input_dropout,
      query_dropout=mem_query_dropout, value_dropout=mem_value_dropout, value_dtype=dtype,
  )
  try:
    cfg = from_dict(ModelConfig, {
        "dim": input_dim, "n_layers": 1, "n_heads": 1, "head_dim": 2,  # attention unused here
        "dtype": dtype, "param_dtype": dtype, "memory": memory,
    })
  except ConfigError as e:  # name the argument, not the memjax field it became
    name = e.field.removeprefix("memory.").split("[")[0]
    kwargs = {v: k for k, v in lingua.PRODUCTKEY_FIELDS.items()}
    kwargs.update(query_bias="mem_query_bias", dim="input_dim", value_dtype="dtype")
    raise ConfigError(kwargs.get(name, name), f"{e.detail} (memjax field {e.field})") from None
  layer = _abstract(lambda: ProductKeyMemory(cfg, rngs=nnx.Rngs(0)), 0)
  _fill(_memory_layout(layer), _strip_wrappers(dict(state_dict)), aliases={})
  return cfg, layer
