"""Train-step time and tokens/s of dense, Memory, Memory+, MoE and PEER models with the same dense
dims, with FLOPs per token from the compiled step's cost analysis and parameters (total, active).

  python benchmarks/train_throughput.py [--json FILE] [--smoke] [--repeats 5] [--steps 5]

The models are configs/tiny.yaml's shape (dim 128, 4 blocks, batch 16 x 128 bytes): the sparse
layers replace the FFNs of blocks 1 and 3. Each step is the jitted train step of `train.py`
(forward, backward, AdamW) on random tokens. Models are timed in interleaved rounds of `--steps`
steps each; a model's time is its best round's mean step (the machine is shared and noisy).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from memjax import config as config_lib  # noqa: E402
from memjax import config_loading  # noqa: E402
from memjax import sharding  # noqa: E402
from memjax.model import Transformer, parameter_counts  # noqa: E402
from memjax.training import state as state_lib  # noqa: E402
from memjax.training import step as step_lib  # noqa: E402

SPARSE = "[1,3]"
MODELS = {
    "dense": ["model.memory.layers=[]"],
    "Memory": [f"model.memory.layers={SPARSE}", "model.memory.swilu=false"],
    "Memory+": [f"model.memory.layers={SPARSE}"],
    # Top-2 of 8 experts of half the dense hidden size (512 at dim 128): the dense FFN's FLOPs.
    "MoE": ["model.memory.layers=[]", f"model.moe.layers={SPARSE}", "model.moe.experts=8",
            "model.moe.top_k=2", "model.moe.hidden_dim=256"],
    # Memory+'s heads, knn and k_dim; 64^2 single-neuron experts per layer.
    "PEER": ["model.memory.layers=[]", f"model.peer.layers={SPARSE}", "model.peer.n_keys=64"],
}
FULL = dict(batch_size=16, seq_len=128)
SMOKE = dict(batch_size=4, seq_len=32)
SMOKE_DIMS = ["model.dim=32", "model.n_heads=2", "model.memory.n_keys=16", "model.memory.knn=4",
              "model.memory.k_dim=32", "model.peer.n_keys=16", "model.peer.knn=4",
              "model.peer.k_dim=32", "model.moe.hidden_dim=64"]


def one_device_mesh() -> jax.sharding.Mesh:
  return sharding.make_mesh(config_lib.MeshConfig(data=1), jax.devices()[:1])


def parameter_counts_of(cfg: config_lib.Config) -> dict[str, int]:
  """Total and active parameters of `cfg`'s model, from an abstract model (nothing allocated)."""
  return parameter_counts(nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0))))


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


def train_step_flops(cfg: config_lib.Config) -> float:
  """FLOPs of one train step (all its tokens) by XLA's cost analysis of the compiled program."""
  mesh = one_device_mesh()
  with jax.set_mesh(mesh):
    jitted, abstract_args = step_lib.jit_train_step(cfg, mesh)
    return _flops(jitted.lower(*abstract_args()).compile())


class Timed:
  """One model's compiled step, its state and a batch; `run(n)` takes n steps."""

  def __init__(self, cfg: config_lib.Config, mesh):
    self.cfg, self.mesh = cfg, mesh
    with jax.set_mesh(mesh):
      jitted, abstract_args = step_lib.jit_train_step(cfg, mesh)
      self.compiled = jitted.lower(*abstract_args()).compile()
      self.state = state_lib.create_state(cfg, mesh)
    tokens = np.random.default_rng(0).integers(
        0, 256, (cfg.train.batch_size, cfg.train.seq_len + 1), dtype=np.int32
    )
    self.batch = jax.device_put(jnp.asarray(tokens), sharding.batch_sharding(mesh))

  def run(self, steps: int) -> float:
    start = time.perf_counter()
    with jax.set_mesh(self.mesh):
      for _ in range(steps):
        self.state, metrics = self.compiled(self.state, self.batch)
      jax.block_until_ready((self.state, metrics))
    return (time.perf_counter() - start) / steps


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--json", type=pathlib.Path, help="write the figures here")
  parser.add_argument("--smoke", action="store_true", help="tiny shapes, for tests")
  parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
  parser.add_argument("--steps", type=int, default=5, help="steps per round")
  parser.add_argument("--models", nargs="*", default=list(MODELS), help=f"of {list(MODELS)}")
  args = parser.parse_args()
  shape = SMOKE if args.smoke else FULL
  if args.smoke:  # same maths, programs compiled ~2.5x faster: a smoke run is mostly compiles
    jax.config.update("jax_disable_most_optimizations", True)
  base = [f"train.batch_size={shape['batch_size']}", f"train.seq_len={shape['seq_len']}"]
  base += SMOKE_DIMS if args.smoke else []
  mesh = one_device_mesh()

  timed, results = {}, {}
  for name in args.models:
    cfg = config_loading.load("tiny", base + MODELS[name])
    timed[name] = Timed(cfg, mesh)
    timed[name].run(1)  # warm up
    counts = parameter_counts_of(cfg)
    tokens = shape["batch_size"] * shape["seq_len"]
    results[name] = {
        "flops_per_token": _flops(timed[name].compiled) / tokens,
        "params_total": counts["total"],
        "params_active": counts["active"],
        "step_s": float("inf"),
    }
  for _ in range(args.repeats):
    for name in args.models:
      results[name]["step_s"] = min(results[name]["step_s"], timed[name].run(args.steps))
  tokens = shape["batch_size"] * shape["seq_len"]
  base_step = results.get("dense", next(iter(results.values())))["step_s"]
  for r in results.values():
    r["tokens_per_s"] = tokens / r["step_s"]
    r["vs_dense"] = r["step_s"] / base_step

  cfg = config_loading.load("tiny", base)
  print(
      f"train step, dim {cfg.model.dim}, {cfg.model.n_layers} blocks (sparse layers in {SPARSE}), "
      f"batch {shape['batch_size']} x {shape['seq_len']}, float32, {os.cpu_count()} CPUs, "
      f"jax {jax.__version__}; best of {args.repeats} rounds of {args.steps} steps"
  )
  print("| model | step (ms) | vs dense | tokens/s | FLOPs/token (train) | params total | params active |")
  print("|---|---|---|---|---|---|---|")
  for name, r in results.items():
    print(
        f"| {name} | {r['step_s'] * 1e3:.1f} | {r['vs_dense']:.2f}x | {r['tokens_per_s']:,.0f} | "
        f"{r['flops_per_token'] / 1e6:.2f}M | {r['params_total'] / 1e6:.3f}M | "
        f"{r['params_active'] / 1e6:.3f}M |"
    )
  if args.json:
    args.json.write_text(json.dumps({"shape": shape, "models": results}, indent=2))


if __name__ == "__main__":
  main()
