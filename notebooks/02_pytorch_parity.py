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
# # PyTorch parity: reference checkpoints and configs
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/memjax-dev/memjax/blob/main/notebooks/02_pytorch_parity.ipynb)
#
# memjax follows the PyTorch reference of "Memory Layers at Scale" (built on Meta Lingua) down to
# its parameter names and layouts, so checkpoints and configs move between the two. This notebook
#
# 1. writes a memjax model as a reference-format checkpoint (`consolidated.pth` + `params.json`,
#    what the reference's training dumps; with a reference checkpoint at hand, start at step 2
#    with its folder),
# 2. loads that checkpoint into an independent PyTorch implementation of the reference maths
#    (`memjax/interop/torch_reference.py`, the tests' oracle) and back into memjax,
# 3. compares the two models' logits on the same text,
# 4. carries a reference (Lingua) YAML config over to memjax.
#
# It runs on a CPU and needs PyTorch (preinstalled on Colab; locally `pip install -e '.[torch]'`).

# %% [markdown]
# ## Setup
#
# On Colab this clones memjax from GitHub (the PyTorch oracle comes with it) and
# installs it. Anywhere else it uses the checkout this notebook lies in, as it is.

# %%
import os
import pathlib
import subprocess
import sys

REPO = "memjax-dev/memjax"  # placeholder: the GitHub owner/name memjax is published under
SMOKE = os.environ.get("MEMJAX_NOTEBOOK_SMOKE") == "1"  # a shorter text (the tests)

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
# An editable install is only seen by a fresh interpreter; the path makes memjax (and its
# PyTorch oracle) importable now.
sys.path[:0] = [str(ROOT)]
print(f"memjax from {ROOT}")

# %% [markdown]
# ## A memjax model
#
# The CPU default config (`configs/tiny.yaml`): 4 blocks, Memory+ layers in blocks 1 and 3
# sharing one 4096 x 128 table. Freshly initialised weights serve as well as trained ones for a
# parity check; memjax starts biases at zero and norm weights at one, so we draw those at random
# too, or a mix-up of two biases would go unseen.

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import torch
from flax import nnx

from memjax import config, config_loading
from memjax.model import Transformer

cfg = config_loading.load("tiny")
model = Transformer(cfg.model, rngs=nnx.Rngs(cfg.seed))
rng = np.random.default_rng(0)
for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
  if path[-1] == "bias":
    variable.set_value(jnp.asarray(0.1 * rng.standard_normal(variable.shape), variable.dtype))
  elif path[-1] == "weight":  # RMSNorm scales
    variable.set_value(jnp.asarray(1 + 0.1 * rng.standard_normal(variable.shape), variable.dtype))
print(f"memory in blocks {list(cfg.model.memory.layers)}, table {cfg.model.memory.value_dtype}")

# %% [markdown]
# ## Export to the reference's format
#
# `export_consolidated` writes the reference's state dict (its names; torch `Linear` weights are
# (out, in) where Flax kernels are (in, out); the memory keys flattened to (2·heads·n_keys,
# k_dim/2)) and a `params.json` holding the model section of a Lingua config. The shared value
# table is stored once, under the first memory layer.

# %%
import json
import tempfile

from memjax.interop import torch_checkpoint

export_dir = pathlib.Path(tempfile.mkdtemp(prefix="memjax-export-")) / "consolidated"
torch_checkpoint.export_consolidated(model, cfg, export_dir)
for f in sorted(export_dir.iterdir()):
  print(f"{f.name}: {f.stat().st_size / 2**20:.2f} MiB")

state_dict = torch.load(export_dir / "consolidated.pth", weights_only=True)["model"]
for name in [k for k in state_dict if k.startswith(("tok_embeddings", "layers.1."))]:
  print(f"  {name:48s} {tuple(state_dict[name].shape)} {state_dict[name].dtype}")
params = json.loads((export_dir / "params.json").read_text())
print(json.dumps(params["model"]["productkey_args"], indent=1))

# %% [markdown]
# ## The checkpoint in PyTorch and in memjax
#
# The oracle builds the reference's `LMTransformer` with one `nn.Embedding` table registered
# under every memory layer, so its state dict names the table once per memory layer; we point
# those names at the one stored table before a strict load.
#
# `load_consolidated` reads the same folder into a memjax config and model. Lingua's
# `params.json` records no table dtype and the reference keeps its table in bfloat16, so that is
# what loads by default; the override keeps our float32 table exactly.

# %%
from memjax.interop.torch_reference import OracleTransformer

oracle = OracleTransformer(cfg.model)
first, *others = [f"layers.{i}.feed_forward.values.weight" for i in cfg.model.memory.layers]
oracle.load_state_dict(state_dict | {name: state_dict[first] for name in others}, strict=True)
oracle.eval()

loaded_cfg, loaded = torch_checkpoint.load_consolidated(
    export_dir, ["model.memory.value_dtype=float32"]
)
_, loaded_bf16 = torch_checkpoint.load_consolidated(export_dir)
print(f"same model config after the round trip: {loaded_cfg.model == cfg.model}")
print(f"table dtypes: {loaded.layers[1].feed_forward.values.dtype} (override), "
      f"{loaded_bf16.layers[1].feed_forward.values.dtype} (as the reference keeps it)")

# %% [markdown]
# ## Logits side by side
#
# The text is a biography from memjax's knowledge corpus, as bytes (the byte tokenizer's ids,
# with BOS first). Both models run in float32 on the CPU. First the heart of a memory layer: for
# every token and head, do both pick the same slots? A forward hook catches the input of the
# oracle's memory layers; `collect_selections` gives memjax's.

# %%
from memjax.data import ByteTokenizer, biographies, make_people

tokenizer = ByteTokenizer()
text = " ".join(biographies(make_people(2, seed=0), seed=0))
text = text[: 64 if SMOKE else cfg.model.max_seqlen - 1]
tokens_BT = np.asarray([[tokenizer.bos_id, *tokenizer.encode(text)]], np.int32)
print(text)

from memjax import diagnostics

memory_inputs = {}
for i in cfg.model.memory.layers:
  oracle.layers[i].feed_forward.register_forward_hook(
      lambda module, args, out, i=i: memory_inputs.__setitem__(i, args[0])
  )
with torch.no_grad():
  torch_logits = oracle(torch.from_numpy(tokens_BT).long()).numpy()
memjax_selections = diagnostics.collect_selections(loaded, tokens_BT)
for i, (slots_NHK, _) in memjax_selections.items():
  with torch.no_grad():
    x_ND = memory_inputs[i].reshape(-1, cfg.model.dim)
    _, torch_slots_NHK = oracle.layers[i].feed_forward.select(x_ND)
  same = (np.sort(np.asarray(slots_NHK), -1) == np.sort(torch_slots_NHK.numpy(), -1)).all(-1)
  print(f"block {i}: the same {cfg.model.memory.knn} slots for {same.mean():.1%} of (token, head)")

# %% [markdown]
# With the same slots read, what is left between the logits is the rounding of float32 sums
# taken in different orders. Loading the table in bfloat16, as the reference keeps it, adds
# that rounding to every value read.

# %%
forward = nnx.jit(lambda m, tokens: m(tokens))
memjax_logits = np.asarray(forward(loaded, tokens_BT))
memjax_bf16_logits = np.asarray(forward(loaded_bf16, tokens_BT))

scale = np.abs(torch_logits).max()
for name, logits in [("float32 table", memjax_logits), ("bfloat16 table", memjax_bf16_logits)]:
  diff = np.abs(logits - torch_logits).max()
  print(
      f"memjax ({name}) vs PyTorch: max |diff| {diff:.2e} (logits up to {scale:.2f}: "
      f"{diff / scale:.1e} of scale)"
  )
same_argmax = (memjax_logits.argmax(-1) == torch_logits.argmax(-1)).mean()
print(f"same next-token argmax at {same_argmax:.0%} of {tokens_BT.shape[1]} positions")
assert np.abs(memjax_logits - torch_logits).max() <= 1e-4 * scale

# %%
fig, (ax_scatter, ax_hist) = plt.subplots(1, 2, figsize=(10, 3.8))
ax_scatter.scatter(torch_logits.ravel(), memjax_logits.ravel(), s=1, alpha=0.3)
ax_scatter.set(xlabel="PyTorch oracle logit", ylabel="memjax logit", title="every logit")
for name, logits in [("float32 table", memjax_logits), ("bfloat16 table", memjax_bf16_logits)]:
  diff = np.abs(logits - torch_logits).ravel()
  ax_hist.hist(np.log10(np.maximum(diff, 1e-10)), bins=60, alpha=0.6, label=name)
ax_hist.set(xlabel="log10 |memjax - PyTorch| (equal: -10)", ylabel="logits", title="differences")
ax_hist.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## A reference config
#
# A Lingua YAML file (here the reference's `pkplus_373m_1024k.yaml`, kept in `tests/data/lingua`)
# loads as it is: `config_loading.load` recognises it and maps the model, its `productkey_args`, the
# optimizer and schedule, the batch, the tokenizer, its data layout (`data.root_dir` and the
# weighted `data.sources`: memjax's `lingua` data source) and checkpointing onto memjax's config.
# Keys that would change training and that memjax lacks are refused by name; keys that only
# concern logging, profiling or the eval harness are named in a warning. Lingua's
# `data.batch_size` is per GPU: multiply by the GPUs it ran on for memjax's global
# `train.batch_size`.

# %%
import yaml

lingua_yaml = ROOT / "tests" / "data" / "lingua" / "pkplus_373m_1024k.yaml"
lingua_dict = yaml.safe_load(lingua_yaml.read_text())
print(yaml.safe_dump({k: lingua_dict[k] for k in ("model", "optim", "data")}, sort_keys=False))

# %% [markdown]
# The mapped config, printed as a memjax YAML file would state it: only what differs from the
# defaults in `memjax/config.py`.

# %%
from memjax.model import parameter_counts

# Overrides of a Lingua file use its own keys: 8 sequences per GPU on 8 GPUs is 64 in all.
big = config_loading.load(lingua_yaml, ["data.batch_size=64"])


def differences(ours: dict, defaults: dict) -> dict:
  """The entries of `ours` that differ from `defaults`: what a memjax YAML file states."""
  out = {}
  for key, value in ours.items():
    default = defaults.get(key)
    if isinstance(value, dict) and isinstance(default, dict) and default:  # a section
      value = differences(value, default)
    if value != default and value != {}:
      out[key] = value
  return out


defaults = config.to_dict(config.Config())
memjax_yaml = yaml.safe_dump(differences(config.to_dict(big), defaults), sort_keys=False)
print(memjax_yaml)
# The same config, written in memjax's own format, loads back to the same thing.
(export_dir.parent / "pkplus_373m.yaml").write_text(memjax_yaml)
assert config_loading.load(export_dir.parent / "pkplus_373m.yaml") == big
counts = parameter_counts(nnx.eval_shape(lambda: Transformer(big.model, rngs=nnx.Rngs(0))))
print(f"{counts['total'] / 1e9:.2f}B parameters, {counts['active'] / 1e6:.0f}M used per token")

# %% [markdown]
# Either file trains the model, with `data.root_dir` pointing at Lingua's prepared chunks:
# `python train.py config=tests/data/lingua/pkplus_373m_1024k.yaml data.root_dir=/data/shuffled`
# (`03_scaling_on_tpu` shows what it needs per device), and a model trained from it exports back
# to a checkpoint the reference's loader reads.
