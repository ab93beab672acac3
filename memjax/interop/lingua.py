"""Meta Lingua configs (the reference's `TrainArgs`, as YAML or a checkpoint's `params.json`) mapped
onto memjax's `Config`, and memjax model configs written back in that format.

A Lingua config is a whole training setup: a `model` mapping (`LMTransformerArgs`, the memory in
`model.productkey_args`, `ProductKeyArgs`) among training sections. The model, the run length,
the seeds, the optimizer and schedule (`optim`, with the table's `value_fixed_lr`, onto memjax's
`optim` section), the batch (`data.batch_size`, `data.seq_len`, `grad_acc_steps`), the tokenizer
and checkpointing (`checkpoint.dump`) are mapped; the other sections (data sources, distributed
and profiling settings, the eval harness) are accepted and left out. Keys that would change the
network or the optimizer and that memjax lacks raise `ConfigError` naming the key.
"""

from __future__ import annotations

from typing import Any

from memjax.config import Config, ConfigError, from_dict

# TrainArgs' top-level keys besides `model`: accepted, not mapped yet.
TRAIN_KEYS = (
    "name", "dump_dir", "seed", "grad_acc_steps", "gc_collect_freq", "probe_freq", "steps", "data",
    "optim", "distributed", "env", "checkpoint", "profiling", "logging", "async_eval_gpus", "eval",
)

# LMTransformerArgs' fields with Lingua's defaults: a key Lingua leaves out means its default.
MODEL_DEFAULTS: dict[str, Any] = {
    "dim": 512, "n_layers": 8, "head_dim": None, "n_heads": None, "n_kv_heads": None,
    "ffn_dim_multiplier": None, "multiple_of": 256, "norm_eps": 1e-5, "rope_theta": 10000.0,
    "init_base_std": None, "init_std_factor": "disabled", "max_seqlen": 1024,
    "productkey_args": {}, "seed": 42, "vocab_size": -1, "weight_tying": False,
    "sliding_window": None,
}
# Fields mapped one to one (same name in both schemas).
_SAME_MODEL_FIELDS = (
    "dim", "n_layers", "head_dim", "n_kv_heads", "ffn_dim_multiplier", "multiple_of", "norm_eps",
    "rope_theta", "init_base_std", "init_std_factor",
)

PRODUCTKEY_DEFAULTS: dict[str, Any] = {
    "is_enabled": False, "layers": "", "mem_n_keys": 1024, "mem_heads": 4, "mem_knn": 32,
    "mem_share_values": True, "mem_k_dim": 512, "mem_v_dim": -1, "swilu_projection": True,
    "value_fixed_lr": 0.001, "mem_gated": False, "peer_variant": False,
}
# ProductKeyArgs field -> MemoryConfig field. (`value_fixed_lr` is the optimizer's `value_lr`.)
PRODUCTKEY_FIELDS = {
    "mem_n_keys": "n_keys", "mem_heads": "heads", "mem_knn": "knn", "mem_k_dim": "k_dim",
    "mem_v_dim": "v_dim", "mem_share_values": "share_values", "swilu_projection": "swilu",
    "mem_gated": "gated",
}

# Vocabulary of each Lingua tokenizer, for configs leaving model.vocab_size at -1 (Lingua then takes
# the tokenizer's): sp is the Llama-2 SentencePiece model of the paper's small models (spec 4.2,
# 5.4); tiktoken a Llama-3-size one (128000 ranks + 256 special tokens).
TOKENIZER_VOCAB = {"bytes": 258, "mock": 256, "sp": 32000, "tiktoken": 128256}
TOKENIZER_KINDS = {"bytes": "bytes", "sp": "sentencepiece", "tiktoken": "tiktoken"}
# OptimArgs: what memjax fixes (AdamW's betas and epsilon) and the schedules it has.
OPTIM_FIXED = {"beta1": 0.9, "beta2": 0.95, "epsilon": 1e-8}
OPTIM_KEYS = (
    "lr", "weight_decay", "epsilon", "beta1", "beta2", "clip", "scheduler", "warmup",
    "lr_min_ratio", "cycle_length", "cosine_theta", "annealing_step", "decay_fraction", "exp_factor",
)
# OptimArgs fields memjax's `optim` section takes (same names), with Lingua's defaults: a key the
# file leaves out trains as Lingua would (a cosine schedule), not at memjax's defaults.
OPTIM_DEFAULTS: dict[str, Any] = {
    "lr": 3e-4, "weight_decay": 0.1, "clip": 1.0, "scheduler": "cosine", "warmup": 2000,
    "lr_min_ratio": 0.1,
}
SCHEDULERS = ("linear", "cosine")
# The shape of Lingua's cosine that optax's cosine decay has (one half-cycle, progress**1).
COSINE_FIXED = {"cycle_length": 1.0, "cosine_theta": 1.0}
MODEL_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}

_MEMJAX_ONLY_MODEL_KEYS = ("memory", "moe", "peer", "param_dtype", "dtype")


def is_lingua(data: dict) -> bool:
  """Whether a parsed config is Lingua's: `model.productkey_args`, or Lingua's training sections
  around a model mapping without memjax's own keys (`memory`, `dtype`, `param_dtype`)."""
  model = data.get("model")
  model = model if isinstance(model, dict) else {}
  if "productkey_args" in model:
    return True
  if any(k in model for k in _MEMJAX_ONLY_MODEL_KEYS):
    return False
  return any(k in data for k in TRAIN_KEYS if k != "seed")


def to_memjax(data: dict) -> dict:
  """The memjax config (`Config` as nested mappings) of a Lingua config dict.

  - Model fields map by name; `n_heads: null` becomes dim // head_dim, as Lingua derives it.
  - `vocab_size: -1` (Lingua's "the tokenizer's") becomes `data.tokenizer.name`'s size.
  - `max_seqlen` is `data.seq_len` when given: Lingua's training overwrites it with that; it is
    also `train.seq_len`, the length Lingua trains on.
  - `distributed.model_dtype` is the compute dtype; parameters stay float32 (Lingua's FSDP master
    weights) and a memory table is bfloat16, as the reference creates and trains it (spec 1.6).
  - `seed` is `model.seed` (default 42), the seed Lingua initialises the weights from; the
    top-level `seed` (data order) is `data.seed`.
  - `optim.{lr,weight_decay,clip,warmup,lr_min_ratio,scheduler}` map onto memjax's `optim` of the
    same names, Lingua's defaults filling what the file leaves out; `productkey_args.
    value_fixed_lr` is `optim.value_lr` (null: the table at the base rate `optim.lr`).
  - `steps` and `checkpoint.dump.{every,keep}` map by meaning; Lingua's `data.batch_size` is per
    data-parallel rank and micro step, so memjax's `train.batch_size` (per optimizer step, all
    devices) becomes `batch_size * grad_acc_steps` of one rank: multiply by the number of ranks
    you trained on.
  Overrides given with a Lingua file use Lingua's names (`model.productkey_args.mem_knn=16`).

  Raises:
    ConfigError: naming the Lingua key, for unknown keys, unsupported settings and bad values.
  """
  _no_unknown(data, ("model",) + TRAIN_KEYS, "", "a Lingua config (TrainArgs)")
  given = _mapping(data.get("model"), "model")
  _no_unknown(given, MODEL_DEFAULTS, "model", "LMTransformerArgs")
  m = {**MODEL_DEFAULTS, **given}
  if m["weight_tying"] is not False:
    raise ConfigError(
        "model.weight_tying",
        f"must be false: memjax keeps separate tok_embeddings and output weights, got "
        f"{m['weight_tying']!r}",
    )
  if m["sliding_window"] is not None:
    raise ConfigError(
        "model.sliding_window",
        f"must be null: memjax attention is full causal, got {m['sliding_window']!r}",
    )
  data_section = _mapping(data.get("data"), "data")
  distributed = _mapping(data.get("distributed"), "distributed")

  model = {k: m[k] for k in _SAME_MODEL_FIELDS}
  model["n_heads"] = m["n_heads"]
  if m["n_heads"] is None:
    if m["head_dim"] is None:
      raise ConfigError("model.n_heads", "set n_heads or head_dim (Lingua derives the other)")
    head_dim = _positive_int(m["head_dim"], "model.head_dim")
    model["n_heads"] = _positive_int(m["dim"], "model.dim") // head_dim
  model["vocab_size"] = _vocab_size(m["vocab_size"], data_section)
  model["max_seqlen"] = data_section.get("seq_len", m["max_seqlen"])
  model_dtype = distributed.get("model_dtype", "bf16")
  if model_dtype not in MODEL_DTYPES:
    raise ConfigError(
        "distributed.model_dtype", f"must be one of {', '.join(MODEL_DTYPES)}, got {model_dtype!r}"
    )
  model["dtype"] = MODEL_DTYPES[model_dtype]
  productkey_args = _mapping(m["productkey_args"], "model.productkey_args")
  model["memory"] = memory_from_productkey_args(productkey_args)
  out = {
      "model": model,
      "data": _data_from(data_section, data.get("seed")),
      "train": {"seq_len": model["max_seqlen"], **_train_from(data)},
      "optim": _optim_from(data, productkey_args),
      "seed": m["seed"],
  }
  try:
    from_dict(Config, out)  # so errors name the Lingua key, not the memjax field it became
  except ConfigError as e:
    field = _lingua_field(e.field, data_section)
    raise ConfigError(field, f"{e.detail} (memjax field {e.field})") from None
  return out


def memory_from_productkey_args(pk: dict, field: str = "model.productkey_args") -> dict:
  """`MemoryConfig` fields (a mapping) of a Lingua `ProductKeyArgs` mapping; defaults filled in.
  (Its `value_fixed_lr` is the optimizer's: see `to_memjax`.)"""
  _no_unknown(pk, PRODUCTKEY_DEFAULTS, field, "ProductKeyArgs")
  pk = {**PRODUCTKEY_DEFAULTS, **pk}
  if not isinstance(pk["is_enabled"], bool):
    raise ConfigError(f"{field}.is_enabled", f"must be true or false, got {pk['is_enabled']!r}")
  if not pk["is_enabled"]:
    return {"layers": []}
  if pk["peer_variant"] is not False:
    # Same sizes and forward (spec 1.3), but the reference's HashingMemory shares the two expert
    # tables and trains them as value parameters: mapping it would train another model.
    raise ConfigError(
        f"{field}.peer_variant",
        "must be false: the reference's PEER variant shares its values_u/values_v tables across "
        "layers (mem_share_values) and trains them at value_fixed_lr under the value table's "
        "clip, where memjax's PEER baseline (model.peer) gives each layer its own tables, "
        "trained with the other parameters; write a memjax config with model.peer instead, got "
        f"{pk['peer_variant']!r}",
    )
  memory = {ours: pk[theirs] for theirs, ours in PRODUCTKEY_FIELDS.items()}
  memory["layers"] = _layers(pk["layers"], f"{field}.layers")
  memory["value_dtype"] = "bfloat16"
  return memory


def from_memjax(cfg: Config) -> dict:
  """A Lingua config dict of `cfg`'s model that `to_memjax` maps back.

  It holds `model` (every LMTransformerArgs field, with productkey_args), `distributed.model_dtype`
  and `data.tokenizer` (name guessed from the vocabulary size, "sp" when unknown; path null): what
  the reference's `load_consolidated_model_and_tokenizer` reads; and the `optim` keys memjax maps,
  so a reload trains at `cfg`'s rates. Lingua has no field for dropout, the parameter dtype, the
  table dtype, the moments' dtype or the sparse table update: reloading gives the reference's (no
  dropout, float32 parameters, a bfloat16 table, float32 moments, the dense update).

  Raises:
    ConfigError: for settings the reference's model cannot express (qk_norm, no query bias, fewer
      than 2 memory heads, a float64 compute dtype).
  """
  m, mem = cfg.model, cfg.model.memory
  if mem.enabled:
    for field, ok, allowed in (
        ("qk_norm", not mem.qk_norm, "false"),
        ("query_bias", mem.query_bias, "true"),
        ("heads", mem.heads >= 2, ">= 2"),
    ):
      if not ok:
        raise ConfigError(
            f"model.memory.{field}",
            f"must be {allowed} to export in the reference's format, got {getattr(mem, field)!r}",
        )
  dtypes = {v: k for k, v in MODEL_DTYPES.items()}
  if m.dtype not in dtypes:
    raise ConfigError(
        "model.dtype", f"must be one of {', '.join(dtypes)} in Lingua, got {m.dtype!r}"
    )
  productkey_args = {
      "is_enabled": mem.enabled,
      "layers": ",".join(str(i) for i in mem.layers),
      **{theirs: getattr(mem, ours) for theirs, ours in PRODUCTKEY_FIELDS.items()},
      "value_fixed_lr": cfg.optim.value_lr,
      "peer_variant": False,
  }
  productkey_args = {k: productkey_args[k] for k in PRODUCTKEY_DEFAULTS}  # in Lingua's order
  model = {k: getattr(m, k) for k in _SAME_MODEL_FIELDS}
  model.update(
      n_heads=m.n_heads, max_seqlen=m.max_seqlen, vocab_size=m.vocab_size, seed=cfg.seed,
      productkey_args=productkey_args, weight_tying=False, sliding_window=None,
  )
  model = {k: model[k] for k in MODEL_DEFAULTS}  # in Lingua's field order
  tokenizer = {v: k for k, v in TOKENIZER_VOCAB.items()}.get(m.vocab_size, "sp")
  return {
      "model": model,
      "distributed": {"model_dtype": dtypes[m.dtype]},
      "data": {"tokenizer": {"name": tokenizer, "path": None}},
      "optim": {k: getattr(cfg.optim, k) for k in OPTIM_DEFAULTS},
  }


def _optim_from(data: dict, productkey_args: dict) -> dict:
  """OptimConfig fields of Lingua's `optim` section and the table's `value_fixed_lr`."""
  given = _mapping(data.get("optim"), "optim")
  _no_unknown(given, OPTIM_KEYS, "optim", "OptimArgs")
  for key, fixed in OPTIM_FIXED.items():
    if key in given and given[key] != fixed:
      raise ConfigError(f"optim.{key}", f"must be {fixed} (memjax's AdamW), got {given[key]!r}")
  optim = {key: given.get(key, default) for key, default in OPTIM_DEFAULTS.items()}
  if optim["scheduler"] not in SCHEDULERS:
    raise ConfigError(
        "optim.scheduler", f"must be one of {', '.join(SCHEDULERS)}, got {optim['scheduler']!r}"
    )
  if optim["scheduler"] == "cosine":
    for key, fixed in COSINE_FIXED.items():
      if key in given and given[key] != fixed:
        raise ConfigError(
            f"optim.{key}", f"must be {fixed} with the cosine scheduler (memjax's cosine decay is "
            f"one half-cycle), got {given[key]!r}"
        )
  value_lr = productkey_args.get("value_fixed_lr", PRODUCTKEY_DEFAULTS["value_fixed_lr"])
  # null: the reference trains the table at the base rate (still under its own clip).
  optim["value_lr"] = optim["lr"] if value_lr is None else value_lr
  return optim


def _train_from(data: dict) -> dict:
  """TrainConfig fields of Lingua's training sections."""
  train: dict[str, Any] = {}
  if "steps" in data:
    train["steps"] = data["steps"]
  grad_acc = data.get("grad_acc_steps", 1)
  if grad_acc != 1:
    train["grad_accum"] = grad_acc
  batch = _mapping(data.get("data"), "data").get("batch_size")
  if batch is not None:
    train["batch_size"] = batch * grad_acc if isinstance(batch, int) and isinstance(grad_acc, int) else batch
  dump = _mapping(_mapping(data.get("checkpoint"), "checkpoint").get("dump"), "checkpoint.dump")
  if "every" in dump:
    train["checkpoint_every"] = dump["every"]
  if "keep" in dump:
    keep = dump["keep"]
    train["keep_checkpoints"] = 0 if isinstance(keep, int) and keep < 0 else keep  # -1: all
  freq = _mapping(data.get("logging"), "logging").get("freq")
  if freq is not None:
    train["log_every"] = freq
  return train


def _data_from(data_section: dict, seed: Any) -> dict:
  """DataConfig fields: the tokenizer and the data-order seed."""
  out: dict[str, Any] = {}
  if seed is not None:
    out["seed"] = seed
  tokenizer = _mapping(data_section.get("tokenizer"), "data.tokenizer")
  name = tokenizer.get("name", "bytes")
  if name not in TOKENIZER_KINDS:
    raise ConfigError(
        "data.tokenizer.name", f"must be one of {', '.join(TOKENIZER_KINDS)}, got {name!r}"
    )
  out["tokenizer"] = TOKENIZER_KINDS[name]
  if tokenizer.get("path"):
    out["tokenizer_path"] = tokenizer["path"]
  return out


# ----------------------------------------------------------------------------------------------


def _mapping(value: Any, field: str) -> dict:
  if value is None:
    return {}
  if not isinstance(value, dict):
    raise ConfigError(field, f"must be a mapping, got {value!r}")
  return value


def _no_unknown(data: dict, known, field: str, what: str) -> None:
  unknown = sorted(set(data) - set(known))
  if unknown:
    name = f"{field}.{unknown[0]}" if field else unknown[0]
    raise ConfigError(name, f"unknown key; {what} has: {', '.join(sorted(known))}")


def _positive_int(value: Any, field: str) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ConfigError(field, f"must be a positive int, got {value!r}")
  return value


def _vocab_size(value: Any, data_section: dict) -> Any:
  if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value > 0):
    return value  # an explicit size; its type is checked with the rest
  tokenizer = _mapping(data_section.get("tokenizer"), "data.tokenizer")
  name = tokenizer.get("name", "bytes")  # Lingua's TokenizerArgs default
  if name not in TOKENIZER_VOCAB:
    known = ", ".join(f"{k} {v}" for k, v in TOKENIZER_VOCAB.items())
    raise ConfigError(
        "model.vocab_size",
        f"is {value!r} (the tokenizer's) and tokenizer {name!r} has no known size ({known}); "
        "set model.vocab_size",
    )
  return TOKENIZER_VOCAB[name]


def _layers(value: Any, field: str) -> list[int]:
  """Lingua writes memory blocks as "4,12,20"; a single int or a list is taken too."""
  if isinstance(value, int) and not isinstance(value, bool):
    return [value]
  if isinstance(value, str):
    try:
      return [int(s) for s in value.split(",") if s.strip()]
    except ValueError:
      pass
  if isinstance(value, (list, tuple)) and all(
      isinstance(v, int) and not isinstance(v, bool) for v in value
  ):
    return list(value)
  raise ConfigError(
      field, f'must be comma-separated block indices such as "4,12,20", got {value!r}'
  )


def _lingua_field(field: str, data_section: dict) -> str:
  """The Lingua key a memjax field came from."""
  prefix = "model.memory."
  if field.startswith(prefix):
    name = field[len(prefix):].split("[")[0]
    theirs = {v: k for k, v in PRODUCTKEY_FIELDS.items()}.get(name, name)
    return f"model.productkey_args.{theirs}"
  if field in ("model.max_seqlen", "train.seq_len") and "seq_len" in data_section:
    return "data.seq_len"
  # The `optim` fields keep Lingua's names, but for the table's rate.
  renamed = {
      "train.steps": "steps", "train.grad_accum": "grad_acc_steps",
      "train.batch_size": "data.batch_size", "train.checkpoint_every": "checkpoint.dump.every",
      "train.keep_checkpoints": "checkpoint.dump.keep", "train.log_every": "logging.freq",
      "optim.value_lr": "model.productkey_args.value_fixed_lr",
      "data.seed": "seed", "data.tokenizer_path": "data.tokenizer.path",
      "model.dtype": "distributed.model_dtype", "seed": "model.seed",
  }
  return renamed.get(field, field)
