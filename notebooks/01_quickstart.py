# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # memjax quickstart: a memory layer that learns facts
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/memjax-dev/memjax/blob/main/notebooks/01_quickstart.ipynb)
#
# A product-key memory layer replaces the feed-forward network of a transformer block with a
# sparse lookup: each token scores two small sets of sub-keys, combines the best of each into
# the top-k of n² slots of a large value table, and reads those rows weighted by a softmax.
# Memory+ (the paper's variant) gates the read with `silu(W x)` and projects it back.
#
# In this notebook we
#
# 1. build a small Memory+ model (4 blocks, two of which read one shared 4096-slot table),
# 2. train it for a few minutes on memjax's synthetic knowledge corpus (biographies of fictional
#    people) with the same training loop as `python train.py`,
# 3. plot its loss and how many facts it recalls,
# 4. look inside the memory: which slots each head reads for one fact, and how evenly the table
#    is used,
# 5. generate text.
#
# It runs on a CPU (a free Colab runtime is enough). Set `MEMJAX_NOTEBOOK_SMOKE=1` for a run of
# seconds instead of minutes: the test suite does that.

# %% [markdown]
# ## Setup
#
# On Colab this clones memjax from GitHub and installs it (about a minute). Anywhere else it
# uses the checkout this notebook lies in, as it is: install it first with `pip install -e .`
# from the repository root.

# %%
import os
import pathlib
import subprocess
import sys

REPO = "memjax-dev/memjax"  # placeholder: the GitHub owner/name memjax is published under
SMOKE = os.environ.get("MEMJAX_NOTEBOOK_SMOKE") == "1"  # seconds instead of minutes (the tests)

if "google.colab" in sys.modules:
  ROOT = pathlib.Path("/content/memjax")
  if not ROOT.exists():
    url = f"https://github.com/{REPO}.git"
    subprocess.run(["git", "clone", "--depth=1", url, str(ROOT)], check=True)
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", str(ROOT)], check=True)
else:
  here = pathlib.Path.cwd()
  ROOT = next((p for p in [here, *here.parents] if (p / "memjax" / "__init__.py").is_file()), None)
  if ROOT is None:
    raise FileNotFoundError(f"{here} is not in a memjax checkout: start Jupyter in one")
# An editable install is only seen by a fresh interpreter; the path makes it importable now.
sys.path.insert(0, str(ROOT))
print(f"memjax from {ROOT}; smoke mode {'on' if SMOKE else 'off'}")

# %% [markdown]
# ## The model
#
# `configs/tiny.yaml` states what differs from the defaults in `memjax/config.py`; `key=value`
# overrides change it further, exactly as on `train.py`'s command line. The smoke mode trains a
# handful of steps on a smaller corpus.

# %%
import jax
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

from memjax import config_loading
from memjax.model import Transformer, parameter_counts

overrides = []
if SMOKE:
  overrides = [
      "train.steps=30", "optim.warmup=5", "train.log_every=10", "train.eval_every=15",
      "train.checkpoint_every=30", "train.eval_batches=2", "train.probes=64", "data.people=30",
  ]
cfg = config_loading.load("tiny", overrides)
mem = cfg.model.memory
print(f"{cfg.model.n_layers} blocks of dim {cfg.model.dim}; memory in blocks {list(mem.layers)}")
shared = "one table shared by all" if mem.share_values else "one table each"
print(f"table: {mem.n_keys}² = {mem.n_slots} slots x {cfg.model.value_dim} values, {shared}")
print(f"a token reads {mem.heads} heads x {mem.knn} slots per memory layer")

# Counting parameters needs only their shapes: nnx.eval_shape allocates nothing.
counts = parameter_counts(nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0))))
print(f"parameters: {counts['total'] / 1e6:.2f}M in all, {counts['active'] / 1e6:.2f}M per token")

# %% [markdown]
# ## Training
#
# `memjax.training.loop.run` is what `python train.py` calls: it builds the knowledge corpus as a
# local TFDS dataset (once, a few seconds), compiles the train step, and trains with periodic
# evals of the held-out loss, fact recall and memory usage. It writes checkpoints and
# `metrics.jsonl` to the run directory; running this cell again resumes from its newest
# checkpoint (delete the directory to start over).

# %%
from memjax.training import loop

RUNS = pathlib.Path(os.environ.get("MEMJAX_RUNS", ROOT / "runs"))
RUN_DIR = RUNS / ("quickstart_smoke" if SMOKE else "quickstart")
final = loop.run(cfg, RUN_DIR)

# %% [markdown]
# ## Loss and fact recall
#
# Every `train.log_every` steps the loop logs the training loss; every `train.eval_every` steps
# the held-out loss and fact recall: the share of probes such as "Ada Varnell was born in" whose
# greedy completion is exactly the right city, against the chance level of guessing among the
# values an attribute takes.

# %%
import json

records = [json.loads(line) for line in (RUN_DIR / "metrics.jsonl").read_text().splitlines()]
train_log = [r for r in records if "train/loss" in r]
eval_log = [r for r in records if "eval/loss" in r]

fig, (ax_loss, ax_recall) = plt.subplots(1, 2, figsize=(11, 3.8))
ax_loss.plot([r["step"] for r in train_log], [r["train/loss"] for r in train_log], label="train")
ax_loss.plot(
    [r["step"] for r in eval_log], [r["eval/loss"] for r in eval_log], "o-", label="held-out"
)
ax_loss.set(xlabel="step", ylabel="loss (nats per byte)", title="loss")
ax_loss.legend()
attributes = sorted(
    k for k in eval_log[-1] if k.startswith("recall/") and k not in ("recall/all", "recall/chance")
)
for key in ["recall/all", *attributes]:
  ax_recall.plot(
      [r["step"] for r in eval_log], [r[key] for r in eval_log],
      "o-" if key == "recall/all" else ".--", lw=2.5 if key == "recall/all" else 1,
      label=key.split("/")[1],
  )
ax_recall.axhline(eval_log[-1]["recall/chance"], color="gray", ls=":", label="chance")
ax_recall.set(xlabel="step", ylabel="exact-match recall", title="fact recall", ylim=(0, 1))
ax_recall.legend(fontsize=7, ncol=2)
plt.tight_layout()
plt.show()
print(
    f"final: held-out loss {final['eval/loss']:.3f}, recall {final['recall/all']:.1%} "
    f"(chance {final['recall/chance']:.1%})"
)

# %% [markdown]
# ## Inside the memory: one fact
#
# We load the final checkpoint as a model (as `python -m memjax.generate` does) and ask it where
# people were born. `memjax.diagnostics.collect_selections` runs the model on a batch and
# returns, for every memory layer, the slots each head read at every position and their softmax
# weights.
# The position that matters is the prompt's last token: its output predicts the answer's first
# token.
#
# A slot id `s` of the product-key table is the pair `(s // n_keys, s % n_keys)`: the best
# sub-keys of the query's two halves.

# %%
from memjax import checkpoint, diagnostics, generate
from memjax.data import probe_ids
from memjax.training import inputs as inputs_lib

_, model, tokenizer = checkpoint.load_for_inference(RUN_DIR)
inputs = inputs_lib.make_inputs(cfg)  # the run's probes and held-out batches
inputs.train.close()  # (its training iterator is not needed here)

# Every birth-city probe, completed greedily in one batch; we look at the first one recalled.
candidates = [p for p in inputs.probes if p.attribute == "birth_city"]
ids = [probe_ids(p, tokenizer) for p in candidates]
completions = generate.greedy_complete(
    model, [[tokenizer.bos_id, *prompt] for prompt, _ in ids],
    max_new_tokens=max(len(answer) for _, answer in ids) + 4,
    stop_ids=[tokenizer.eos_id, *tokenizer.encode(".")],
)
recalled = [i for i, (done, (_, answer)) in enumerate(zip(completions, ids)) if done == answer]
print(f"{len(recalled)} of {len(candidates)} birth cities recalled")
pick = recalled[0] if recalled else 0
probe, (prompt, answer) = candidates[pick], ids[pick]
print(f"{probe.prompt!r} -> {tokenizer.decode(completions[pick])!r} (expected {probe.answer!r})")

row = np.asarray([[tokenizer.bos_id, *prompt, *answer]])
selections = diagnostics.collect_selections(model, row)
position = len(prompt)  # the prompt's last token (row[0] is BOS)
for layer, (slots_NHK, weights_NHK) in selections.items():
  slots_HK = np.asarray(slots_NHK[position])
  weights_HK = np.asarray(weights_NHK[position], np.float32)
  print(f"block {layer}:")
  for head in range(mem.heads):
    top = ", ".join(
        f"{s} ({s // mem.n_keys},{s % mem.n_keys}) {w:.2f}"
        for s, w in zip(slots_HK[head][:4], weights_HK[head][:4])
    )
    print(f"  head {head}: {top}, ... ({weights_HK[head][:4].sum():.0%} of the weight in these 4)")

# %%
fig, axes = plt.subplots(
    len(selections), mem.heads, figsize=(3 * mem.heads, 2.6 * len(selections)), sharey=True,
    squeeze=False,
)
for r, (layer, (slots_NHK, weights_NHK)) in enumerate(selections.items()):
  for head, ax in enumerate(axes[r]):
    slots = np.asarray(slots_NHK[position, head])
    weights = np.asarray(weights_NHK[position, head], np.float32)
    ax.bar(range(mem.knn), weights, color=f"C{r}")
    ax.set_xticks(range(mem.knn), [str(s) for s in slots], rotation=90, fontsize=6)
    ax.set_title(f"block {layer}, head {head}", fontsize=9)
  axes[r][0].set_ylabel("softmax weight")
fig.suptitle(f"slots read at the last token of {probe.prompt!r}", fontsize=10)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## How the table is used
#
# Over many tokens, a healthy memory spreads its reads over much of the table; a collapsed one
# reads a few slots for everything. `MemoryUsage` accumulates per-slot read counts and weights
# over batches (here the held-out biographies) and summarises them: coverage (share of slots
# read at all), KL divergence from uniform, the Gini coefficient, and how few slots carry half of
# the read weight. The training loop logs the same figures at every eval.

# %%
usage = diagnostics.MemoryUsage(layers=mem.layers, heads=mem.heads, n_slots=mem.n_slots)
for batch in inputs.eval_batches:
  usage.update(diagnostics.collect_selections(model, batch[:, :-1]))
summary = usage.summary()
print(f"{summary['memory/tokens']:.0f} tokens")
for layer in mem.layers:
  prefix = f"memory/layer{layer}/"
  stats = {k[len(prefix):]: v for k, v in summary.items() if k.startswith(prefix)}
  print(
      f"block {layer}: coverage {stats['coverage']:.1%}, KL from uniform "
      f"{stats['kl_weight']:.2f} nats, Gini {stats['gini_weight']:.2f}, half the weight in "
      f"{stats['slots_50pct_weight']:.0f} slots"
  )

fig, axes = plt.subplots(1, len(mem.layers) + 1, figsize=(4 * (len(mem.layers) + 1), 3.6))
for ax, layer in zip(axes, mem.layers):
  weight_S = np.asarray(usage.weights[layer].sum(0))  # heads pooled
  image = ax.imshow(np.log10(weight_S.reshape(mem.n_keys, mem.n_keys) + 1e-3), cmap="viridis")
  ax.set(title=f"block {layer}: log10 read weight", xlabel="second sub-key", ylabel="first sub-key")
  fig.colorbar(image, ax=ax, fraction=0.046)
  share = np.cumsum(np.sort(weight_S)[::-1]) / weight_S.sum()
  axes[-1].plot(np.arange(1, mem.n_slots + 1) / mem.n_slots, share, label=f"block {layer}")
axes[-1].plot([0, 1], [0, 1], "k:", label="uniform")
axes[-1].set(
    xlabel="share of slots (most read first)", ylabel="share of read weight", title="concentration"
)
axes[-1].legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Generating text
#
# `memjax.generate.generate` prefills the prompts in one batch and then decodes one token per
# step against a key/value cache, all in one compiled loop. Greedy decoding (temperature 0)
# completes the probes; sampling with a temperature writes a new biography for a name.

# %%
people = {p.name for p in inputs.probes}
prompts = [p.prompt for p in inputs.probes[:4]] + [sorted(people)[0]]
rows = generate.generate(
    model, [[tokenizer.bos_id, *tokenizer.encode(text)] for text in prompts],
    max_new_tokens=48, eos_id=tokenizer.eos_id,
)
for text, new in zip(prompts, rows):
  print(f"{text}|{tokenizer.decode(new)}")

(sampled,) = generate.generate(
    model, [[tokenizer.bos_id, *tokenizer.encode(sorted(people)[0])]], max_new_tokens=120,
    temperature=0.7, eos_id=tokenizer.eos_id, rng=jax.random.key(0),
)
print(f"\nsampled: {sorted(people)[0]}|{tokenizer.decode(sampled)}")

# %% [markdown]
# ## Where next
#
# - `python train.py train.steps=2000 data.people=500` trains longer on a bigger corpus; the
#   README lists the other settings.
# - `02_pytorch_parity` exports this kind of model to the reference's PyTorch checkpoint format
#   and checks the logits against a PyTorch implementation.
# - `03_scaling_on_tpu` shows how the value table is split over many devices and checks the
#   paper's 373M model against a Cloud TPU slice's memory.
