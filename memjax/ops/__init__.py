"""Operations behind the memory layer; kernels plug in under `embedding_bag`'s `impl`."""

from memjax.ops.embedding_bag import (
    available_impls, embedding_bag, register_impl, resolve_impl, row_dots,
)
from memjax.ops.product_keys import candidate_pairs, product_topk, register_top_k
from memjax.ops.table_rows import register_set_rows, set_rows

__all__ = [
    "available_impls",
    "candidate_pairs",
    "embedding_bag",
    "product_topk",
    "register_impl",
    "register_set_rows",
    "register_top_k",
    "resolve_impl",
    "row_dots",
    "set_rows",
]
