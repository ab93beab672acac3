"""Step time and memory as the value table grows from 2^12 to 2^22 slots (or 2^24) at fixed dims,
with the lookup separated from the optimizer update over the table.

  python benchmarks/scaling.py [--json FILE] [--smoke] [--repeats 3] [--max-log2 22]
                               [--bf16-from 24] [--bf16-moments]

The model: dim 64, 2 blocks, Memory+ in block 1 (4 heads x knn 16, k_dim 128, V = 64), batch
8 x 128 tokens, float32, the `train.py` step (AdamW over every parameter, the table included).
For each table size (n_keys = 2^6 .. 2^11) it times, each alone and jitted:
- selection: the query, the 2 x n_keys sub-key scores per head and the product top-k
  (O(sqrt(N)) work per token), forward alone and forward and backward;
- bag fwd+bwd: the embedding bag and its backward, which writes a dense (N, V) table gradient
  (O(N) memory traffic, though only H*K rows per token are nonzero);
- optimizer: AdamW's update of all the parameters from given gradients, in place as the step
  runs it (O(N): every table row's moments and weight are rewritten each step, read or not);
- the whole train step, with the dense update (`step_s`) and with `optim.table_update=sparse`
  (`step_sparse_s`: the touched rows and their moments alone);
and reports the state's bytes (parameters, moments) and the compiled steps' temporaries. Tables
from 2^`--bf16-from` slots on are kept in bfloat16 (`bf16` in the JSON), their moments in float32
or, with `--bf16-moments`, in bfloat16 (`bf16_moments`).

Two checks are printed per row: the dense step's whole-table work within twice its floor
(`step_s <= step_sparse_s + 2 floor_s`), and the sparse step flat beyond its sqrt(N) selection
(`step_sparse_s <= select + 2 step_sparse_s` of the smallest table), with the selection's forward
alone (`select_s`) and with its backward (`select_fwd_bwd_s`: the gradient of the weights back to
the query, the keys and the input, which every train step also runs).

The floor of each row is the whole-table traffic that the dense AdamW step cannot avoid, over a
copy bandwidth measured in the same run: the update reads the table and both moments and writes
them back, every row; where the step takes the table's gradient as an (S, V) array
(`table_grad: dense`, small tables: see `memjax.training.step.row_gradients`) the backward also
writes it and the update reads it. The copy is a jitted, donated in-place scale of a buffer the
table's size (read + write; its pages already touched), best of the repeats. The optimizer column
times the update as the step runs it: from the touched rows' gradients (as many rows as the step
can touch) or from an (S, V) gradient.
"""

from __future__ import annotations

import argparse
import dataclasses
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

from benchmarks.train_throughput import Timed, one_device_mesh  # noqa: E402
from memjax import config as config_lib  # noqa: E402
from memjax import config_loading  # noqa: E402
from memjax import optim  # noqa: E402
from memjax.layers.memory import MemoryValues  # noqa: E402
from memjax.ops import embedding_bag  # noqa: E402
from memjax.ops.table_rows import row_capacity  # noqa: E402
from memjax.training import state as state_lib, step as step_lib  # noqa: E402

BASE = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.memory.layers=[1]",
        "model.memory.heads=4", "model.memory.knn=16", "model.memory.k_dim=128",
        "train.batch_size=8", "train.seq_len=128"]
SMOKE = ["model.dim=32", "model.n_heads=2", "model.memory.knn=4", "model.memory.k_dim=32",
         "train.batch_size=2", "train.seq_len=32"]


def best(fn, repeats: int) -> float:
  jax.block_until_ready(fn())  # compile / warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return min(times)


def threaded(fn, carry):
  """A call that applies fn to its previous result: times a donated, in-place update."""
  box = [carry]

  def once():
    box[0] = fn(box[0])
    return box[0]

  return once


def copy_bandwidth(n_bytes: int, repeats: int) -> float:
  """Bytes read plus written per second by an in-place jitted scale of an n_bytes buffer."""
  scale = jax.jit(lambda x: x * np.float32(1.0000001), donate_argnums=0)
  buffer = scale(jnp.ones(max(n_bytes // 4, 1), jnp.float32))  # its pages exist from here on
  return 2 * n_bytes / best(threaded(scale, buffer), repeats + 2)


def dense_update_bytes(cfg: config_lib.Config) -> int:
  """Whole-table bytes a dense AdamW step moves: the table and both moments read and written;
  with an (S, V) gradient (when the step does not take rows, or takes them with 16-bit moments:
  `memjax.optim`), that gradient written and read as well."""
  rows_cols = cfg.model.memory.n_slots * cfg.model.value_dim
  table = rows_cols * jnp.dtype(cfg.model.memory.value_dtype).itemsize
  moment = rows_cols * jnp.dtype(cfg.optim.state_dtype).itemsize
  no_gradient = step_lib.row_gradients(cfg) and cfg.optim.state_dtype == "float32"
  return (2 if no_gradient else 4) * table + 4 * moment


def step_gradients(cfg: config_lib.Config, params) -> tuple[nnx.State, dict]:
  """Gradients of the shapes the step gives its optimizer: dense ones, and the table's as rows
  (as many as a step can touch, spread over the table) when the step takes it so."""
  grads = jax.tree.map(lambda p: jnp.full(p.shape, 1e-3, p.dtype), params)
  if not step_lib.row_gradients(cfg):
    return grads, {}
  tables, grads = nnx.split_state(grads, MemoryValues, ...)
  (path, table), = nnx.to_flat_state(tables)
  mem = cfg.model.memory
  n_rows = row_capacity(cfg.train.batch_size * cfg.train.seq_len * mem.heads * mem.knn,
                        mem.n_slots)
  rows = jnp.linspace(0, mem.n_slots - 1, n_rows).astype(jnp.int32)
  return grads, {path: optim.RowGrads(rows, table[...][:n_rows])}


def temp_bytes(compiled) -> int | None:
  memory = compiled.memory_analysis()
  return getattr(memory, "temp_size_in_bytes", None) if memory is not None else None


def sparse_step(cfg: config_lib.Config, repeats: int) -> tuple[float, int | None]:
  """(seconds, temporaries) of the train step with the row-wise table update."""
  sparse = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, table_update="sparse"))
  timed = Timed(sparse, one_device_mesh())
  return min(timed.run(1) for _ in range(repeats + 1)), temp_bytes(timed.compiled)


def measure(cfg: config_lib.Config, repeats: int) -> dict:
  mesh = one_device_mesh()
  timed = Timed(cfg, mesh)
  step_s = min(timed.run(1) for _ in range(repeats + 1))
  state = timed.state
  graphdef = state_lib.model_graphdef(cfg)
  layer = nnx.merge(graphdef, state.params, state.other).layers[1].feed_forward
  lgraph, lparams, lrest = nnx.split(layer, nnx.Param, ...)

  n = cfg.train.batch_size * cfg.train.seq_len
  x_ND = jnp.asarray(np.random.default_rng(0).standard_normal((n, cfg.model.dim)), jnp.float32)
  select = jax.jit(lambda p, x: nnx.merge(lgraph, p, lrest).select(x))
  slots_NHK, weights_NHK = select(lparams, x_ND)
  # As a train step runs it: the weights' gradient back to the query, the keys and the input.
  cot_NHK = jnp.asarray(np.random.default_rng(1).standard_normal(weights_NHK.shape), jnp.float32)
  table_state, select_params = nnx.split_state(lparams, MemoryValues, ...)
  select_grad = jax.jit(jax.grad(
      lambda p, t, x: jnp.sum(nnx.merge(lgraph, nnx.merge_state(p, t), lrest).select(x)[1] * cot_NHK),
      argnums=(0, 2)))
  idx_NB, w_NB = slots_NHK.reshape(n, -1), weights_NHK.reshape(n, -1)
  cot_NV = jnp.ones((n, cfg.model.value_dim), jnp.float32)
  bag = jax.jit(jax.grad(
      lambda v, w: jnp.sum(embedding_bag(v, idx_NB, w, impl=cfg.model.memory.impl) * cot_NV),
      argnums=(0, 1),
  ))
  values = lparams["values"][...]

  floor_bytes = dense_update_bytes(cfg)
  table_bytes = cfg.model.memory.n_slots * cfg.model.value_dim * jnp.dtype(values.dtype).itemsize
  copy_Bps = copy_bandwidth(table_bytes, repeats)
  row = {
      "slots": cfg.model.memory.n_slots,
      "table_grad": "rows" if step_lib.row_gradients(cfg) else "dense",
      "bf16": cfg.model.memory.value_dtype == "bfloat16",
      "bf16_moments": cfg.optim.state_dtype == "bfloat16",
      "step_s": step_s,
      "floor_s": floor_bytes / copy_Bps,
      "floor_bytes": floor_bytes,
      "copy_GBps": copy_Bps / 1e9,
      "select_s": best(lambda: select(lparams, x_ND), repeats),
      "select_fwd_bwd_s": best(lambda: select_grad(select_params, table_state, x_ND), repeats),
      "bag_fwd_bwd_s": best(lambda: bag(values, w_NB), repeats),
      "params_bytes": state_lib.tree_bytes_per_device(state.params),
      "opt_state_bytes": state_lib.tree_bytes_per_device(state.opt_state),
      "temp_bytes": temp_bytes(timed.compiled),
  }
  del values, lparams, table_state, select_params

  tx = optim.make_optimizer(cfg)
  grads, row_grads = step_gradients(cfg, state.params)
  # In place, as the train step runs it: the step's own parameters and moments donated (no
  # copies: at the top sizes memory is short), gradients given.
  update = jax.jit(
      lambda params, opt_state, grads, rows: tx.apply(
          grads, opt_state, params, optim.group_norms(grads, rows), row_grads=rows),
      donate_argnums=(0, 1))
  update_once = threaded(lambda carry: update(*carry, grads, row_grads),
                         (state.params, state.opt_state))
  del timed, state
  row["optimizer_s"] = best(update_once, repeats)
  del update_once, grads, row_grads  # the sparse step's memory
  row["step_sparse_s"], row["temp_sparse_bytes"] = sparse_step(cfg, repeats)
  return row


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--json", type=pathlib.Path, help="write the figures here")
  parser.add_argument("--smoke", action="store_true", help="small dims, 2^8 and 2^10 slots")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--min-log2", type=int, default=12, help="smallest table, log2 slots (even)")
  parser.add_argument("--max-log2", type=int, default=22, help="largest table, log2 slots (even)")
  parser.add_argument("--bf16-from", type=int, default=24,
                      help="from this log2 slots on, a bfloat16 table")
  parser.add_argument("--bf16-moments", action="store_true",
                      help="bfloat16 moments for the bfloat16 tables (default float32)")
  args = parser.parse_args()
  base = BASE + (SMOKE if args.smoke else [])
  if args.smoke:  # same maths, programs compiled ~2.5x faster: a smoke run is mostly compiles
    jax.config.update("jax_disable_most_optimizations", True)
  lo, hi = (8, 10) if args.smoke else (args.min_log2, args.max_log2)
  rows = []
  for log2 in range(lo, hi + 1, 2):
    n_keys = 2 ** (log2 // 2)
    bf16 = ["model.memory.value_dtype=bfloat16"]
    bf16 += ["optim.state_dtype=bfloat16"] if args.bf16_moments else []
    cfg = config_loading.load(
        "tiny", base + [f"model.memory.n_keys={n_keys}"] + (bf16 if log2 >= args.bf16_from else []))
    rows.append(measure(cfg, args.repeats))
    print(f"2^{log2} slots done", file=sys.stderr, flush=True)

  cfg = config_loading.load("tiny", base)
  first = rows[0]
  print(
      f"table scaling: dim {cfg.model.dim}, {cfg.model.n_layers} blocks, Memory+ in block 1 "
      f"(heads {cfg.model.memory.heads}, knn {cfg.model.memory.knn}, V {cfg.model.value_dim}), "
      f"batch {cfg.train.batch_size} x {cfg.train.seq_len}, float32 (table"
      f"{' and moments' if args.bf16_moments else ''} bfloat16 from 2^{args.bf16_from} slots), "
      f"{os.cpu_count()} CPUs, jax {jax.__version__}; best of "
      f"{args.repeats}"
  )
  print("| slots | dense step (ms), table grad | sparse step (ms) | selection fwd / fwd+bwd (ms) | "
        "bag fwd+bwd (ms) | optimizer update (ms) | whole-table floor (ms) | copy GB/s | "
        "dense within 2x floor | sparse flat: vs fwd / fwd+bwd selection | params (MiB) | "
        "Adam moments (MiB) | temporaries dense / sparse (MiB) |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
  mib = lambda b: "n/a" if b is None else f"{b / 2**20:,.1f}"
  yes = lambda ok: "yes" if ok else "no"
  for r in rows:
    dense_ok = r["step_s"] <= r["step_sparse_s"] + 2 * r["floor_s"]
    flat = lambda select: r["step_sparse_s"] <= r[select] + 2 * first["step_sparse_s"]
    print(
        f"| 2^{int(np.log2(r['slots']))}{' bf16' if r['bf16'] else ''}"
        f"{' + moments' if r.get('bf16_moments') else ''} | "
        f"{r['step_s'] * 1e3:.1f}, {r['table_grad']} | "
        f"{r['step_sparse_s'] * 1e3:.1f} | {r['select_s'] * 1e3:.1f} / "
        f"{r['select_fwd_bwd_s'] * 1e3:.1f} | {r['bag_fwd_bwd_s'] * 1e3:.1f} | "
        f"{r['optimizer_s'] * 1e3:.1f} | {r['floor_s'] * 1e3:.1f} | {r['copy_GBps']:.1f} | "
        f"{yes(dense_ok)} | {yes(flat('select_s'))} / {yes(flat('select_fwd_bwd_s'))} | "
        f"{mib(r['params_bytes'])} | {mib(r['opt_state_bytes'])} | {mib(r['temp_bytes'])} / "
        f"{mib(r['temp_sparse_bytes'])} |"
    )
  if args.json:
    args.json.write_text(json.dumps({"rows": rows}, indent=2))


if __name__ == "__main__":
  main()
