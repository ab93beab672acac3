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
# # Scaling on TPU: the value table across devices
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/memjax-dev/memjax/blob/main/notebooks/03_scaling_on_tpu.ipynb)
#
# The paper's memory layers share one value table of a million slots or more: 1.07B parameters
# for its 373M model, more than the rest of the model. memjax places every array on a device
# mesh with three axes: `data` and `fsdp` split the batch (`fsdp` also shards the dense
# weights), and `memory` splits the table's columns, so that each device holds a slice of every
# row (the reference's memory parallelism). This notebook
#
# 1. builds meshes of 8 devices and shows where the table's pieces live,
# 2. trains a few steps with the table split over devices,
# 3. compiles the 373M model's train step for Cloud TPU slices on this machine (no TPU needed)
#    and prints what each chip would hold against its memory.
#
# On a CPU runtime, JAX simulates 8 devices. On a Colab TPU runtime (Runtime > Change runtime
# type > TPU) the training steps run on the TPU, with a larger model.

# %% [markdown]
# ## Setup
#
# On Colab this clones memjax from GitHub and installs it with the `tpu` extra (libtpu: the TPU
# compiler, also used here for compiling without a TPU). Anywhere else it uses the checkout this
# notebook lies in, as it is: `pip install -e '.[tpu]'` first.

# %%
import os
import pathlib
import subprocess
import sys

REPO = "memjax-dev/memjax"  # placeholder: the GitHub owner/name memjax is published under
SMOKE = os.environ.get("MEMJAX_NOTEBOOK_SMOKE") == "1"  # small compiles, few steps (the tests)

if "google.colab" in sys.modules:
  ROOT = pathlib.Path("/content/memjax")
  if not ROOT.exists():
    url = f"https://github.com/{REPO}.git"
    subprocess.run(["git", "clone", "--depth=1", url, str(ROOT)], check=True)
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", f"{ROOT}[tpu]"], check=True)
else:
  here = pathlib.Path.cwd()
  ROOT = next((p for p in [here, *here.parents] if (p / "memjax" / "__init__.py").is_file()), None)
  if ROOT is None:
    raise FileNotFoundError(f"{here} is not in a memjax checkout: start Jupyter in one")
# An editable install is only seen by a fresh interpreter; the path makes it importable now.
sys.path.insert(0, str(ROOT))
print(f"memjax from {ROOT}; smoke mode {'on' if SMOKE else 'off'}")

# %% [markdown]
# ## Devices
#
# JAX reads its flags when it starts, so they are set before its first import: on a machine
# without a TPU, the host CPU poses as 8 devices and the TPU plugin is left alone. (If `jax`
# was already imported in this session, restart the runtime first.)

# %%
import glob

ON_TPU_HOST = bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)
if not ON_TPU_HOST:
  os.environ["JAX_PLATFORMS"] = "cpu"

import jax

ON_TPU = jax.default_backend() == "tpu"
# The layouts below need 8 devices: the TPU's when it has them, else the host CPU's.
DEVICES = jax.devices() if jax.device_count() >= 8 else jax.devices("cpu")[:8]
print(f"backend {jax.default_backend()}: {jax.device_count()} x {jax.devices()[0].device_kind}")
print(f"layouts on {len(DEVICES)} x {DEVICES[0].device_kind}")

# %% [markdown]
# ## Where the table lives
#
# The model is `configs/tiny.yaml`'s: two memory layers share a 4096-slot x 128 table. For each
# mesh we create the train state exactly as the training loop does (`create_state` initialises
# every array directly in its place on the mesh) and draw how the table is cut:
# `jax.debug.visualize_array_sharding` shows the (4096, 128) table as a rectangle, each block
# labelled with the devices holding it.
#
# - `memory=1`: the table is replicated; every device holds all of it.
# - `memory=4`: 4 column slices, each held by 2 devices (the `data` axis of 2 replicates it).
# - `memory=8`: 8 column slices; each device holds an eighth.
# - `fsdp=2, memory=4` with `table_rows_over_fsdp`: rows are also split over `fsdp`; the rows a
#   lookup needs are gathered when it runs.

# %%
import dataclasses

import numpy as np
from flax import nnx

from memjax import config, config_loading, sharding
from memjax.layers.memory import MemoryValues
from memjax.training import state as state_lib

layouts = {
    "memory=1": config.MeshConfig(data=-1, memory=1),
    "memory=4": config.MeshConfig(data=-1, memory=4),
    "memory=8": config.MeshConfig(data=-1, memory=8),
    "fsdp=2, memory=4, rows over fsdp": config.MeshConfig(
        data=-1, fsdp=2, memory=4, table_rows_over_fsdp=True
    ),
}
tiny = config_loading.load("tiny")
for name, mesh_cfg in layouts.items():
  cfg = dataclasses.replace(tiny, mesh=mesh_cfg)
  mesh = sharding.make_mesh(cfg.mesh, DEVICES)
  with jax.set_mesh(mesh):
    state = state_lib.create_state(cfg, mesh)
  (table,) = jax.tree.leaves(nnx.state(state.params, MemoryValues))  # the shared table
  shard = table.addressable_shards[0].data
  print(
      f"\n{name}: mesh {dict(mesh.shape)}, table {table.sharding.spec}; device 0 holds "
      f"{shard.shape} = {shard.nbytes / 2**20:.2f} of {table.nbytes / 2**20:.2f} MiB"
  )
  jax.debug.visualize_array_sharding(table)

# %% [markdown]
# The dense weights follow the `fsdp` axis: with `fsdp=2`, each 2-D weight is split on its
# first dimension that 2 divides, and its Adam moments are placed like it.

# %%
wq = state.params["layers"][0]["attention"]["wq"]["kernel"]
print(f"layer 0 attention wq {wq.shape}: {wq.sharding.spec}")
jax.debug.visualize_array_sharding(wq[...])

# %% [markdown]
# ## Training with the table split
#
# With `mesh.memory > 1`, each memory layer's lookup runs in a `shard_map`
# (`memjax.ops.memory_parallel`): the devices of a memory group share their tokens' slot ids and
# weights (small), each sums its own columns for all of the group's tokens, and one all-to-all
# gives every token its full row back. The table's gradient stays where the table is.
#
# Below, the same jitted, sharded train step as `train.py`'s runs a few steps on the knowledge
# corpus. On the simulated CPU devices that is the tiny model with the table over 4 devices. On
# a TPU runtime it is the paper's 373M architecture with a quarter of its table (512² slots),
# 4 sequences of 1024 tokens per chip, the table split over every chip and Adam's moments in
# bfloat16. Compiled for v5e chips each holding the whole table (as a Colab v5e-1 does), that
# needs 13 of a chip's 16 GiB. On chips with less memory, lower `train.batch_size`.

# %%
import time

from memjax.training import inputs as inputs_lib, step as step_lib

if ON_TPU:
  n = jax.device_count()
  # The xla lookup compiles on every TPU generation (and is the one checked against 16 GiB);
  # train.py's default, auto, takes the Pallas kernels.
  run_cfg = config_loading.load("pkplus_373m_1024k", [
      "model.memory.n_keys=512", "model.memory.impl=xla", f"mesh.memory={n}", "mesh.data=1",
      "train.seq_len=1024", f"train.batch_size={4 * n}", "train.grad_accum=1",
      "optim.state_dtype=bfloat16",
      "train.steps=100",
  ])
  steps = 20
else:
  run_cfg = config_loading.load("tiny", ["mesh.memory=4", "mesh.data=-1"])
  steps = 4 if SMOKE else 20
mesh = sharding.make_mesh(run_cfg.mesh, jax.devices() if ON_TPU else DEVICES)
with jax.set_mesh(mesh):
  state = state_lib.create_state(run_cfg, mesh)
  train_step, _ = step_lib.jit_train_step(run_cfg, mesh)
  inputs = inputs_lib.make_inputs(run_cfg)
  batch_sharding = sharding.batch_sharding(mesh)
  losses, start = [], time.perf_counter()
  for step in range(steps):
    batch = jax.make_array_from_process_local_data(batch_sharding, next(inputs.train))
    state, metrics = train_step(state, batch)
    losses.append(float(metrics["loss"]))  # waits for the step
    if step == 0:
      print(f"step 1 (with the compile): {time.perf_counter() - start:.1f}s")
      start = time.perf_counter()
  inputs.train.close()
seconds = (time.perf_counter() - start) / max(steps - 1, 1)
tokens = run_cfg.train.batch_size * run_cfg.train.seq_len
print(
    f"mesh {dict(mesh.shape)} on {mesh.devices.flat[0].device_kind}: {seconds:.2f}s per step, "
    f"{tokens / seconds:,.0f} tokens/s"
)
print("loss by step:", " ".join(f"{loss:.3f}" for loss in losses))

# %% [markdown]
# ## Will it fit? Compiling for a Cloud TPU slice
#
# `memjax.aot` compiles the train step with the TPU compiler itself, for a slice described by
# its Cloud TPU name, on any machine with libtpu. The compiled program says how many bytes each
# chip needs for parameters, optimizer state and temporaries; a configuration that does not fit
# fails here instead of on the pod. (`python -m memjax.aot config=... topology=v5p-8 mesh.memory=4`
# prints the same from a shell.)
#
# The paper's 373M Memory+ model (`configs/pkplus_373m_1024k.yaml`: a 1024² x 1024 table in
# bfloat16 beside 367M other parameters) on a v5p-8 (4 chips of 95 GiB) with the table over all
# 4, and on a v5e-8 (8 chips of 16 GiB) over all 8, at a small batch: 16 sequences of 128 tokens
# in one step (the temporaries grow with it; the config's own recipe, 2048 sequences of 4096
# tokens in 512 micro-batches, fits the v5p-8 too: docs/results.md). Change the
# `train.batch_size`, `train.seq_len` and `train.grad_accum` overrides to check your own. Each
# compile takes a few minutes on 2 CPU cores; the smoke mode compiles the tiny model instead.

# %%
from memjax import aot

if SMOKE:
  targets = [("tiny", "v5e-4", 4), ("tiny", "v5e-8", 8)]
else:
  targets = [("pkplus_373m_1024k", "v5p-8", 4), ("pkplus_373m_1024k", "v5e-8", 8)]
results = []
for name, topology, memory in targets:
  aot_cfg = config_loading.load(name, [
      "model.memory.impl=xla", f"mesh.memory={memory}", "mesh.data=-1",
      "train.batch_size=16", "train.seq_len=128", "train.grad_accum=1",
  ])
  figures = aot.compile_for(aot_cfg, topology)
  batch = f"batch {aot_cfg.train.batch_size} x {aot_cfg.train.seq_len} tokens"
  print(f"{name}, {batch}, on {aot.report(figures)}\n")
  results.append((f"{name}\n{topology}, memory={memory}", figures))

# %%
import matplotlib.pyplot as plt

fig, ax = plt.subplots(figsize=(8, 3.8))
labels = [label for label, _ in results]
bottom = np.zeros(len(results))
parts = {
    "params_bytes": "parameters", "opt_state_bytes": "optimizer state", "temp_bytes": "temporaries"
}
for key, part in parts.items():
  gib = np.array([f[key] / 2**30 for _, f in results])
  ax.bar(labels, gib, bottom=bottom, label=part)
  bottom += gib
hbm = [f["hbm_bytes"] / 2**30 for _, f in results]
x = np.arange(len(hbm))
ax.hlines(hbm, x - 0.4, x + 0.4, color="k", label="the chip's HBM")
ax.set(ylabel="GiB per chip", title="the compiled train step, per chip")
ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1, 1))
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Next
#
# `docs/scaling.md` has the commands for a Cloud TPU VM, multi-host pod slices and GPU nodes.
# `python train.py config=configs/pkplus_373m_1024k.yaml mesh.memory=4 data.source=tfds ...`
# trains the model of the last cell on a v5p-8.
