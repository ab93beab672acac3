"""Keeps libtpu quiet on machines without a TPU: every entry point calls `quiet_libtpu()` first.

With the `tpu` extra (libtpu) installed, JAX tries the TPU backend at start-up on any machine.
Without a TPU chip libtpu finds no worker hostnames and no host bounds in the VM's metadata and
logs `E0000 ... TPU_WORKER_HOSTNAMES` lines before the backend fails, quietly, as it should.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys

_GOOGLE_PCI_VENDOR = "0x1ae0"
# PCI class prefixes of Google's devices that are not TPUs: storage (persistent disk, NVMe) and
# network (gVNIC). Anything else of Google's counts as a TPU chip: a false "TPU" only costs noise.
_NOT_TPU_CLASSES = ("0x01", "0x02")
_NVIDIA_DEVICES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg")


def has_tpu_chip() -> bool:
  """A TPU chip is attached (its PCI device, or the accel/vfio nodes TPU VMs expose)."""
  if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
    return True
  for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(vendor) as f:
        if f.read().strip() != _GOOGLE_PCI_VENDOR:
          continue
      with open(os.path.join(os.path.dirname(vendor), "class")) as f:
        if not f.read().strip().startswith(_NOT_TPU_CLASSES):
          return True
    except OSError:
      continue
  return False


def quiet_libtpu() -> None:
  """On a machine with libtpu installed and no TPU chip: the CPU (when no NVIDIA GPU either and
  no platform was asked for; libtpu then never loads), and libtpu told it is one worker of one
  host, for where it still loads (beside a GPU, or for `memjax.aot`'s topologies). Call it before
  JAX initialises its backends; it changes nothing on a TPU VM."""
  if has_tpu_chip() or importlib.util.find_spec("libtpu") is None:
    return
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_HOST_BOUNDS", "1,1,1")
  if os.environ.get("JAX_PLATFORMS") or any(os.path.exists(d) for d in _NVIDIA_DEVICES):
    return
  if "jax" in sys.modules:  # imported already: the flag took its value from the environment
    import jax

    if not jax.config.jax_platforms:
      jax.config.update("jax_platforms", "cpu")
  else:
    os.environ["JAX_PLATFORMS"] = "cpu"
