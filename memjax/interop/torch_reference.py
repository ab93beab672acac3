"""An independent PyTorch implementation of the reference's maths (spec 1.3, 5.2, 5.3): the parity
oracle of memjax's tests and the PyTorch baseline of its benchmarks. Needs PyTorch
(`pip install memjax[torch]`).

Written from the spec, not from the reference code, and independent of memjax apart from its
config dataclass. Module and parameter names are the reference's, so `state_dict()` is a
reference-format state dict. `to_reference` and `load_into_oracle` copy memjax (Flax NNX)
parameters into it by a mapping of their own, not `memjax.interop.torch_checkpoint`'s, so that the
converter's tests compare against a second one.

Axis letters (see memjax): B batch, T time, D model dim, N tokens, H heads, G key/value heads,
E half key dim, M sub-keys per half, K knn, I grid pairs (K*K), L lookups per token (PEER, H*K),
V value dim, Z attention head dim, Q rotary frequencies.
"""

from __future__ import annotations

import jax
import numpy as np
import torch
import torch.nn.functional as F
from flax import nnx
from torch import nn

from memjax.config import ModelConfig


class QueryMLP(nn.Module):
  """One Linear, wrapped as the reference wraps it (hence `query_proj.query_mlps.0.weight`)."""

  def __init__(self, d_in: int, d_out: int, bias: bool):
    super().__init__()
    self.query_mlps = nn.Sequential(nn.Linear(d_in, d_out, bias=bias))

  def forward(self, x):
    return self.query_mlps(x)


class OracleMemory(nn.Module):
  """HashingMemory: product-key top-k, fp32 softmax, one bag over all heads, Memory(+) output."""

  def __init__(self, cfg: ModelConfig, values: nn.Embedding | None = None):
    super().__init__()
    mem = cfg.memory
    dim, v_dim = cfg.dim, (mem.v_dim if mem.v_dim > 0 else cfg.dim)
    self.heads, self.knn, self.n_keys, self.half = mem.heads, mem.knn, mem.n_keys, mem.k_dim // 2
    self.keys = nn.Parameter(torch.zeros(2 * mem.heads * mem.n_keys, self.half))
    self.query_proj = QueryMLP(dim, mem.heads * mem.k_dim, mem.query_bias)
    # A shared table is one module registered under every memory layer (the reference's aliases).
    self.values = values if values is not None else nn.Embedding(mem.n_keys**2, v_dim)
    self.swilu_projection = nn.Linear(dim, v_dim) if mem.swilu else None
    self.value_proj = nn.Linear(v_dim, dim) if mem.swilu or mem.v_dim > 0 else None
    self.gating = nn.Linear(dim, 1) if mem.gated else None

  def select(self, x_ND):
    """Final scores and slots, each (N, H, K), best first (the reference's get_indices)."""
    q_NH2E = self.query_proj(x_ND).view(-1, self.heads, 2, self.half)  # head-major columns
    keys_H2ME = self.keys.view(self.heads, 2, self.n_keys, self.half)
    s1_NHM = torch.einsum("nhe,hme->nhm", q_NH2E[:, :, 0], keys_H2ME[:, 0])
    s2_NHM = torch.einsum("nhe,hme->nhm", q_NH2E[:, :, 1], keys_H2ME[:, 1])
    a_NHK, i1_NHK = s1_NHM.topk(self.knn, dim=-1)
    b_NHK, i2_NHK = s2_NHM.topk(self.knn, dim=-1)
    # The whole K x K grid, flattened with i outer and j inner; slot = i1 * M + i2.
    grid_NHI = (a_NHK[..., :, None] + b_NHK[..., None, :]).flatten(-2)
    slots_NHI = (i1_NHK[..., :, None] * self.n_keys + i2_NHK[..., None, :]).flatten(-2)
    scores_NHK, best_NHK = grid_NHI.topk(self.knn, dim=-1, sorted=True)
    return scores_NHK, slots_NHI.gather(-1, best_NHK)

  def forward(self, x_BTD):
    b, t, d = x_BTD.shape
    x_ND = x_BTD.reshape(b * t, d)
    scores_NHK, slots_NHK = self.select(x_ND)
    w_NHK = F.softmax(scores_NHK.float(), dim=-1).type_as(scores_NHK)
    bag = self.heads * self.knn  # heads are summed, not averaged
    read_NV = F.embedding_bag(
        slots_NHK.reshape(-1, bag), self.values.weight,
        per_sample_weights=w_NHK.reshape(-1, bag), mode="sum",
    )
    if self.swilu_projection is not None:
      out_ND = self.value_proj(read_NV * F.silu(self.swilu_projection(x_ND)))
    elif self.value_proj is not None:
      out_ND = self.value_proj(read_NV)
    else:
      out_ND = read_NV
    if self.gating is not None:
      out_ND = torch.sigmoid(self.gating(x_ND)) * out_ND
    return out_ND.view(b, t, -1)


class OraclePEER(nn.Module):
  """HashingMemory with `peer_variant` (spec 1.3): the same selection and softmax; expert i is the
  row pair values_u[i], values_v[i] of two (S, D) tables, out = sum w * gelu(<x, u>) * v over all
  heads' experts. (The unused swilu and value projections the reference builds are left out.)"""

  def __init__(self, cfg: ModelConfig):
    super().__init__()
    peer = cfg.peer
    self.heads, self.knn, self.n_keys, self.half = peer.heads, peer.knn, peer.n_keys, peer.k_dim // 2
    self.keys = nn.Parameter(torch.zeros(2 * peer.heads * peer.n_keys, self.half))
    self.query_proj = QueryMLP(cfg.dim, peer.heads * peer.k_dim, peer.query_bias)
    self.values_u = nn.Embedding(peer.n_keys**2, cfg.dim)
    self.values_v = nn.Embedding(peer.n_keys**2, cfg.dim)

  select = OracleMemory.select

  def forward(self, x_BTD):
    b, t, d = x_BTD.shape
    x_ND = x_BTD.reshape(b * t, d)
    scores_NHK, slots_NHK = self.select(x_ND)
    w_NL = F.softmax(scores_NHK.float(), dim=-1).type_as(scores_NHK).reshape(b * t, -1)
    slots_NL = slots_NHK.reshape(b * t, -1)
    act_NL = F.gelu(torch.einsum("nd,nld->nl", x_ND, self.values_u(slots_NL))) * w_NL
    return torch.einsum("nl,nld->nd", act_NL, self.values_v(slots_NL)).view(b, t, d)


class RMSNorm(nn.Module):

  def __init__(self, dim: int, eps: float):
    super().__init__()
    self.eps = eps
    self.weight = nn.Parameter(torch.ones(dim))

  def forward(self, x):
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
    return (normed * self.weight.float()).type_as(x)


def apply_rope(x_BTHZ, theta: float):
  """Rotates interleaved pairs (x[2i], x[2i+1]); angles in float32, products in x's precision."""
  t, z = x_BTHZ.shape[1], x_BTHZ.shape[-1]
  freqs_Q = 1.0 / theta ** (torch.arange(0, z, 2, dtype=torch.float32) / z)
  angles_TQ = torch.outer(torch.arange(t, dtype=torch.float32), freqs_Q)
  cos, sin = angles_TQ.cos()[None, :, None], angles_TQ.sin()[None, :, None]
  x0, x1 = x_BTHZ.unflatten(-1, (z // 2, 2)).unbind(-1)
  return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2).type_as(x_BTHZ)


class Attention(nn.Module):

  def __init__(self, cfg: ModelConfig):
    super().__init__()
    self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads or cfg.n_heads
    self.head_dim, self.theta = cfg.head_dim or cfg.dim // cfg.n_heads, cfg.rope_theta
    self.wq = nn.Linear(cfg.dim, self.n_heads * self.head_dim, bias=False)
    self.wk = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=False)
    self.wv = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=False)
    self.wo = nn.Linear(self.n_heads * self.head_dim, cfg.dim, bias=False)

  def forward(self, x_BTD):
    b, t, _ = x_BTD.shape
    q_BTHZ = apply_rope(self.wq(x_BTD).view(b, t, self.n_heads, self.head_dim), self.theta)
    k_BTGZ = apply_rope(self.wk(x_BTD).view(b, t, self.n_kv_heads, self.head_dim), self.theta)
    v_BTGZ = self.wv(x_BTD).view(b, t, self.n_kv_heads, self.head_dim)
    # Grouped-query attention: query head h reads key/value head h // (H / G).
    rep = self.n_heads // self.n_kv_heads
    k_BTHZ, v_BTHZ = k_BTGZ.repeat_interleave(rep, dim=2), v_BTGZ.repeat_interleave(rep, dim=2)
    out_BHTZ = F.scaled_dot_product_attention(
        q_BTHZ.transpose(1, 2), k_BTHZ.transpose(1, 2), v_BTHZ.transpose(1, 2), is_causal=True
    )
    return self.wo(out_BHTZ.transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Module):

  def __init__(self, cfg: ModelConfig):
    super().__init__()
    hidden = int(2 * (4 * cfg.dim) / 3)
    if cfg.ffn_dim_multiplier is not None:
      hidden = int(cfg.ffn_dim_multiplier * hidden)
    hidden = cfg.multiple_of * -(-hidden // cfg.multiple_of)
    self.w1 = nn.Linear(cfg.dim, hidden, bias=False)
    self.w3 = nn.Linear(cfg.dim, hidden, bias=False)
    self.w2 = nn.Linear(hidden, cfg.dim, bias=False)

  def forward(self, x):
    return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):

  def __init__(self, cfg: ModelConfig, depth: int, values: nn.Embedding | None):
    super().__init__()
    self.attention = Attention(cfg)
    if depth in cfg.memory.layers:
      self.feed_forward = OracleMemory(cfg, values)
    else:
      self.feed_forward = FeedForward(cfg)
    self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
    self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

  def forward(self, x_BTD):
    h_BTD = x_BTD + self.attention(self.attention_norm(x_BTD))
    return h_BTD + self.feed_forward(self.ffn_norm(h_BTD))


class OracleTransformer(nn.Module):
  """Lingua's LMTransformer with memory layers at `cfg.memory.layers`; untied output."""

  def __init__(self, cfg: ModelConfig):
    super().__init__()
    mem = cfg.memory
    v_dim = mem.v_dim if mem.v_dim > 0 else cfg.dim
    shared = nn.Embedding(mem.n_keys**2, v_dim) if mem.layers and mem.share_values else None
    self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
    self.layers = nn.ModuleList([Block(cfg, i, shared) for i in range(cfg.n_layers)])
    self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
    self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

  def forward(self, tokens_BT):
    h_BTD = self.tok_embeddings(tokens_BT)
    for layer in self.layers:
      h_BTD = layer(h_BTD)
    return self.output(self.norm(h_BTD))


# ----------------------------------------------------------------------------------------------
# memjax -> oracle.


def to_reference(tree) -> dict[str, np.ndarray]:
  """memjax parameters (a module, or an nnx.State such as gradients) -> reference names/layouts."""
  state = tree if isinstance(tree, nnx.State) else nnx.state(tree, nnx.Param)
  out = {}
  for path, leaf in nnx.to_flat_state(state):
    arr = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
    if isinstance(arr, jax.ShapeDtypeStruct):  # from nnx.eval_shape: names and shapes only
      arr = np.broadcast_to(np.zeros((), arr.dtype), arr.shape)
    arr = np.asarray(arr)
    *parent, name = [str(p) for p in path]
    # The selection's parameters sit at the layer's own level in the reference.
    parent = [p for p in parent if p != "product_keys"]
    parent = ["query_proj.query_mlps.0" if p == "query_proj" else p for p in parent]
    if name == "kernel":  # Linear: (in, out) -> (out, in)
      name, arr = "weight", arr.T
    elif name == "embedding":
      name = "weight"
    elif name == "keys":  # (H, 2, M, E) -> (2*H*M, E)
      arr = arr.reshape(-1, arr.shape[-1])
    elif name == "values":  # a bare variable in memjax, an embedding module in the reference
      parent, name = parent + ["values"], "weight"
    out[".".join(parent + [name])] = arr
  return out


def load_into_oracle(oracle: nn.Module, memjax_module) -> None:
  """Copies every memjax parameter into `oracle` (strict: names and shapes must all match)."""
  state = to_reference(memjax_module)
  shared = [v for k, v in state.items() if k.endswith("values.weight")]
  for name in oracle.state_dict():
    if name not in state and name.endswith("feed_forward.values.weight") and len(shared) == 1:
      state[name] = shared[0]  # the reference's aliases of the one shared table
  oracle.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=True)
