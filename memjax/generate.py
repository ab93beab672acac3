"""Generation: a batched prefill of the prompts, then one token per step against a key/value cache.

The cache is a functional pytree (`memjax.model.DecodeCache`: each block's keys and values, each
row's length) that `Transformer.extend` takes and returns, not NNX state stored on the model. The
whole decode (prefill, then a `lax.while_loop` of single-token steps) is then one jitted
function of the model's split state: the loop carries the cache beside the tokens it samples, the
model a caller holds is never mutated, and its state (checkpoints, optimizer partitions) gains no
cache variables. Inside each traced function the module is rebuilt with `nnx.merge`, as NNX does
for plain JAX transforms. Memory layers read per token and need no cache.

Prompts of different lengths are right-padded to a shared bucketed length and prefilled in one
call with per-row lengths. Every row keeps its own positions, starting at 0, so padding never
shifts rotary angles and a row decodes as it would alone (up to rounding of batched matmuls).
Compiled programs are keyed by batch size, the bucketed prompt length, max_new_tokens, greedy or
not, and the number of stop ids; temperature and top_p are traced and change nothing.

Axis letters (see memjax): B batch, P padded prompt positions, T time (the new tokens), W
vocabulary.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from memjax import cli
from memjax.model import Transformer, split_for_inference


def generate(
    model: Transformer,
    prompt_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    rng: jax.Array | None = None,
) -> list[list[int]]:
  """New tokens for each prompt, ending with `eos_id` where a row produced it.

  Args:
    model: the language model; it is run in eval mode (no dropout) and left unchanged.
    prompt_ids: one non-empty list of token ids per row; lengths may differ.
    max_new_tokens: at most this many tokens per row.
    temperature: 0 is greedy (argmax); above 0, sampling from softmax(logits / temperature).
    top_p: nucleus sampling: only the most likely tokens whose probabilities sum to top_p
      (always at least the top one); 1 samples from the whole vocabulary.
    eos_id: a row stops after producing this token (kept in its output).
    rng: a PRNG key, required when sampling. The same key, prompts and settings give the same
      tokens.
  """
  stop_ids = () if eos_id is None else (eos_id,)
  return _run(model, prompt_ids, max_new_tokens, temperature, top_p, stop_ids, rng)


def greedy_complete(
    model: Transformer,
    prompt_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    stop_ids: Sequence[int] = (),
) -> list[list[int]]:
  """The greedy continuation of each prompt, up to the first of `stop_ids` (left out) or
  `max_new_tokens` tokens: for fact recall, stop on EOS and on what ends an answer (a newline,
  a full stop) and compare the continuation with the expected answer's ids."""
  rows = _run(model, prompt_ids, max_new_tokens, 0.0, 1.0, tuple(stop_ids), None)
  return [row[:-1] if row and row[-1] in stop_ids else row for row in rows]


def sample_tokens(
    logits_BW: jax.Array, key: jax.Array, temperature: jax.Array | float, top_p: jax.Array | float
) -> jax.Array:
  """One token id per row, drawn from softmax(logits / temperature) cut to its top-p nucleus.

  The nucleus is the shortest run of most likely tokens whose probabilities reach top_p; a token
  stays in it when the mass ranked strictly above it is below top_p, so the top token always
  does and top_p -> 0 is greedy. temperature must be > 0.
  """
  logits_BW = logits_BW.astype(jnp.float32) / temperature
  sorted_BW, order_BW = jax.lax.top_k(logits_BW, logits_BW.shape[-1])  # descending
  probs_BW = jax.nn.softmax(sorted_BW, axis=-1)
  mass_above_BW = jnp.cumsum(probs_BW, axis=-1) - probs_BW
  # top_p = 1 keeps every token, also those a rounded cumulative sum would put at 1.
  keep_BW = (mass_above_BW < top_p) | (top_p >= 1.0)
  rank_B = jax.random.categorical(key, jnp.where(keep_BW, sorted_BW, -jnp.inf), axis=-1)
  return jnp.take_along_axis(order_BW, rank_B[:, None], axis=-1)[:, 0]


# ----------------------------------------------------------------------------------------------
# The decode loop.


def _run(model, prompt_ids, max_new_tokens, temperature, top_p, stop_ids, rng) -> list[list[int]]:
  """Checks the request, pads the prompts, decodes, and trims each row to what it produced."""
  cfg = model.cfg
  prompts = [list(map(int, p)) for p in prompt_ids]
  if not prompts:
    raise ValueError("prompt_ids is empty: give at least one prompt")
  for i, p in enumerate(prompts):
    if not p:
      raise ValueError(f"prompt_ids[{i}] is empty: start it with the tokenizer's bos_id")
    bad = [t for t in p if not 0 <= t < cfg.vocab_size]
    if bad:
      raise ValueError(f"prompt_ids[{i}] has ids outside [0, {cfg.vocab_size}): {bad[:5]}")
  bad = [t for t in stop_ids if not 0 <= t < cfg.vocab_size]
  if bad:
    raise ValueError(f"stop ids must be in [0, vocab_size={cfg.vocab_size}), got {bad}")
  if max_new_tokens < 0:
    raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
  # nan passes `< 0` and then samples from nan logits: garbage ids, with no error.
  if not (math.isfinite(temperature) and temperature >= 0):
    raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p must be in (0, 1], got {top_p}")
  greedy = temperature == 0
  if not greedy and rng is None:
    raise ValueError("sampling (temperature > 0) needs rng, a key such as jax.random.key(0)")
  longest = max(map(len, prompts))
  if longest + max_new_tokens > cfg.max_seqlen:
    raise ValueError(
        f"longest prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
        f"model.max_seqlen={cfg.max_seqlen}"
    )
  if max_new_tokens == 0:
    return [[] for _ in prompts]

  # Bucketing the padded length to a power of two bounds how many programs get compiled.
  padded = max(8, 1 << (longest - 1).bit_length())
  prompts_BP = np.zeros((len(prompts), padded), np.int32)
  for row, p in zip(prompts_BP, prompts):
    row[: len(p)] = p
  lengths_B = np.array([len(p) for p in prompts], np.int32)
  graphdef, state = split_for_inference(model)
  new_BT, count_B = _decode(
      state,
      jnp.asarray(prompts_BP),
      jnp.asarray(lengths_B),
      jnp.asarray(stop_ids, jnp.int32).reshape(-1),
      jax.random.key(0) if rng is None else rng,
      jnp.float32(temperature),
      jnp.float32(top_p),
      graphdef=graphdef,
      capacity=padded + max_new_tokens,
      max_new_tokens=max_new_tokens,
      greedy=greedy,
  )
  new_BT, count_B = jax.device_get((new_BT, count_B))
  return [row[:n].tolist() for row, n in zip(new_BT, count_B)]


@functools.partial(jax.jit, static_argnames=("graphdef", "capacity", "max_new_tokens", "greedy"))
def _decode(
    state, prompts_BP, lengths_B, stop_ids, key, temperature, top_p, *,
    graphdef, capacity, max_new_tokens, greedy,
):
  """Prefill, then steps until every row has stopped or made max_new_tokens tokens.

  The prefill takes all but each prompt's last token; the steps start from that token, so the
  first new token comes out of the loop like the others and the prefill's logits are never
  computed (the compiler drops them, unused: (B, P, W) floats for a large vocabulary).

  Returns the new tokens (B, T), valid up to each row's count (B,); a row counts the stop token
  that ended it. Rows that stopped keep being stepped (fixed shapes) and their tokens ignored.
  """
  b = prompts_BP.shape[0]
  step_keys = jax.random.split(key, max_new_tokens)

  def pick(logits_BW, step):
    if greedy:
      return jnp.argmax(logits_BW, axis=-1).astype(jnp.int32)
    return sample_tokens(logits_BW, step_keys[step], temperature, top_p).astype(jnp.int32)

  extend = functools.partial(_extend, graphdef, state)
  cache = nnx.merge(graphdef, state).init_cache(b, capacity)
  _, cache = extend(prompts_BP, cache, lengths_B - 1)

  def running(carry):
    step, _, _, _, done_B, _ = carry
    return (step < max_new_tokens) & ~jnp.all(done_B)

  def advance(carry):
    step, token_B, new_BT, count_B, done_B, cache = carry
    logits_B1W, cache = extend(token_B[:, None], cache)
    token_B = pick(logits_B1W[:, 0], step)
    new_BT = new_BT.at[:, step].set(token_B)
    count_B = count_B + (~done_B).astype(jnp.int32)
    done_B = done_B | jnp.isin(token_B, stop_ids)
    return step + 1, token_B, new_BT, count_B, done_B, cache

  last_B = prompts_BP[jnp.arange(b), lengths_B - 1]
  carry = (
      jnp.int32(0), last_B, jnp.zeros((b, max_new_tokens), jnp.int32),
      jnp.zeros((b,), jnp.int32), jnp.zeros((b,), bool), cache,
  )
  _, _, new_BT, count_B, _, _ = jax.lax.while_loop(running, advance, carry)
  return new_BT, count_B


def _extend(graphdef, state, tokens_BT, cache, n_valid_B=None):
  """`Transformer.extend` on a module rebuilt in the calling trace (a loop body may not mutate
  a module of the enclosing one)."""
  model = nnx.merge(graphdef, state)
  return model.extend(tokens_BT, cache, n_valid_B)


# ----------------------------------------------------------------------------------------------
# Command line.


@cli.entry_point
def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
      prog="python -m memjax.generate",
      description="Continue text prompts with a trained memjax model.",
  )
  parser.add_argument("path", help="run directory or checkpoint path, local or gs://")
  parser.add_argument(
      "--prompt", action="append", required=True, help="text to continue; repeat for a batch"
  )
  parser.add_argument("--max-new-tokens", type=int, default=64)
  parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  parser.add_argument("--top-p", type=float, default=1.0)
  parser.add_argument("--seed", type=int, default=0, help="sampling key")
  args = parser.parse_args(argv)

  from memjax import checkpoint  # the checkpoint stack loads only for the command line

  with cli.reading(f"the checkpoint at {args.path}"):
    _, model, tokenizer = checkpoint.load_for_inference(args.path)
  # Training documents start with BOS; the tokenizer's encode adds none.
  prompt_ids = [[tokenizer.bos_id, *tokenizer.encode(text)] for text in args.prompt]
  try:
    rows = generate(
        model, prompt_ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_p=args.top_p, eos_id=tokenizer.eos_id, rng=jax.random.key(args.seed),
    )
  except ValueError as e:  # a request the model cannot serve (too long, bad top_p, ...)
    raise cli.InputError(str(e)) from None
  for text, new in zip(args.prompt, rows):
    print(text + tokenizer.decode(new), flush=True)  # decode skips the EOS


if __name__ == "__main__":
  from memjax import platforms
  platforms.quiet_libtpu()  # before JAX starts a backend
  sys.exit(main())
