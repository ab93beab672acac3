"""Meta Lingua configs (the reference's `TrainArgs`, as YAML or a checkpoint's `params.json`) mapped
onto memjax's `Config`, and memjax model configs written back in that format.

A Lingua config is a whole training setup: a `model` mapping (`LMTransformerArgs`, the memory in
`model.productkey_args`, `ProductKeyArgs`) among training sections. Every key of the reference's
`TrainArgs` tree is accounted for (`to_memjax` lists where each goes): mapped onto memjax's
fields; accepted with a warning naming it when it only concerns logging, profiling or speed
(`IGNORED`) or evaluation during training (`eval.harness`); or refused with a `ConfigError`
naming it when it would change training and memjax cannot honour it (an initial checkpoint,
tensor parallelism, float8). Keys the reference does not have are refused as unknown.
"""

from __future__ import annotations

import warnings
from typing import Any

from memjax.config import Config, ConfigError, from_dict

# TrainArgs' top-level keys besides `model`.
TRAIN_KEYS = (
    "name", "dump_dir", "seed", "grad_acc_steps", "gc_collect_freq", "probe_freq", "steps", "data",
    "optim", "distributed", "env", "checkpoint", "profiling", "logging", "async_eval_gpus", "eval",
)
# The scalar top-level keys and the sections' fields, with the reference's defaults
# (apps/main/train.py TrainArgs; lingua/{data,distributed,checkpoint,metrics,profiling}.py).
TRAIN_DEFAULTS: dict[str, Any] = {
    "name": "lingua", "dump_dir": "", "seed": 42, "grad_acc_steps": 1, "gc_collect_freq": 1000,
    "probe_freq": None, "steps": 1000, "async_eval_gpus": None, "eval": None,
}
DATA_DEFAULTS: dict[str, Any] = {
    "root_dir": None, "sources": {}, "batch_size": 2, "seq_len": 2048, "n_views": 2, "seed": 42,
    "add_bos": True, "add_eos": True, "load_async": True, "prefetch_size": 64,
    "tokenizer": {"name": "bytes", "path": None},
}
DISTRIBUTED_DEFAULTS: dict[str, Any] = {
    "dp_shard": 1, "dp_replicate": 1, "tp_size": 1, "memory_parallel_size": 1,
    "selective_activation_checkpointing": False, "checkpoint_each_layer": False, "compile": False,
    "fsdp_type": "no_shard", "model_dtype": "bf16", "float8_recipe": None,
    "float8_filter": r"layers\.[0-9]+\.", "matmul_allow_tf32": False, "detect_anomaly": False,
    "compile_cache_size_limit": 8, "spawn_method": "forkserver",
}
CHECKPOINT_DEFAULTS: dict[str, Any] = {
    "dump": {"every": 1000, "keep": 0}, "eval": {"every": 1000, "keep": 0}, "path": None,
    "init_ckpt_path": None, "continue_training_from_init": False,
}
LOGGING_DEFAULTS: dict[str, Any] = {"freq": 10, "acc_freq": None, "wandb": None}
# WandbArgs (lingua/metrics.py): every field defaults to None, wandb.init's own default.
WANDB_KEYS = (
    "job_type", "dir", "project", "entity", "tags", "group", "name", "notes",
    "config_exclude_keys", "config_include_keys", "anonymous", "mode", "allow_val_change",
    "resume", "force", "tensorboard", "sync_tensorboard", "monitor_gym", "save_code", "id",
    "fork_from", "resume_from",
)
# The ones memjax's train.wandb takes (the run's name is Lingua's top-level `name`, as the
# reference's training sets it); wandb's old "dryrun" mode is "offline".
WANDB_MAPPED = ("project", "entity", "group", "mode")
WANDB_MODES = {None: "online", "run": "online", "dryrun": "offline"}
PROFILING_DEFAULTS: dict[str, Any] = {
    "run": False, "trace_folder": "profiling", "mem_warmup": 100, "mem_steps": 2,
    "profile_warmup": 102, "profile_steps": 2,
}
ENV_DEFAULTS: dict[str, Any] = {
    "MKL_SERVICE_FORCE_INTEL": "GNU", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
    "ENABLE_INTRA_NODE_COMM": "1", "TORCH_NCCL_AVOID_RECORD_STREAMS": "1", "NCCL_IB_TIMEOUT": "22",
    "NCCL_DEBUG": "INFO", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
}
# Keys that change nothing memjax trains: accepted, and named in one warning when they differ
# from the reference's default. A section's name stands for all its keys.
IGNORED = {
    "name": "a run label; with logging.wandb, the wandb run's name",
    "gc_collect_freq": "when PyTorch's job collects Python garbage",
    "probe_freq": "activation probes written beside the logs",
    "async_eval_gpus": "where the reference runs its evals",
    "env": "environment variables for PyTorch, MKL and NCCL",
    "profiling": "the PyTorch profiler",
    "logging.acc_freq": "logging within gradient accumulation",
    **{f"logging.wandb.{k}": "a wandb.init argument memjax does not pass"
       for k in WANDB_KEYS if k not in WANDB_MAPPED},
    "logging.wandb.name": "the reference replaces it with the top-level name",
    "checkpoint.eval.keep": "checkpoints kept at eval steps; memjax keeps checkpoint.dump.keep",
    "data.load_async": "the data loader's reading ahead",
    "data.prefetch_size": "the data loader's reading ahead (Lingua's data layout is refused)",
    "distributed.dp_replicate": "the reference sets it from the world size; memjax's mesh.data "
                                "takes the devices the other axes leave",
    "distributed.compile": "torch.compile; memjax always compiles with XLA",
    "distributed.compile_cache_size_limit": "torch.compile's cache",
    "distributed.matmul_allow_tf32": "float32 matmul precision on NVIDIA GPUs (the model computes "
                                     "in model_dtype)",
    "distributed.detect_anomaly": "PyTorch's autograd anomaly checks",
    "distributed.spawn_method": "how PyTorch starts worker processes",
    "distributed.float8_filter": "the linears float8_recipe converts (float8 is refused)",
}
FSDP_TYPES = ("no_shard", "full_shard")

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
# `annealing_step` is read by none of the reference's schedules; `exp_factor` only by inv_sqrt.
OPTIM_KEYS = (
    "lr", "weight_decay", "epsilon", "beta1", "beta2", "clip", "scheduler", "warmup",
    "lr_min_ratio", "cycle_length", "cosine_theta", "annealing_step", "exp_factor",
)
# OptimArgs fields memjax's `optim` section takes (same names), with Lingua's defaults: a key the
# file leaves out trains as Lingua would (a cosine schedule), not at memjax's defaults.
OPTIM_DEFAULTS: dict[str, Any] = {
    "lr": 3e-4, "weight_decay": 0.1, "clip": 1.0, "scheduler": "cosine", "warmup": 2000,
    "lr_min_ratio": 0.1, "cycle_length": 1.0, "cosine_theta": 1.0,
}
# Lingua's "constant" is a multiplier of 1 from step 0, warmup ignored: memjax's linear schedule
# with no warmup and a floor of 1.
SCHEDULERS = ("linear", "cosine", "constant")
MODEL_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}

_MEMJAX_ONLY_MODEL_KEYS = ("memory", "moe", "peer", "param_dtype", "dtype", "remat")


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


def to_memjax(data: dict, training: bool = True) -> dict:
  """The memjax config (`Config` as nested mappings) of a Lingua config dict.

  - Model fields map by name; `n_heads: null` becomes dim // head_dim, as Lingua derives it.
  - `vocab_size: -1` (Lingua's "the tokenizer's") becomes `data.tokenizer.name`'s size.
  - `max_seqlen` is `data.seq_len` (Lingua's default 2048 when the file has none): Lingua's
    training overwrites it with that; it is also `train.seq_len`, the length Lingua trains on.
    `training=False` keeps the model's `max_seqlen` when there is no `data.seq_len`.
  - `distributed.model_dtype` is the compute dtype; parameters stay float32 (Lingua's FSDP master
    weights) and a memory table is bfloat16, as the reference creates and trains it (spec 1.6).
  - `model.seed` (default 42) is `seed`, the seed Lingua initialises the weights from;
    `data.seed` (default 42) is `data.seed`, the data order. The top-level `seed` seeds torch's
    global generator, which nothing of the reference's training draws from: accepted, unused.
  - `optim.{lr,weight_decay,clip,warmup,lr_min_ratio,scheduler,cycle_length,cosine_theta}` map
    onto memjax's `optim` of the same names, Lingua's defaults filling what the file leaves out
    (`scheduler: constant` is memjax's linear without warmup or decay);
    `productkey_args.value_fixed_lr` is `optim.value_lr` (null or 0: the table at the base rate
    `optim.lr`, as the reference's optimizer takes a falsy fixed rate).
  - `steps`, `dump_dir` (`train.run_dir`), `checkpoint.dump.{every,keep}`, `checkpoint.eval.every`
    (memjax's evals, `train.eval_every`) and `logging.freq` map by meaning, Lingua's defaults
    filling what the file leaves out (1000 steps, a batch of 2, every 1000 and 10); Lingua's
    `data.batch_size` is per data-parallel rank and micro step, so memjax's `train.batch_size`
    (per optimizer step, all devices) becomes `batch_size * grad_acc_steps` of one rank: multiply
    by the number of ranks you trained on.
  - `logging.wandb` is `train.wandb`: its project, entity, group and mode (null: online), and
    Lingua's top-level `name` as the run's name (as the reference's training sets it); its other
    keys are named in the warning below when set.
  - `distributed.memory_parallel_size` is `mesh.memory` (the table's columns split over it, the
    batch too) and `distributed.dp_shard` is `mesh.fsdp`; `mesh.data` takes the other devices.
  - Keys in `IGNORED` are named in one warning when they differ from the reference's default.
  - `data.root_dir` and `data.sources` are memjax's `lingua` data source (the same folders of
    `*.chunk.*.jsonl` files, mixed by weight), with `data.add_bos`/`add_eos`; with neither,
    memjax trains on its synthetic knowledge corpus, and says so.
  - `eval.harness` is named in a warning: memjax runs the harness on checkpoints
    (`python -m memjax.eval`), not during training.
  - Refused by name, as memjax cannot honour them:
    `checkpoint.{path,init_ckpt_path,continue_training_from_init}`,
    `data.n_views` other than 2, `distributed.tp_size` > 1,
    `distributed.float8_recipe`, and `optim.scheduler: inv_sqrt`.
  `training=False` reads the model of a trained run (a checkpoint's `params.json`): the keys that
  only say how to train it are neither refused nor warned about.
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
  sections = _sections(data)
  data_section, distributed = sections["data"], sections["distributed"]
  if training:
    _refuse_what_memjax_cannot_train(data, sections)
    _warn_ignored(data, sections)

  model = {k: m[k] for k in _SAME_MODEL_FIELDS}
  model["n_heads"] = m["n_heads"]
  if m["n_heads"] is None:
    if m["head_dim"] is None:
      raise ConfigError("model.n_heads", "set n_heads or head_dim (Lingua derives the other)")
    head_dim = _positive_int(m["head_dim"], "model.head_dim")
    model["n_heads"] = _positive_int(m["dim"], "model.dim") // head_dim
  model["vocab_size"] = _vocab_size(m["vocab_size"], data_section)
  # Lingua's training sets max_seqlen to data.seq_len (DataArgs' 2048 when the file has none).
  default_seq_len = DATA_DEFAULTS["seq_len"] if training else m["max_seqlen"]
  model["max_seqlen"] = data_section.get("seq_len", default_seq_len)
  model_dtype = distributed.get("model_dtype", "bf16")
  if not _one_of(model_dtype, MODEL_DTYPES):
    raise ConfigError(
        "distributed.model_dtype", f"must be one of {', '.join(MODEL_DTYPES)}, got {model_dtype!r}"
    )
  model["dtype"] = MODEL_DTYPES[model_dtype]
  model["remat"] = _remat_from(distributed)
  productkey_args = _mapping(m["productkey_args"], "model.productkey_args")
  model["memory"] = memory_from_productkey_args(productkey_args)
  out = {
      "model": model,
      "mesh": _mesh_from(distributed),
      "data": _data_from(data_section),
      "train": {"seq_len": model["max_seqlen"], **_train_from(data, sections)},
      "optim": _optim_from(data, productkey_args),
      "seed": m["seed"],
  }
  try:
    from_dict(Config, out)  # so errors name the Lingua key, not the memjax field it became
  except ConfigError as e:
    field = _lingua_field(e.field, data_section)
    raise ConfigError(field, f"{e.detail} (memjax field {e.field})") from None
  return out


def _sections(data: dict) -> dict[str, dict]:
  """TrainArgs' sections (defaults not filled in), their keys checked against the reference's."""
  known = {
      "data": (DATA_DEFAULTS, "DataArgs"),
      "distributed": (DISTRIBUTED_DEFAULTS, "DistributedArgs"),
      "checkpoint": (CHECKPOINT_DEFAULTS, "CheckpointArgs"),
      "logging": (LOGGING_DEFAULTS, "LoggingArgs"),
      "profiling": (PROFILING_DEFAULTS, "ProfilerArgs"),
      "env": (ENV_DEFAULTS, "EnvironmentArgs"),
  }
  out = {}
  for name, (defaults, what) in known.items():
    out[name] = _mapping(data.get(name), name)
    _no_unknown(out[name], defaults, name, what)
  _no_unknown(_mapping(out["data"].get("tokenizer"), "data.tokenizer"), DATA_DEFAULTS["tokenizer"],
              "data.tokenizer", "TokenizerArgs")
  _no_unknown(_mapping(out["logging"].get("wandb"), "logging.wandb"), WANDB_KEYS, "logging.wandb",
              "WandbArgs")
  for when in ("dump", "eval"):
    field = f"checkpoint.{when}"
    _no_unknown(_mapping(out["checkpoint"].get(when), field), ("every", "keep"), field, "SaveEvery")
  return out


def _refuse_what_memjax_cannot_train(data: dict, sections: dict[str, dict]) -> None:
  """Raises ConfigError naming the first key that would change training and that memjax lacks."""
  d, dist, ckpt = sections["data"], sections["distributed"], sections["checkpoint"]
  if bool(d.get("root_dir")) != bool(d.get("sources")):
    field = "data.sources" if d.get("root_dir") else "data.root_dir"
    raise ConfigError(field, "Lingua's data layout needs both data.root_dir (one folder per "
                      "source of *.chunk.*.jsonl files) and data.sources ({name: weight})")
  checks = (
      ("data.n_views", d.get("n_views", 2) == 2, "must be 2: memjax packs rows of seq_len + 1 "
       "tokens, the inputs and the targets shifted by one"),
      ("checkpoint.path", ckpt.get("path") is None, "must be null: memjax keeps checkpoints in "
       "train.run_dir (set dump_dir)"),
      ("checkpoint.init_ckpt_path", ckpt.get("init_ckpt_path") is None, "must be null: memjax "
       "starts from a fresh initialisation or resumes from train.run_dir; convert a reference "
       "checkpoint with memjax.interop.torch_checkpoint.load_consolidated and fine-tune it "
       "from a memjax config"),
      ("checkpoint.continue_training_from_init",
       ckpt.get("continue_training_from_init", False) is False,
       "must be false: memjax has no initial checkpoint (checkpoint.init_ckpt_path)"),
      ("distributed.tp_size", dist.get("tp_size", 1) == 1, "must be 1: memjax has no tensor "
       "parallelism; its mesh has data, fsdp (distributed.dp_shard) and memory "
       "(distributed.memory_parallel_size) axes"),
      ("distributed.float8_recipe", dist.get("float8_recipe") is None, "must be null: memjax "
       "computes in model_dtype, with no float8 linears"),
      ("distributed.fsdp_type", _one_of(dist.get("fsdp_type", "no_shard"), FSDP_TYPES),
       f"must be one of {', '.join(FSDP_TYPES)}"),
  )
  for field, ok, message in checks:
    if not ok:
      raise ConfigError(field, f"{message}, got {_get(data, field)!r}")
  evaluation = data.get("eval")
  if evaluation is not None:
    evaluation = _mapping(evaluation, "eval")
    # The reference's evaluation during training (EvalArgs; its harness defaults to an
    # LMHarnessArgs, so any `eval` runs it; the reference's own files add keys such as
    # `dataset_dir`) changes nothing that is trained: named in a warning, its keys unchecked.
    if evaluation.get("harness", {}) is not None:
      warnings.warn(
          "eval.harness: memjax runs no lm-eval-harness tasks during training; its own evals "
          "(eval loss, fact recall, memory diagnostics) run every train.eval_every steps "
          "(checkpoint.eval.every), and `python -m memjax.eval <run dir> --tasks ...` runs the "
          "harness's tasks on a checkpoint",
          stacklevel=4,
      )


def _warn_ignored(data: dict, sections: dict[str, dict]) -> None:
  """One warning naming the `IGNORED` keys the file sets to other than the reference's default."""
  defaults = {
      **{k: TRAIN_DEFAULTS[k]
         for k in ("name", "gc_collect_freq", "probe_freq", "async_eval_gpus")},
      "env": ENV_DEFAULTS, "profiling": PROFILING_DEFAULTS,
      "logging.acc_freq": LOGGING_DEFAULTS["acc_freq"],
      **{f"logging.wandb.{k}": None for k in WANDB_KEYS if k not in WANDB_MAPPED},
      "checkpoint.eval.keep": CHECKPOINT_DEFAULTS["eval"]["keep"],
      **{f"data.{k}": DATA_DEFAULTS[k] for k in ("load_async", "prefetch_size")},
      **{f"distributed.{k}": DISTRIBUTED_DEFAULTS[k] for k in (
          "dp_replicate", "compile", "compile_cache_size_limit", "matmul_allow_tf32", "detect_anomaly", "spawn_method",
          "float8_filter")},
  }
  if sections["logging"].get("wandb") is not None:
    del defaults["name"]  # the wandb run's name
  named = []
  for field, default in defaults.items():
    value = _get(data, field)
    if isinstance(default, dict) and isinstance(value, dict):
      value = {**default, **value}
    if value is not _MISSING and value != default:
      named.append(f"{field} ({IGNORED[field]})")
  if named:
    warnings.warn(
        "Lingua keys ignored, as they change nothing memjax trains: " + "; ".join(named),
        stacklevel=3,
    )
  if not sections["data"].get("root_dir") and not sections["data"].get("sources"):
    warnings.warn(
        "the Lingua config has no data.root_dir or data.sources: memjax trains on its synthetic "
        "knowledge corpus (data.source: knowledge)",
        stacklevel=3,
    )


_MISSING = object()


def _get(data: dict, field: str) -> Any:
  """The value at a dotted `field` of `data`, or _MISSING."""
  for key in field.split("."):
    if not isinstance(data, dict) or key not in data:
      return _MISSING
    data = data[key]
  return data


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
      "distributed": {"model_dtype": dtypes[m.dtype], **REMAT_FIELDS[m.remat]},
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
  if not _one_of(optim["scheduler"], SCHEDULERS):
    raise ConfigError(
        "optim.scheduler", f"must be one of {', '.join(SCHEDULERS)} (memjax has no inv_sqrt), "
        f"got {optim['scheduler']!r}"
    )
  if optim["scheduler"] == "constant":
    optim.update(scheduler="linear", warmup=0, lr_min_ratio=1.0)
  value_lr = productkey_args.get("value_fixed_lr", PRODUCTKEY_DEFAULTS["value_fixed_lr"])
  # null or 0: the reference's optimizer takes a falsy fixed rate as "the base rate" (the table
  # still has its own clip).
  optim["value_lr"] = optim["lr"] if value_lr is None or value_lr == 0 else value_lr
  return optim


def _train_from(data: dict, sections: dict[str, dict]) -> dict:
  """TrainConfig fields of Lingua's training sections, Lingua's defaults filling what the file
  leaves out (as its TrainArgs would)."""
  train: dict[str, Any] = {"steps": data.get("steps", TRAIN_DEFAULTS["steps"])}
  if data.get("dump_dir"):
    train["run_dir"] = data["dump_dir"]
  grad_acc = data.get("grad_acc_steps", TRAIN_DEFAULTS["grad_acc_steps"])
  if grad_acc != 1:
    train["grad_accum"] = grad_acc
  batch = sections["data"].get("batch_size", DATA_DEFAULTS["batch_size"])
  train["batch_size"] = batch * grad_acc if isinstance(batch, int) and isinstance(grad_acc, int) else batch
  checkpoint = sections["checkpoint"]
  dump = {**CHECKPOINT_DEFAULTS["dump"], **_mapping(checkpoint.get("dump"), "checkpoint.dump")}
  train["checkpoint_every"] = dump["every"]
  keep = dump["keep"]
  train["keep_checkpoints"] = 0 if isinstance(keep, int) and keep < 0 else keep  # -1: all
  evaluation = {**CHECKPOINT_DEFAULTS["eval"], **_mapping(checkpoint.get("eval"), "checkpoint.eval")}
  train["eval_every"] = evaluation["every"]
  train["log_every"] = sections["logging"].get("freq", LOGGING_DEFAULTS["freq"])
  wandb = sections["logging"].get("wandb")
  if wandb is not None:
    wandb = _mapping(wandb, "logging.wandb")
    train["wandb"] = {k: wandb[k] for k in WANDB_MAPPED if wandb.get(k) is not None}
    mode = wandb.get("mode")
    hashable = mode is None or isinstance(mode, str)  # a list from a file is refused later
    train["wandb"]["mode"] = WANDB_MODES.get(mode, mode) if hashable else mode
    train["wandb"]["name"] = data.get("name", TRAIN_DEFAULTS["name"])
  return train


# model.remat as Lingua's distributed fields (the inverse of `_remat_from`).
REMAT_FIELDS = {
    "none": {},
    "attention": {"selective_activation_checkpointing": True},
    "block": {"checkpoint_each_layer": True},
}


def _remat_from(distributed: dict) -> str:
  """model.remat of Lingua's activation checkpointing. checkpoint_each_layer recomputes each
  block whole, memjax's `block`. Selective checkpointing keeps most matmul outputs and recomputes
  the rest; memjax's nearest is `attention` (it recomputes attention's probabilities)."""
  each_layer = distributed.get("checkpoint_each_layer", False)
  selective = distributed.get("selective_activation_checkpointing", False)
  for field, value in (("checkpoint_each_layer", each_layer),
                       ("selective_activation_checkpointing", selective)):
    if not isinstance(value, bool):
      raise ConfigError(f"distributed.{field}", f"must be true or false, got {value!r}")
  return "block" if each_layer else "attention" if selective else "none"


def _mesh_from(distributed: dict) -> dict:
  """MeshConfig fields: the reference's memory-parallel and FSDP degrees; data fills the rest."""
  mesh = {}
  if "memory_parallel_size" in distributed:
    mesh["memory"] = distributed["memory_parallel_size"]
  if "dp_shard" in distributed:
    mesh["fsdp"] = distributed["dp_shard"]
  return mesh


def _data_from(data_section: dict) -> dict:
  """DataConfig fields: the data layout (`root_dir` and `sources`: memjax's `lingua` source), the
  framing, the tokenizer and the data-order seed."""
  out: dict[str, Any] = {"seed": data_section.get("seed", DATA_DEFAULTS["seed"])}
  if data_section.get("root_dir") and data_section.get("sources"):
    out |= {"source": "lingua", "root_dir": data_section["root_dir"],
            "sources": dict(_mapping(data_section["sources"], "data.sources"))}
  for key in ("add_bos", "add_eos"):
    out[key] = data_section.get(key, DATA_DEFAULTS[key])
  tokenizer = _mapping(data_section.get("tokenizer"), "data.tokenizer")
  name = tokenizer.get("name", "bytes")
  if not _one_of(name, TOKENIZER_KINDS):
    raise ConfigError(
        "data.tokenizer.name", f"must be one of {', '.join(TOKENIZER_KINDS)}, got {name!r}"
    )
  out["tokenizer"] = TOKENIZER_KINDS[name]
  if tokenizer.get("path"):
    out["tokenizer_path"] = tokenizer["path"]
  return out


# ----------------------------------------------------------------------------------------------


def _one_of(value: Any, names) -> bool:
  """Whether `value` is one of the string `names` (a list or mapping from a file is none)."""
  return isinstance(value, str) and value in names


def _mapping(value: Any, field: str) -> dict:
  if value is None:
    return {}
  if not isinstance(value, dict):
    raise ConfigError(field, f"must be a mapping, got {value!r}")
  return value


def _no_unknown(data: dict, known, field: str, what: str) -> None:
  unknown = sorted(set(data) - set(known), key=str)
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
  if not _one_of(name, TOKENIZER_VOCAB):
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
      "train.eval_every": "checkpoint.eval.every", "train.run_dir": "dump_dir",
      "train.wandb.mode": "logging.wandb.mode", "train.wandb.project": "logging.wandb.project",
      "train.wandb.entity": "logging.wandb.entity", "train.wandb.group": "logging.wandb.group",
      "train.wandb.name": "name",
      "optim.value_lr": "model.productkey_args.value_fixed_lr",
      "data.tokenizer_path": "data.tokenizer.path",
      "model.dtype": "distributed.model_dtype", "seed": "model.seed",
      "mesh.memory": "distributed.memory_parallel_size", "mesh.fsdp": "distributed.dp_shard",
  }
  return renamed.get(field, field)
