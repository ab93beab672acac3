"""Typed configuration: the schema, its validation, and the converter from plain mappings.

Dataclass defaults are the defaults; a YAML file states only what differs. Reading YAML files and
command lines, and mapping the reference's (Meta Lingua) files, is `memjax.config_loading`'s job:
this module imports neither YAML nor the interop code, so every module can depend on it.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from typing import Any, Literal

from pallas_kernels import impls

DType = Literal["float32", "bfloat16", "float16", "float64"]
InitStdFactor = Literal["disabled", "current_depth", "global_depth", "dim_ratio"]
# "auto" or an entry of the one table of lookup impls.
BagImpl = Literal["auto", *impls.NAMES]
MoEImpl = Literal["auto", "ragged", "blocked"]
Remat = Literal["none", "attention", "block"]
Scheduler = Literal["linear", "cosine"]
TableUpdate = Literal["dense", "sparse"]
DataSource = Literal["knowledge", "tfds", "files", "lingua", "arrayrecord"]
Initialize = Literal["auto", "on", "off"]
TokenizerKind = Literal["bytes", "sentencepiece", "tiktoken"]
WandbMode = Literal["disabled", "online", "offline"]


class ConfigError(ValueError):
  """A configuration value a user can fix; the message names the field and what is allowed."""

  def __init__(self, field: str, message: str):
    self.field = field
    self.detail = message
    super().__init__(f"{field}: {message}")

  def under(self, prefix: str) -> ConfigError:
    return ConfigError(f"{prefix}.{self.field}", self.detail)

  def __reduce__(self):  # rebuilt from both arguments, e.g. when raised in a worker process
    return ConfigError, (self.field, self.detail)


def _check(ok: bool, field: str, message: str) -> None:
  if not ok:
    raise ConfigError(field, message)


def _check_finite(config: Any, *names: str) -> None:
  """Each float field `names` of `config` is finite (or None): inf and nan pass most range checks
  (nan fails every comparison, inf passes > 0) and only show up later, as a diverged run."""
  for name in names:
    value = getattr(config, name)
    _check(value is None or math.isfinite(value), name, f"must be a finite number, got {value}")


def _check_seed(seed: int | None, field: str) -> None:
  _check(seed is None or 0 <= seed < 2**63, field, f"must be in [0, 2**63), got {seed}")


def _check_product_keys(n_keys: int, heads: int, knn: int, k_dim: int) -> None:
  """The product-key selection's sizes, shared by the memory layer and PEER."""
  _check(n_keys >= 1, "n_keys", f"must be >= 1, got {n_keys}")
  _check(heads >= 1, "heads", f"must be >= 1, got {heads}")
  _check(1 <= knn <= n_keys, "knn", f"must be in [1, n_keys={n_keys}], got {knn}")
  _check(
      k_dim >= 2 and k_dim % 2 == 0,
      "k_dim",
      f"must be even and >= 2 (it is split in two halves), got {k_dim}",
  )


def _check_layers(layers: tuple[int, ...]) -> None:
  _check(
      len(set(layers)) == len(layers) and all(i >= 0 for i in layers),
      "layers",
      f"must be distinct block indices >= 0, got {list(layers)}",
  )


@dataclasses.dataclass(frozen=True)
class MemoryConfig:
  """The product-key memory layers (spec 1.1). S slots = n_keys**2; V = v_dim; K = knn."""

  layers: tuple[int, ...] = ()  # 0-based blocks whose FFN becomes a memory layer; () = dense model
  n_keys: int = 1024  # sub-keys per half; slots = n_keys**2
  heads: int = 4  # query heads; their reads are summed into one bag
  knn: int = 32  # top-k per half and for the final selection
  k_dim: int = 512  # full key dim, split into two halves
  v_dim: int = -1  # value dim; -1 = model dim
  share_values: bool = True  # one table for every memory layer
  swilu: bool = True  # Memory+: silu gate from the input and a value projection
  gated: bool = False  # scalar sigmoid gate per token
  query_bias: bool = True
  qk_norm: bool = False  # RMS-normalise query halves and sub-keys (the paper; not in the reference code)
  input_dropout: float = 0.0
  query_dropout: float = 0.0
  value_dropout: float = 0.0
  value_dtype: DType = "float32"  # the reference keeps the table in bfloat16
  impl: BagImpl = "auto"  # lookup impl (pallas_kernels.impls); auto: the platform's

  def __post_init__(self):
    _check_product_keys(self.n_keys, self.heads, self.knn, self.k_dim)
    _check(
        self.v_dim == -1 or self.v_dim > 0,
        "v_dim",
        f"must be a positive int or -1 (the model dim), got {self.v_dim}",
    )
    _check_finite(self, "input_dropout", "query_dropout", "value_dropout")
    for name in ("input_dropout", "query_dropout", "value_dropout"):
      p = getattr(self, name)
      _check(0.0 <= p < 1.0, name, f"must be in [0, 1), got {p}")
    _check_layers(self.layers)

  @property
  def enabled(self) -> bool:
    return bool(self.layers)

  @property
  def n_slots(self) -> int:
    return self.n_keys**2


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """Routed mixture-of-experts FFN baseline (memjax.layers.moe). X experts, k of them per token."""

  layers: tuple[int, ...] = ()  # 0-based blocks whose FFN becomes an MoE; () = none
  experts: int = 8  # X SwiGLU experts per layer
  top_k: int = 2  # experts per token; their gates are the router's softmax renormalised over k
  hidden_dim: int = -1  # each expert's SwiGLU hidden size; -1 = the dense FFN's
  balance_coef: float = 0.01  # weight of the load-balancing loss added to the training loss
  impl: MoEImpl = "auto"  # grouped matmul: ragged_dot (accelerators) or blocked (CPU); auto picks
  block: int = 64  # rows per tile of the blocked impl; each expert's group is padded to it

  def __post_init__(self):
    _check_layers(self.layers)
    _check(self.experts >= 1, "experts", f"must be >= 1, got {self.experts}")
    _check(
        1 <= self.top_k <= self.experts,
        "top_k",
        f"must be in [1, experts={self.experts}], got {self.top_k}",
    )
    _check(
        self.hidden_dim == -1 or self.hidden_dim > 0,
        "hidden_dim",
        f"must be a positive int or -1 (the dense FFN's), got {self.hidden_dim}",
    )
    _check_finite(self, "balance_coef")
    _check(self.balance_coef >= 0, "balance_coef", f"must be >= 0, got {self.balance_coef}")
    _check(self.block >= 1, "block", f"must be >= 1, got {self.block}")


@dataclasses.dataclass(frozen=True)
class PEERConfig:
  """PEER baseline (memjax.layers.peer, spec 1.3 `peer_variant`): product keys pick K of S
  single-neuron experts per head; expert i is (u_i, v_i), out = sum_k w_k gelu(<x, u_k>) v_k."""

  layers: tuple[int, ...] = ()  # 0-based blocks whose FFN becomes a PEER layer; () = none
  n_keys: int = 64  # sub-keys per half; experts = n_keys**2
  heads: int = 4  # query heads; their experts are summed
  knn: int = 16  # experts per head (and top-k per half)
  k_dim: int = 128  # full key dim, split into two halves
  query_bias: bool = True
  impl: BagImpl = "auto"  # lookup implementation of the selection and the down projection

  def __post_init__(self):
    _check_layers(self.layers)
    _check_product_keys(self.n_keys, self.heads, self.knn, self.k_dim)

  @property
  def n_experts(self) -> int:
    return self.n_keys**2


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The decoder-only LM (Lingua conventions, spec 1.5 and 5.3). D = dim."""

  dim: int = 512
  n_layers: int = 8
  n_heads: int = 8
  head_dim: int | None = None  # None = dim // n_heads
  n_kv_heads: int | None = None  # None = n_heads (grouped-query attention when fewer)
  vocab_size: int = 258  # the byte tokenizer's
  multiple_of: int = 256  # the SwiGLU hidden size is rounded up to this
  ffn_dim_multiplier: float | None = None
  norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  max_seqlen: int = 1024
  init_base_std: float | None = None  # None = dim**-0.5
  init_std_factor: InitStdFactor = "disabled"
  param_dtype: DType = "float32"
  dtype: DType = "float32"  # compute dtype; norms, softmaxes and the loss run in float32
  # What the backward recomputes instead of keeping from the forward (memjax.model): none; the
  # attention probabilities (B, H, T, T) from the kept queries, keys and values; or each block
  # whole from its input (its forward runs twice)
  remat: Remat = "none"
  memory: MemoryConfig = dataclasses.field(default_factory=MemoryConfig)
  moe: MoEConfig = dataclasses.field(default_factory=MoEConfig)
  peer: PEERConfig = dataclasses.field(default_factory=PEERConfig)

  def __post_init__(self):
    for name in ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of", "max_seqlen"):
      _check(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
    if self.head_dim is None:
      _check(
          self.dim % self.n_heads == 0,
          "n_heads",
          f"must divide dim={self.dim} (or set head_dim), got {self.n_heads}",
      )
    else:
      _check(self.head_dim >= 2, "head_dim", f"must be >= 2, got {self.head_dim}")
    _check(
        self.resolved_head_dim % 2 == 0,
        "head_dim",
        f"must be even for rotary embeddings, got {self.resolved_head_dim}",
    )
    _check(
        self.n_heads % self.resolved_kv_heads == 0,
        "n_kv_heads",
        f"must divide n_heads={self.n_heads}, got {self.resolved_kv_heads}",
    )
    _check_finite(self, "ffn_dim_multiplier", "norm_eps", "rope_theta", "init_base_std")
    _check(self.norm_eps > 0, "norm_eps", f"must be > 0, got {self.norm_eps}")
    _check(self.rope_theta > 0, "rope_theta", f"must be > 0, got {self.rope_theta}")
    _check(
        self.ffn_dim_multiplier is None or self.ffn_dim_multiplier > 0,
        "ffn_dim_multiplier",
        f"must be > 0 or null, got {self.ffn_dim_multiplier}",
    )
    _check(
        self.init_base_std is None or self.init_base_std > 0,
        "init_base_std",
        f"must be > 0 or null (dim**-0.5), got {self.init_base_std}",
    )
    taken: dict[int, str] = {}
    for kind in ("memory", "moe", "peer"):
      layers = getattr(self, kind).layers
      bad = [i for i in layers if i >= self.n_layers]
      _check(
          not bad,
          f"{kind}.layers",
          f"block indices must be in [0, n_layers={self.n_layers}), got {bad}",
      )
      clash = sorted(i for i in layers if i in taken)
      _check(
          not clash,
          f"{kind}.layers",
          f"blocks {clash} are already in {taken[clash[0]] if clash else ''}.layers; a block "
          "has one FFN",
      )
      taken.update({i: kind for i in layers})

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim or self.dim // self.n_heads

  @property
  def resolved_kv_heads(self) -> int:
    return self.n_kv_heads or self.n_heads

  @property
  def ffn_hidden_dim(self) -> int:
    """Lingua's SwiGLU rule: int(2 * 4d / 3), times the multiplier, rounded up to multiple_of."""
    hidden = int(2 * (4 * self.dim) / 3)
    if self.ffn_dim_multiplier is not None:
      hidden = int(self.ffn_dim_multiplier * hidden)
    return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

  @property
  def value_dim(self) -> int:
    return self.memory.v_dim if self.memory.v_dim > 0 else self.dim

  @property
  def expert_hidden_dim(self) -> int:
    return self.moe.hidden_dim if self.moe.hidden_dim > 0 else self.ffn_hidden_dim


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """The device mesh (`memjax.sharding`): axis sizes, -1 = the devices the others leave."""

  data: int = -1  # pure data parallelism: the batch is split, everything else replicated
  fsdp: int = 1  # the batch is split and the dense parameters are sharded
  memory: int = 1  # the batch is split and the value table's columns are sharded
  table_rows_over_fsdp: bool = False  # also shard the table's rows over fsdp (gathered at use)

  def __post_init__(self):
    sizes = {"data": self.data, "fsdp": self.fsdp, "memory": self.memory}
    for name, size in sizes.items():
      _check(size == -1 or size >= 1, name, f"must be >= 1 or -1 (fill), got {size}")
    _check(
        sum(size == -1 for size in sizes.values()) <= 1,
        "data",
        f"at most one axis may be -1 (fill), got {sizes}",
    )


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where the tokens come from (`memjax.data`): source -> tokenizer -> packed batches."""

  source: DataSource = "knowledge"  # the embedded factual corpus, a TFDS dataset, or files
  people: int = 2000  # size of the knowledge corpus (fictional people, six facts each)
  name: str = ""  # TFDS dataset name, e.g. "my_dataset:1.0.0" (source=tfds)
  split: str = "train"
  eval_split: str = ""  # held-out TFDS split for eval loss; "" = no eval loss (source=tfds)
  data_dir: str = ""  # TFDS data_dir, local or gs://; "" = TFDS's default (memjax's cache for knowledge)
  path: str = ""  # glob of text or JSONL files (files); prepared directory (arrayrecord); or gs://
  eval_path: str = ""  # held-out files or prepared directory, as `path`; "" = no eval loss
  text_key: str = "text"  # the text feature of TFDS examples and JSONL records
  # Lingua's layout (source=lingua): root_dir/<name>/*.chunk.*.jsonl per source, drawn by weight.
  root_dir: str = ""  # local or gs://
  sources: dict[str, float] = dataclasses.field(default_factory=dict)  # source folder -> weight
  add_bos: bool = True  # frame every document as BOS doc EOS (the reference's defaults)
  add_eos: bool = True
  tokenizer: TokenizerKind = "bytes"  # the reference's byte ids: BOS 256, EOS 257
  tokenizer_path: str = ""  # model file of a sentencepiece or tiktoken tokenizer
  prefetch: int = 2  # batches prepared ahead of the step
  seed: int | None = None  # shuffling; None = the run's seed
  # Streams the global batch is drawn from, split evenly over the processes; 0 = one per process.
  # Fixing it (a multiple of every process count you will use) makes the batches, and so the
  # run, the same whatever the number of processes, and lets a run resume on another count.
  shards: int = 0

  def __post_init__(self):
    _check(self.people >= 1, "people", f"must be >= 1, got {self.people}")
    _check(self.prefetch >= 0, "prefetch", f"must be >= 0, got {self.prefetch}")
    _check(self.shards >= 0, "shards", f"must be >= 0 (0 = one per process), got {self.shards}")
    if self.source == "tfds":
      _check(bool(self.name), "name", "must name a TFDS dataset when source is 'tfds'")
    if self.source == "files":
      _check(bool(self.path), "path", "must be a glob of text/JSONL files when source is 'files'")
    if self.source == "arrayrecord":
      _check(bool(self.path), "path", "must be a prepared directory when source is 'arrayrecord'")
    _check_seed(self.seed, "seed")
    for name, weight in self.sources.items():
      _check(
          math.isfinite(weight) and weight > 0,
          f"sources.{name}",
          f"must be a finite weight > 0, got {weight}",
      )
    if self.source == "lingua":
      _check(bool(self.root_dir), "root_dir", "must be the sources' folder when source is 'lingua'")
      _check(bool(self.sources), "sources", "must map folders to weights when source is 'lingua'")


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  """Multi-process runs (`memjax.distributed`): every process runs the same command."""

  # auto: join when a coordinator is known (below or $JAX_COORDINATOR_ADDRESS) or a multi-process
  # Cloud TPU, Slurm or Open MPI job is detected; on: always (JAX detects what is not given).
  initialize: Initialize = "auto"
  coordinator: str = ""  # host:port of process 0; "" = $JAX_COORDINATOR_ADDRESS or detected
  num_processes: int = 0  # 0 = detected
  process_id: int = -1  # -1 = detected
  timeout: int = 300  # seconds to wait for every process to join

  def __post_init__(self):
    _check(self.num_processes >= 0, "num_processes", f"must be >= 0 (0 = detected), got {self.num_processes}")
    _check(self.process_id >= -1, "process_id", f"must be >= 0 or -1 (detected), got {self.process_id}")
    _check(
        self.num_processes == 0 or self.process_id < self.num_processes,
        "process_id",
        f"must be < num_processes={self.num_processes}, got {self.process_id}",
    )
    _check(
        not self.coordinator or re.fullmatch(r"\[?[\w.:-]+\]?:\d+", self.coordinator) is not None,
        "coordinator",
        f"must be host:port, got {self.coordinator!r}",
    )
    _check(self.timeout >= 1, "timeout", f"must be >= 1, got {self.timeout}")


@dataclasses.dataclass(frozen=True)
class WandbConfig:
  """Weights & Biases logging of the run (`pip install 'memjax[wandb]'`): the metrics that go to
  metrics.jsonl, and the config. A resumed run continues the same wandb run."""

  mode: WandbMode = "disabled"  # or online, or offline (files under run_dir/wandb; `wandb sync`)
  project: str = ""  # "" = wandb's default
  entity: str = ""  # team or user; "" = wandb's default
  name: str = ""  # the run's display name; "" = the run directory's name
  group: str = ""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """The training run of `train.py`: its length, batches, logging, evaluation and checkpoints."""

  steps: int = 200
  batch_size: int = 16  # sequences per optimizer step, over all devices and micro-batches
  seq_len: int = 128
  grad_accum: int = 1  # micro-batches per step (batch_size must divide evenly)
  nan_patience: int = 5  # non-finite steps in a row (each skipped) before the run stops
  # A step whose loss exceeds this factor times the running mean of the applied steps' losses is
  # skipped like a non-finite one (0 = off). Healthy runs stay far below 4x; divergence does not.
  loss_spike_factor: float = 4.0
  log_every: int = 20
  eval_every: int = 100  # eval loss, fact recall and memory diagnostics; also at the end
  eval_batches: int = 8
  probes: int = 512  # knowledge-probe questions scored per eval; 0 = all
  run_dir: str = ""  # checkpoints and logs; "" = runs/<config name>
  checkpoint_every: int = 100  # and at the end
  keep_checkpoints: int = 3  # 0 = keep all
  resume: bool = True  # continue from the newest checkpoint in run_dir
  # Continue from this checkpointed step instead of the newest (0 = the newest); the newer ones
  # are moved to run_dir/set_aside/, never deleted.
  resume_step: int = 0
  stop_after: int = 0  # end this invocation after N steps, with a checkpoint (0 = run to `steps`)
  tensorboard: bool = True  # event files beside metrics.jsonl
  wandb: WandbConfig = dataclasses.field(default_factory=WandbConfig)
  # "START:STOP": a JAX profiler trace of steps START to STOP - 1 in run_dir/profile; "" = none
  profile: str = ""
  # JAX's persistent compilation cache: a directory (local or gs://); "auto" =
  # $JAX_COMPILATION_CACHE_DIR, else memjax's cache dir + /jax (memjax.cache); "off" = none
  compilation_cache: str = "auto"

  def __post_init__(self):
    for name in ("steps", "batch_size", "seq_len", "grad_accum", "log_every", "eval_every",
                 "eval_batches", "checkpoint_every", "nan_patience"):
      _check(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
    _check(self.stop_after >= 0, "stop_after", f"must be >= 0, got {self.stop_after}")
    _check(self.keep_checkpoints >= 0, "keep_checkpoints", f"must be >= 0, got {self.keep_checkpoints}")
    _check(
        self.batch_size % self.grad_accum == 0,
        "grad_accum",
        f"must divide batch_size={self.batch_size}, got {self.grad_accum}",
    )
    _check(self.probes >= 0, "probes", f"must be >= 0, got {self.probes}")
    _check_finite(self, "loss_spike_factor")
    _check(self.loss_spike_factor == 0 or self.loss_spike_factor > 1, "loss_spike_factor",
           f"must be 0 (off) or > 1, got {self.loss_spike_factor}")
    _check(self.resume_step >= 0, "resume_step", f"must be >= 0, got {self.resume_step}")
    if self.profile:
      start, stop = self.profile_steps
      _check(start <= self.steps, "profile", f"starts after the last step {self.steps}, got "
             f"{self.profile!r}")
    _check(bool(self.compilation_cache), "compilation_cache",
           "must be a directory, 'auto' or 'off', got ''")

  @property
  def profile_steps(self) -> tuple[int, int]:
    """(START, STOP) of `profile`; the trace covers steps START <= step < STOP."""
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", self.profile)
    _check(
        match is not None and 1 <= int(match[1]) < int(match[2]),
        "profile",
        f"must be START:STOP with 1 <= START < STOP (the trace covers steps START to STOP - 1, "
        f"e.g. 10:15), got {self.profile!r}",
    )
    return int(match[1]), int(match[2])


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW as the reference trains memory models (spec 1.7), `memjax.optim`: the value table is
  its own group, with its own base learning rate and clip, under the one schedule."""

  lr: float = 3e-3  # base learning rate of every parameter but the value table
  value_lr: float = 1e-3  # base learning rate of the value table (the reference's value_fixed_lr)
  scheduler: Scheduler = "linear"  # after warmup: linear (the reference's) or cosine decay
  warmup: int = 30  # steps of linear warmup from 0
  lr_min_ratio: float = 0.01  # the decay ends at each base rate times lr_min_ratio
  # The reference's cosine: cos(pi * progress**cosine_theta / cycle_length); 1, 1 = a half-cycle.
  cycle_length: float = 1.0
  cosine_theta: float = 1.0
  weight_decay: float = 0.1  # on every parameter, the table included, as in the reference
  clip: float = 1.0  # global-norm clip, applied to the value table and to the rest separately
  state_dtype: DType = "float32"  # Adam moments; bfloat16 halves their memory
  # dense: AdamW moves and decays every table row each step (the reference); sparse: only the
  # rows the step read, from their gradients alone (no (S, V) gradient; docs/sparse_update.md)
  table_update: TableUpdate = "dense"

  def __post_init__(self):
    _check_finite(self, "lr", "value_lr", "lr_min_ratio", "cycle_length", "cosine_theta",
                  "weight_decay", "clip")
    _check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
    _check(self.value_lr >= 0, "value_lr", f"must be >= 0, got {self.value_lr}")
    _check(self.warmup >= 0, "warmup", f"must be >= 0, got {self.warmup}")
    _check(0 <= self.lr_min_ratio <= 1, "lr_min_ratio", f"must be in [0, 1], got {self.lr_min_ratio}")
    _check(self.cycle_length > 0, "cycle_length", f"must be > 0, got {self.cycle_length}")
    _check(self.cosine_theta > 0, "cosine_theta", f"must be > 0, got {self.cosine_theta}")
    _check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
    _check(self.clip > 0, "clip", f"must be > 0, got {self.clip}")


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything a run needs."""

  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
  optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
  distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
  seed: int = 0  # parameter initialisation, dropout and data order

  def __post_init__(self):
    _check_seed(self.seed, "seed")
    _check(
        self.mesh.memory == 1 or self.model.value_dim % self.mesh.memory == 0,
        "mesh.memory",
        f"must divide the value dim {self.model.value_dim} (the table's columns are split over "
        f"it), got {self.mesh.memory}",
    )
    _check(
        self.data.shards == 0 or self.train.batch_size % self.data.shards == 0,
        "data.shards",
        f"must divide train.batch_size={self.train.batch_size}, got {self.data.shards}",
    )
    _check(
        self.optim.table_update == "dense" or self.model.memory.enabled,
        "optim.table_update",
        "'sparse' updates a memory layer's value table; this model has no memory layers "
        "(model.memory.layers is empty)",
    )
    _check(
        self.train.seq_len <= self.model.max_seqlen,
        "train.seq_len",
        f"must be <= model.max_seqlen={self.model.max_seqlen}, got {self.train.seq_len}",
    )


# ----------------------------------------------------------------------------------------------
# From plain dicts (parsed YAML) to typed, validated dataclasses.


def _allowed(tp: Any) -> str:
  if typing.get_origin(tp) is Literal:
    return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
  return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, field: str) -> Any:
  origin = typing.get_origin(tp)
  if origin in (typing.Union, types.UnionType):
    options = typing.get_args(tp)
    if value is None and type(None) in options:
      return None
    errors = []
    for option in options:
      if option is type(None):
        continue
      try:
        return _convert(option, value, field)
      except ConfigError as e:
        errors.append(e.detail)
    raise ConfigError(field, " or ".join(errors) + (" or null" if type(None) in options else ""))
  if origin is Literal:
    if value not in typing.get_args(tp):
      raise ConfigError(field, f"must be {_allowed(tp)}, got {value!r}")
    return value
  if origin is tuple:
    (item_tp, _) = typing.get_args(tp)
    if isinstance(value, str):  # Lingua writes block lists as "4,12,20"
      value = [s for s in value.split(",") if s.strip()]
    if not isinstance(value, (list, tuple)):
      raise ConfigError(field, f"must be a list, got {value!r}")
    return tuple(_convert(item_tp, v, f"{field}[{i}]") for i, v in enumerate(value))
  if origin is dict:
    (key_tp, item_tp) = typing.get_args(tp)
    if not isinstance(value, dict):
      raise ConfigError(field, f"must be a mapping, got {value!r}")
    return {
        _convert(key_tp, k, field): _convert(item_tp, v, f"{field}.{k}") for k, v in value.items()
    }
  if dataclasses.is_dataclass(tp):
    if not isinstance(value, dict):
      raise ConfigError(field, f"must be a mapping, got {value!r}")
    return from_dict(tp, value, prefix=field)
  if tp is bool:
    if not isinstance(value, bool):
      raise ConfigError(field, f"must be true or false, got {value!r}")
    return value
  if tp is int:
    if isinstance(value, str):
      try:
        value = int(value.replace("_", ""))
      except ValueError:
        pass
    if isinstance(value, bool) or not isinstance(value, int):
      raise ConfigError(field, f"must be an int, got {value!r}")
    return value
  if tp is float:
    if isinstance(value, str):
      try:
        value = float(value)
      except ValueError:
        pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ConfigError(field, f"must be a number, got {value!r}")
    return float(value)
  if tp is str:
    if not isinstance(value, str):
      raise ConfigError(field, f"must be a string, got {value!r}")
    return value
  raise TypeError(f"unsupported config type {tp!r} for {field}")


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
  """Builds dataclass `cls` from `data`, checking every key and value; errors name the field."""
  hints = typing.get_type_hints(cls)
  fields = {f.name for f in dataclasses.fields(cls)}
  path = (lambda k: f"{prefix}.{k}" if prefix else k)
  unknown = sorted(set(data) - fields, key=str)  # YAML keys may be ints or null
  if unknown:
    raise ConfigError(
        path(unknown[0]), f"unknown key; {cls.__name__} has: {', '.join(sorted(fields))}"
    )
  kwargs = {k: _convert(hints[k], v, path(k)) for k, v in data.items()}
  try:
    return cls(**kwargs)
  except ConfigError as e:
    raise e.under(prefix) if prefix else e


def to_dict(config: Any) -> dict[str, Any]:
  """The inverse of `from_dict`: plain lists and dicts, ready for YAML or JSON."""

  def plain(v):
    if isinstance(v, tuple):
      return [plain(x) for x in v]
    if isinstance(v, dict):
      return {k: plain(x) for k, x in v.items()}
    return v

  return plain(dataclasses.asdict(config))
