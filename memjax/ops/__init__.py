"""Operations behind the memory layer, each running the kernels of a lookup impl
(`pallas_kernels.impls`; `dispatch` picks and loads them)."""

from memjax.ops.dispatch import auto_impl, available_impls, resolve_impl, unavailable_reason
from memjax.ops.embedding_bag import embedding_bag, row_dots
from memjax.ops.product_keys import candidate_pairs, product_topk
from memjax.ops.table_rows import set_rows

__all__ = [
    "auto_impl",
    "available_impls",
    "candidate_pairs",
    "embedding_bag",
    "product_topk",
    "resolve_impl",
    "row_dots",
    "set_rows",
    "unavailable_reason",
]
