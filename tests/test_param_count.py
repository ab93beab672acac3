"""Parameter counts of the reference's sizes (spec 4.2), of abstract models (nothing allocated)."""

import jax
import pytest
from flax import nnx

from memjax import config_loading
from memjax.layers.memory import MemoryValues
from memjax.model import Transformer


def count(name: str, overrides=()) -> tuple[int, int]:
  """(parameters other than the value table, table parameters) of configs/`name`."""
  cfg = config_loading.load(name, overrides)
  model = nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0)))
  leaves = jax.tree.leaves(nnx.state(model))
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)  # nothing materialised
  size = lambda f: sum(x.size for x in jax.tree.leaves(nnx.state(model, f)))
  # A shared table is one variable, so it is counted once however many layers read it.
  return size(nnx.All(nnx.Param, nnx.Not(MemoryValues))), size(MemoryValues)


# pkplus_373m_1024k: d = 1024, 24 blocks, vocabulary 32000, SwiGLU hidden int(2*4d/3) = 2730
# rounded up to 256 -> 2816; memory in blocks 4, 12, 20 with H = 4, n = 1024, k_dim = 512, V = d.
#   tok_embeddings + output      2 * 32000 * 1024                 =  65,536,000
#   final norm                   1024                             =       1,024
#   attention + 2 norms, x 24    (4 * 1024^2 + 2 * 1024) * 24     = 100,712,448
#   SwiGLU FFN, x 21             3 * 1024 * 2816 * 21             = 181,665,792
#   memory layer, x 3:                                             (  6,295,552 each)
#     keys                       2 * 4 * 1024 * 256               =   2,097,152
#     query_proj + bias          1024 * 2048 + 2048               =   2,099,200
#     swilu_projection + bias    1024 * 1024 + 1024               =   1,049,600
#     value_proj + bias          1024 * 1024 + 1024               =   1,049,600
#                                                         x 3     =  18,886,656
#   total                                                         = 366,801,920  (spec: 366.8M)
#   shared table                 1024^2 * 1024                    = 1,073,741,824 (once)
PKPLUS_373M = 366_801_920
# dense_373m: the memory layers' 18,886,656 become 3 more FFNs (3 * 8,650,752 = 25,952,256).
DENSE_373M = PKPLUS_373M - 18_886_656 + 25_952_256  # 373,867,520 (spec: 373.87M)
# pk_7b: d = 4096, 32 blocks, hidden 11008 (ffn_dim_multiplier 1.0):
#   embeddings 262,144,000 + norm 4,096 + attention/norms (4 * 4096^2 + 2 * 4096) * 32
#   = 2,147,745,792, + 29 FFNs * 3 * 4096 * 11008 = 3,922,722,816,
#   + 3 memory layers * (2,097,152 + 8,390,656 + 2 * 16,781,312) = 132,151,296.
PK_7B = 6_464_768_000
# As a dense model (32 FFNs): Llama-2-7B's 6,738,415,616 (spec: 6.74B).
DENSE_7B = PK_7B - 132_151_296 + 3 * 135_266_304


def test_pkplus_373m():
  assert count("pkplus_373m_1024k") == (PKPLUS_373M, 1024**2 * 1024)


def test_dense_373m():
  assert count("dense_373m") == (DENSE_373M, 0)
  assert DENSE_373M == 373_867_520


def test_pk_7b():
  assert count("pk_7b") == (PK_7B, 1024**2 * 4096)
  assert count("pk_7b", ["model.memory.layers=[]"]) == (DENSE_7B, 0)
  assert DENSE_7B == 6_738_415_616


@pytest.mark.parametrize(
    "size,expected", [("134m", 134e6), ("373m", 373e6), ("720m", 720e6), ("1p3b", 1.3e9)]
)
def test_ladder_dense_sizes_match_their_names(size, expected):
  # The ladder's dims are inferred; they should at least give the named size (within 5%).
  dense, table = count(f"ladder_{size}_dense")
  assert table == 0 and abs(dense - expected) / expected < 0.05
