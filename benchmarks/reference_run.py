"""A training run side by side with the reference's own PyTorch code: the same small Memory+ model,
the same initial weights, the same batches, each framework's optimizer and schedule, and the loss
of every step compared.

  python benchmarks/reference_run.py --reference PATH [--steps 50] [--json FILE] [--smoke]

PATH is a checkout of https://github.com/facebookresearch/memory (never vendored here: its licence
is not memjax's; `.reference/` is git-ignored for it). What runs from it: `LMTransformer` and
`HashingMemory` (apps/main/transformer.py, lingua/), `build_optimizer` (its AdamW parameter groups,
the table's fixed lr, the LambdaLR schedule; lingua/optim.py), `OptimArgs` for everything memjax's
config does not set (betas, epsilon). Its train loop (apps/main/train.py) is bound to CUDA and
torch.distributed, so this script steps the model the way that loop does: mean cross-entropy,
backward, the value table's gradient clipped on its own and the rest together, optimizer step,
scheduler step.

Two substitutions make the reference importable on a CPU machine, both outside the maths:
- its embedding bag is a Triton kernel (CUDA only): `torch.nn.functional.embedding_bag` with
  per-sample weights in sum mode takes its place (the reference names it as the equivalent in a
  comment of lingua/product_key/colwise_embedding_bag.py);
- `xformers` is imported for its attention and masks; without it, a module that raises on use
  stands in (this run uses the reference's `sdpa` attention).

memjax's initial weights go to the reference through `memjax.interop.torch_checkpoint.
export_consolidated` (its `params.json` builds the reference's model args), in float32 (the
reference's table is bfloat16 by default; both are cast to float32 here). Both run on CPU in
float32; the table must agree to 1e-4 relative on every step.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import pathlib
import sys
import tempfile
import types
from typing import NamedTuple

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from memjax import config_loading, sharding  # noqa: E402
from memjax.diagnostics import collect_selections  # noqa: E402
from memjax.config import Config, MeshConfig  # noqa: E402
from memjax.interop import torch_checkpoint  # noqa: E402
from memjax.training import state as state_lib  # noqa: E402
from memjax.training.step import jit_train_step  # noqa: E402

# A Memory+ model small enough for CPU that still exercises each part: 3 blocks, the last two
# memory layers sharing one table of 32^2 slots (2 heads x 8 reads each), SwiGLU in the first,
# 4 attention heads.
MODEL = [
    "model.dim=64", "model.n_layers=3", "model.n_heads=4", "model.vocab_size=256",
    "model.multiple_of=32", "model.max_seqlen=64", "model.memory.layers=[1,2]",
    "model.memory.n_keys=32", "model.memory.heads=2", "model.memory.knn=8",
    "model.memory.k_dim=32", "model.memory.value_dtype=float32",
]
# The reference's recipe shape (cosine, warmup, the table's own lr, decay on everything, clip 1)
# at rates that move a small model visibly within 50 steps.
RECIPE = [
    "optim.lr=3e-3", "optim.value_lr=1e-2", "optim.scheduler=cosine",
    "optim.lr_min_ratio=0.1", "optim.weight_decay=0.1", "optim.clip=1.0",
    "train.batch_size=8", "train.seq_len=32", "train.grad_accum=1",
]
TOLERANCE = 1e-4  # relative, per step


def memjax_config(steps: int, seed: int) -> Config:
  """The run's config; warmup 5 steps (fewer for a short run: the reference's schedule divides by
  steps - warmup)."""
  run = [f"train.steps={steps}", f"optim.warmup={min(5, steps // 4)}", f"seed={seed}"]
  return config_loading.load("tiny", [*MODEL, *RECIPE, *run])


def batches(cfg: Config, steps: int, seed: int) -> np.ndarray:
  """(steps, B, T + 1) token windows drawn from a pool of 4 x B fixed random sequences: a model
  that learns them shows its loss falling within a few dozen steps."""
  rng = np.random.default_rng(seed)
  b, t = cfg.train.batch_size, cfg.train.seq_len
  pool = rng.integers(0, cfg.model.vocab_size, (4 * b, t + 1), dtype=np.int32)
  return pool[rng.integers(0, len(pool), (steps, b))]


# ----------------------------------------------------------------------------------------------
# memjax


class Run(NamedTuple):
  losses: list[float]
  # Per step, the slots each memory layer read before the step: block -> (B*T, H, K), sorted.
  reads: list[dict[int, np.ndarray]]


def run_memjax(cfg: Config, tokens: np.ndarray, export_dir: pathlib.Path) -> Run:
  """memjax's train step on `tokens`; its initial weights exported to `export_dir` first."""
  mesh = sharding.make_mesh(MeshConfig(data=1), jax.devices()[:1])
  state = state_lib.create_state(cfg, mesh)
  graphdef = state_lib.model_graphdef(cfg)
  torch_checkpoint.export_consolidated(nnx.merge(graphdef, state.params, state.other), cfg, export_dir)
  step, _ = jit_train_step(cfg, mesh)
  run = Run([], [])
  for batch in tokens:
    selections = collect_selections(nnx.merge(graphdef, state.params, state.other), batch[:, :-1])
    run.reads.append({block: np.sort(np.asarray(slots), axis=-1)
                      for block, (slots, _) in selections.items()})
    state, metrics = step(state, batch)
    run.losses.append(float(metrics["loss"]))
  return run


# ----------------------------------------------------------------------------------------------
# The reference


@dataclasses.dataclass(frozen=True)
class Reference:
  torch: types.ModuleType
  LMTransformer: type
  LMTransformerArgs: type
  ProductKeyArgs: type
  HashingMemory: type
  OptimArgs: type
  build_optimizer: types.FunctionType


def _absent(name: str) -> types.ModuleType:
  """A module named `name` whose attributes raise when used: an import that this run never uses."""

  class Unavailable:
    def __init__(self, attr):
      self._attr = attr

    def __getattr__(self, attr):
      raise RuntimeError(f"{name}.{self._attr}.{attr}: {name} is not installed here (unused by "
                         "benchmarks/reference_run.py, which runs the reference's sdpa attention)")

    def __call__(self, *args, **kwargs):
      raise RuntimeError(f"{name}.{self._attr}: {name} is not installed here")

  def attribute(attr):
    if attr.startswith("__"):  # what tools probe modules for (inspect, pickle)
      raise AttributeError(attr)
    return Unavailable(attr)

  module = types.ModuleType(name)
  module.__getattr__ = attribute  # PEP 562: any other attribute is an Unavailable
  return module


def import_reference(root: pathlib.Path) -> Reference:
  """The reference's model, memory layer and optimizer, imported from the checkout at `root`."""
  if not (root / "lingua" / "product_key" / "memory.py").is_file():
    raise SystemExit(f"error: {root} is not a checkout of facebookresearch/memory "
                     "(no lingua/product_key/memory.py)")
  import torch
  import torch.nn.functional as F

  if importlib.util.find_spec("xformers") is None:
    ops = _absent("xformers.ops")
    ops.AttentionBias = type("AttentionBias", (), {})  # a type: it appears in annotations' Unions
    xformers = types.ModuleType("xformers")
    xformers.ops = ops
    sys.modules.update({"xformers": xformers, "xformers.ops": ops})
  bag = types.ModuleType("lingua.product_key.xformer_embeddingbag")

  def embedding_bag(indices, weight, per_sample_weights, mode="sum"):
    return F.embedding_bag(indices, weight, per_sample_weights=per_sample_weights, mode=mode)

  bag.xformers_embedding_bag = embedding_bag
  sys.modules[bag.__name__] = bag
  sys.path.insert(0, str(root))
  from apps.main.transformer import LMTransformer, LMTransformerArgs
  from lingua.optim import OptimArgs, build_optimizer
  from lingua.product_key.memory import HashingMemory, ProductKeyArgs

  return Reference(torch, LMTransformer, LMTransformerArgs, ProductKeyArgs, HashingMemory,
                   OptimArgs, build_optimizer)


def run_reference(ref: Reference, export_dir: pathlib.Path, tokens: np.ndarray, steps: int) -> Run:
  """The reference's model, loaded from memjax's export, trained on `tokens` as its loop does."""
  torch = ref.torch
  params = json.loads((export_dir / torch_checkpoint.PARAMS_NAME).read_text())
  model_args = dict(params["model"])
  model_args["productkey_args"] = ref.ProductKeyArgs(**model_args["productkey_args"])
  ref.HashingMemory.VALUES = None  # the shared table is a class attribute: start a fresh model
  model = ref.LMTransformer(ref.LMTransformerArgs(**model_args)).float()
  state = torch.load(export_dir / torch_checkpoint.CHECKPOINT_NAME, weights_only=True)["model"]
  missing, unexpected = model.load_state_dict(state, strict=False)
  missing = [k for k in missing if not k.endswith("freqs_cis")]  # a buffer computed at init
  if missing or unexpected:
    raise SystemExit(f"error: the export does not match the reference's model: missing "
                     f"{missing}, unexpected {unexpected}")
  # The reference hands the shared table to every later memory layer at the end of
  # HashingMemory.mp_parallelize, which its training always calls through FSDP; without a process
  # group, the same assignment by hand.
  for layer in model.modules():
    if isinstance(layer, ref.HashingMemory) and not layer.original:
      layer.values = ref.HashingMemory.VALUES
  optim_args = ref.OptimArgs(**params["optim"])
  optimizer, scheduler = ref.build_optimizer(model, optim_args, steps)
  values = [p for p in model.parameters() if hasattr(p, "pk_value_param")]
  rest = [p for p in model.parameters() if not hasattr(p, "pk_value_param")]
  if len(values) != 1:
    raise SystemExit(f"error: expected one value table in the reference's model, got {len(values)}")
  memories = {block: layer.feed_forward for block, layer in enumerate(model.layers)
              if isinstance(layer.feed_forward, ref.HashingMemory)}
  run = Run([], [])
  for batch in torch.from_numpy(tokens).long():
    model.eval()  # where HashingMemory keeps its last selection (no dropout either way)
    with torch.no_grad():
      model(batch[:, :-1])
    run.reads.append({block: np.sort(m.last_indices.numpy(), axis=-1) for block, m in memories.items()})
    model.train()
    loss = model(batch[:, :-1], batch[:, 1:])
    loss.backward()
    torch.nn.utils.clip_grad_norm_(values, max_norm=optim_args.clip)
    torch.nn.utils.clip_grad_norm_(rest, max_norm=optim_args.clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    run.losses.append(loss.item())
  return run


# ----------------------------------------------------------------------------------------------


def compare(ours: Run, theirs: Run) -> list[dict]:
  """Per step: both losses, their relative difference, and how many (token, head) reads chose a
  different set of slots (a near-tie in the top-k that rounding broke differently)."""
  rows = []
  for i, (a, b) in enumerate(zip(ours.losses, theirs.losses)):
    reads = [np.any(ours.reads[i][k].reshape(r.shape) != r, axis=-1) for k, r in theirs.reads[i].items()]
    rows.append({"step": i + 1, "memjax": a, "reference": b, "rel_diff": abs(a - b) / abs(b),
                 "reads_differing": int(sum(r.sum() for r in reads)),
                 "reads": int(sum(r.size for r in reads))})
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--reference", type=pathlib.Path, required=True,
                      help="a checkout of github.com/facebookresearch/memory")
  parser.add_argument("--steps", type=int, default=50)
  parser.add_argument("--seed", type=int, default=0, help="initialisation and batches")
  parser.add_argument("--json", type=pathlib.Path, help="write the table here")
  parser.add_argument("--smoke", action="store_true", help="8 steps")
  args = parser.parse_args()
  steps = 8 if args.smoke else args.steps
  ref = import_reference(args.reference.resolve())
  ref.torch.manual_seed(args.seed)
  ref.torch.set_num_threads(os.cpu_count() or 1)
  cfg = memjax_config(steps, args.seed)
  tokens = batches(cfg, steps, args.seed)
  with tempfile.TemporaryDirectory() as tmp:
    export_dir = pathlib.Path(tmp) / "init"
    ours = run_memjax(cfg, tokens, export_dir)
    theirs = run_reference(ref, export_dir, tokens, steps)
  rows = compare(ours, theirs)
  worst = max(rows, key=lambda r: r["rel_diff"])
  print(f"{'step':>4}  {'memjax':>10}  {'reference':>10}  {'rel. diff':>9}  reads differing")
  for r in rows:
    print(f"{r['step']:>4}  {r['memjax']:>10.6f}  {r['reference']:>10.6f}  {r['rel_diff']:>9.2e}"
          f"  {r['reads_differing']:>4} of {r['reads']}")
  ok = worst["rel_diff"] <= TOLERANCE and all(map(math.isfinite, ours.losses + theirs.losses))
  agreeing = [r["rel_diff"] for r in rows if not r["reads_differing"]]
  print(f"largest relative difference {worst['rel_diff']:.2e} at step {worst['step']} "
        f"({'within' if ok else 'above'} {TOLERANCE:g}); {max(agreeing, default=0):.2e} over the "
        f"{len(agreeing)} steps where every read chose the same slots")
  if args.json:
    args.json.write_text(json.dumps({
        "command": " ".join(["python", "benchmarks/reference_run.py", *sys.argv[1:]]),
        "config": [*MODEL, *RECIPE], "warmup": cfg.optim.warmup, "steps": steps, "seed": args.seed,
        "tolerance": TOLERANCE, "max_rel_diff": worst["rel_diff"],
        "max_rel_diff_same_reads": max(agreeing, default=0), "rows": rows,
    }, indent=1) + "\n")
  raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
  main()
