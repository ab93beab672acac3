"""Forward and forward+backward time of one memory layer: memjax against the PyTorch oracle.

The oracle layer (memjax/interop/torch_reference.py) is the reference's maths with `F.embedding_bag`, as the
reference runs on CPU. Both layers hold the same weights and read the same input; the backward
computes every parameter gradient and the input gradient. Times are minima over interleaved rounds.

  python benchmarks/memory_layer.py [--json FILE] [--repeats 10] [--parts] [--smoke] [--impl auto]

memjax runs with the lookup impl `--impl` ("auto": the C++ CPU kernels when they build, else
"xla", the pure-JAX path).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from flax import nnx

from memjax.config import MemoryConfig, ModelConfig
from memjax.layers.memory import ProductKeyMemory
from memjax.ops import embedding_bag, resolve_impl
from memjax.interop.torch_reference import OracleMemory, load_into_oracle

# The shape: B=16, T=256, dim 256, n_keys 256, 4 heads, knn 32, k_dim 512, float32.
FULL = dict(batch=16, seq=256, dim=256, n_keys=256, heads=4, knn=32, k_dim=512)
SMOKE = dict(batch=2, seq=32, dim=64, n_keys=32, heads=2, knn=8, k_dim=64)


def best_times(fns: dict, rounds: int) -> dict:
  """Minimum time of each function, measured in interleaved rounds so drift hits all alike."""
  for fn in fns.values():
    fn()  # compile / warm up
  times = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  return {name: min(ts) for name, ts in times.items()}


def stage_timers(graphdef, params, rest, oracle, x_np, impl: str) -> dict:
  """The layer's two costly stages alone: slot selection (scores and top-k) and the bag."""
  x_ND = x_np.reshape(-1, x_np.shape[-1])
  layer = nnx.merge(graphdef, params, rest)
  slots_NHK, weights_NHK = layer.select(jnp.asarray(x_ND))
  n = x_ND.shape[0]
  idx_NB, w_NB = slots_NHK.reshape(n, -1), weights_NHK.reshape(n, -1)
  values = params["values"][...]
  cot_NV = jnp.ones((n, values.shape[1]), jnp.float32)

  select = jax.jit(lambda p, x: nnx.merge(graphdef, p, rest).select(x))
  bag_grads = jax.jit(
      jax.grad(
          lambda v, w: jnp.sum(embedding_bag(v, idx_NB, w, impl=impl) * cot_NV), argnums=(0, 1)
      )
  )
  x_t = torch.from_numpy(x_ND)
  idx_t = torch.from_numpy(np.array(idx_NB)).long()
  w_t = torch.from_numpy(np.array(w_NB))
  table_t = oracle.values.weight

  def torch_select():
    with torch.no_grad():
      oracle.select(x_t)

  def torch_bag():
    table_t.grad = None
    w = w_t.clone().requires_grad_(True)
    F.embedding_bag(idx_t, table_t, per_sample_weights=w, mode="sum").sum().backward()

  return {
      "memjax_select_fwd_s": lambda: jax.block_until_ready(select(params, jnp.asarray(x_ND))),
      "memjax_bag_fwd_bwd_s": lambda: jax.block_until_ready(bag_grads(values, w_NB)),
      "torch_select_fwd_s": torch_select,
      "torch_bag_fwd_bwd_s": torch_bag,
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--json", type=pathlib.Path, help="write the figures here")
  parser.add_argument("--repeats", type=int, default=10, help="interleaved rounds")
  parser.add_argument("--smoke", action="store_true", help="tiny shapes, for tests")
  parser.add_argument(
      "--parts", action="store_true", help="also time slot selection and the embedding bag alone"
  )
  parser.add_argument("--impl", default="auto", help="lookup impl: auto, xla or cpu")
  args = parser.parse_args()
  shape = SMOKE if args.smoke else FULL
  impl = resolve_impl(args.impl)

  cfg = ModelConfig(
      dim=shape["dim"], n_layers=1, n_heads=4,
      memory=MemoryConfig(
          layers=(0,), n_keys=shape["n_keys"], heads=shape["heads"], knn=shape["knn"],
          k_dim=shape["k_dim"], impl=impl,
      ),
  )
  layer = ProductKeyMemory(cfg, rngs=nnx.Rngs(0))
  oracle = OracleMemory(cfg)
  load_into_oracle(oracle, layer)

  rng = np.random.default_rng(0)
  x_np = rng.standard_normal((shape["batch"], shape["seq"], shape["dim"])).astype(np.float32)
  g_np = rng.standard_normal(x_np.shape).astype(np.float32)  # output cotangent

  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
  x, g = jnp.asarray(x_np), jnp.asarray(g_np)

  @jax.jit
  def jax_fwd(params, x):
    return nnx.merge(graphdef, params, rest)(x)

  @jax.jit
  def jax_fwd_bwd(params, x):
    loss = lambda p, x: jnp.sum(nnx.merge(graphdef, p, rest)(x) * g)
    return jax.grad(loss, argnums=(0, 1))(params, x)

  x_t, g_t = torch.from_numpy(x_np), torch.from_numpy(g_np)

  def torch_fwd():
    with torch.no_grad():
      oracle(x_t)

  def torch_fwd_bwd():
    oracle.zero_grad(set_to_none=True)
    xr = x_t.clone().requires_grad_(True)
    (oracle(xr) * g_t).sum().backward()

  timed = {
      "memjax_fwd_s": lambda: jax.block_until_ready(jax_fwd(params, x)),
      "memjax_fwd_bwd_s": lambda: jax.block_until_ready(jax_fwd_bwd(params, x)),
      "torch_fwd_s": torch_fwd,
      "torch_fwd_bwd_s": torch_fwd_bwd,
  }
  if args.parts:
    timed.update(stage_timers(graphdef, params, rest, oracle, x_np, impl))
  results = best_times(timed, args.repeats)
  passes = [("fwd", "fwd"), ("fwd+bwd", "fwd_bwd")]
  if args.parts:
    passes += [("slot selection fwd", "select_fwd"), ("embedding bag fwd+bwd", "bag_fwd_bwd")]
  for _, key in passes:
    results[f"speedup_{key}"] = results[f"torch_{key}_s"] / results[f"memjax_{key}_s"]

  print(
      f"memory layer, B={shape['batch']} T={shape['seq']} dim={shape['dim']} "
      f"n_keys={shape['n_keys']} heads={shape['heads']} knn={shape['knn']} "
      f"k_dim={shape['k_dim']}, float32, memjax impl {impl}, {os.cpu_count()} CPUs, torch threads "
      f"{torch.get_num_threads()}, jax {jax.__version__}, torch {torch.__version__}"
  )
  print("| pass | memjax (s) | torch oracle (s) | speedup |")
  print("|---|---|---|---|")
  for name, key in passes:
    print(
        f"| {name} | {results[f'memjax_{key}_s']:.4f} | {results[f'torch_{key}_s']:.4f} | "
        f"{results[f'speedup_{key}']:.2f}x |"
    )
  if args.json:
    args.json.write_text(json.dumps({**results, "impl": impl, "shape": shape}, indent=2))


if __name__ == "__main__":
  main()
