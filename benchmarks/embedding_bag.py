"""The lookup alone, per impl: forward and backward time, next to the bytes a call must move.

  python benchmarks/embedding_bag.py [--slots 65536] [--dim 256] [--tokens 2048] [--bag 128]
      [--dtype float32] [--repeats 5] [--tpu-cost v5e:2x2] [--json FILE]

For every impl built for this platform that runs here, and the `xla` twin (another platform's
kernels would time an interpreter), plus torch's `F.embedding_bag` on CPU, and with `--tpu-cost`
the TPU impl (`pallas_tpu`) compiled for a TPU chip through libtpu (its compiled bytes only): the median time of a forward and of a
forward plus backward (table and weight gradients), with uniform random ids. Beside them, the floor:
the bytes a call cannot avoid moving (each lookup's row read once, the ids, weights and output; the
backward also reads the output gradient and writes the dense table gradient), and the compiled
program's own estimate (XLA's cost analysis, "bytes accessed"). On CPU the floor is DRAM traffic if
nothing hit the caches; on a TPU it is HBM traffic, the bound on the time.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from memjax.ops import auto_impl, embedding_bag, unavailable_reason  # noqa: E402
from pallas_kernels import impls  # noqa: E402


def floor_bytes(slots, dim, tokens, bag, itemsize, backward):
  """Bytes a lookup must move: rows read, ids and weights, the float32 output (and the backward's
  output-gradient read, rows re-read for the weight gradient, and dense table-gradient write)."""
  lookups = tokens * bag
  forward = lookups * (dim * itemsize + 8) + tokens * dim * 4
  if not backward:
    return forward
  return forward + tokens * dim * 4 + lookups * (dim * itemsize + 4) + slots * dim * itemsize


def median_seconds(fn, args, repeats):
  jax.block_until_ready(fn(*args))  # compile and warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def compiled_bytes(fn, args):
  cost = fn.lower(*args).compile().cost_analysis() or {}
  cost = cost[0] if isinstance(cost, list) else cost
  return float(cost.get("bytes accessed", float("nan")))


def jax_row(impl, values, idx, w, cot, repeats):
  forward = jax.jit(lambda v, i, w: embedding_bag(v, i, w, impl=impl))
  loss = lambda v, i, w: jnp.sum(embedding_bag(v, i, w, impl=impl) * cot)
  backward = jax.jit(jax.grad(loss, argnums=(0, 2)))
  args = (values, idx, w)
  return {
      "forward_s": median_seconds(forward, args, repeats),
      "backward_s": median_seconds(backward, args, repeats),
      "forward_compiled_bytes": compiled_bytes(forward, args),
      "backward_compiled_bytes": compiled_bytes(backward, args),
  }


def tpu_cost_row(topology, values, idx, w, cot):
  """The TPU impl's lookup compiled ahead of time for one chip of a TPU topology (libtpu, no
  TPU needed): XLA's bytes accessed, which count the kernels' own cost estimates."""
  import os

  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies

  device = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices[0]
  sharding = jax.sharding.SingleDeviceSharding(device)
  spec = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
  impl = auto_impl("tpu")
  forward = jax.jit(lambda v, i, w: embedding_bag(v, i, w, impl=impl))
  loss = lambda v, i, w, c: jnp.sum(embedding_bag(v, i, w, impl=impl) * c)
  backward = jax.jit(jax.grad(loss, argnums=(0, 2)))
  return {"forward_s": None, "backward_s": None,
          "forward_compiled_bytes": compiled_bytes(forward, [spec(a) for a in (values, idx, w)]),
          "backward_compiled_bytes": compiled_bytes(
              backward, [spec(a) for a in (values, idx, w, cot)])}


def torch_row(values, idx, w, cot, repeats):
  import torch

  table = torch.tensor(np.asarray(values.astype(jnp.float32)), dtype=torch.float32)
  if values.dtype == jnp.bfloat16:
    table = table.to(torch.bfloat16)
  ids = torch.tensor(np.asarray(idx), dtype=torch.int64)
  weights = torch.tensor(np.asarray(w), dtype=table.dtype)
  grad_out = torch.tensor(np.asarray(cot), dtype=table.dtype)
  bag = lambda t, ws: torch.nn.functional.embedding_bag(ids, t, per_sample_weights=ws, mode="sum")

  def forward():
    with torch.no_grad():
      bag(table, weights)

  def backward():
    t = table.detach().requires_grad_()
    ws = weights.detach().requires_grad_()
    bag(t, ws).backward(grad_out)

  def timed(fn):
    fn()
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      fn()
      times.append(time.perf_counter() - start)
    return statistics.median(times)

  return {"forward_s": timed(forward), "backward_s": timed(backward),
          "forward_compiled_bytes": None, "backward_compiled_bytes": None}


def impls_here() -> list[str]:
  """The impls to time on this backend: the `xla` twin, and those whose kernels are built for
  this platform and run here (another platform's kernels would time an interpreter)."""
  here = jax.default_backend()
  return [impl.name for impl in impls.IMPLS
          if impl.platform in (None, here) and unavailable_reason(impl.name) is None]


def run(slots, dim, tokens, bag, dtype, repeats, with_torch=True, tpu_cost=None):
  rng = np.random.default_rng(0)
  values = jnp.asarray(rng.standard_normal((slots, dim)), dtype)
  idx = jnp.asarray(rng.integers(0, slots, (tokens, bag)), jnp.int32)
  w = jnp.asarray(rng.random((tokens, bag)), jnp.float32)
  cot = jnp.asarray(rng.standard_normal((tokens, dim)), jnp.float32)
  itemsize = jnp.dtype(dtype).itemsize
  rows = {impl: jax_row(impl, values, idx, w, cot, repeats) for impl in impls_here()}
  if with_torch and jax.default_backend() == "cpu":
    try:
      rows["torch"] = torch_row(values, idx, w, cot, repeats)
    except ImportError:
      pass
  if tpu_cost:
    rows[f"{auto_impl('tpu')} ({tpu_cost} AOT)"] = tpu_cost_row(tpu_cost, values, idx, w, cot)
  return {
      "platform": jax.default_backend(),
      "device": jax.devices()[0].device_kind,
      "shape": {"slots": slots, "dim": dim, "tokens": tokens, "bag": bag, "dtype": str(dtype)},
      "floor_bytes": {"forward": floor_bytes(slots, dim, tokens, bag, itemsize, False),
                      "backward": floor_bytes(slots, dim, tokens, bag, itemsize, True)},
      "impls": rows,
  }


def table(result) -> str:
  s, floor = result["shape"], result["floor_bytes"]
  # Custom calls (the cpu kernels) carry no cost analysis: "-".
  mb = lambda b: "-" if b is None or not b > 0 else f"{b / 1e6:,.1f}"
  lines = [
      f"{result['device']} ({result['platform']}): table {s['slots']} x {s['dim']} {s['dtype']}, "
      f"{s['tokens']} tokens x bag {s['bag']}",
      "| impl | forward ms | backward ms | forward MB floor / compiled | "
      "backward MB floor / compiled | forward GB/s at floor |",
      "|---|---:|---:|---:|---:|---:|",
  ]
  ms = lambda t: "-" if t is None else f"{t * 1e3:.2f}"
  for name, r in result["impls"].items():
    rate = "-" if r["forward_s"] is None else f"{floor['forward'] / r['forward_s'] / 1e9:.1f}"
    lines.append(
        f"| {name} | {ms(r['forward_s'])} | {ms(r['backward_s'])} | "
        f"{mb(floor['forward'])} / {mb(r['forward_compiled_bytes'])} | "
        f"{mb(floor['backward'])} / {mb(r['backward_compiled_bytes'])} | {rate} |"
    )
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--slots", type=int, default=65536)
  parser.add_argument("--dim", type=int, default=256)
  parser.add_argument("--tokens", type=int, default=2048)
  parser.add_argument("--bag", type=int, default=128)
  parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--no-torch", action="store_true")
  parser.add_argument("--tpu-cost", metavar="TOPOLOGY",
                      help="also compile the TPU impl for this libtpu topology (e.g. v5e:2x2) and "
                           "report its compiled bytes (needs libtpu, no TPU)")
  parser.add_argument("--json", type=pathlib.Path)
  args = parser.parse_args(argv)
  result = run(args.slots, args.dim, args.tokens, args.bag, jnp.dtype(args.dtype), args.repeats,
               with_torch=not args.no_torch, tpu_cost=args.tpu_cost)
  print(table(result))
  if args.json:
    args.json.write_text(json.dumps(result, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
