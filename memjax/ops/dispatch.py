"""Which kernels an op runs: impl names resolved against `pallas_kernels.impls.IMPLS`, and each
impl's kernel package loaded the first time it is asked for.

"auto" is the table's impl for the default backend's platform; where its kernels cannot run
there (no C++ compiler for the `cpu` ones, say), "auto" takes the `xla` twin and warns once,
unless the user turned them off. An impl asked for by name raises with the reason instead.
"""

from __future__ import annotations

import importlib
import warnings

import jax

from pallas_kernels import impls

_loaded: dict[str, impls.Kernels] = {}
_unavailable: dict[str, impls.Unavailable] = {}
_warned: set[str] = set()


def _load(name: str) -> impls.Kernels | impls.Unavailable:
  if name not in _loaded and name not in _unavailable:
    try:
      _loaded[name] = importlib.import_module(impls.named(name).package).load()
    except impls.Unavailable as error:
      _unavailable[name] = error
  return _loaded.get(name) or _unavailable[name]


def _check_name(impl: str) -> None:
  if impls.named(impl) is None:
    raise ValueError(
        f"embedding_bag impl {impl!r} is not available; choose 'auto' or one of "
        f"{', '.join(impls.NAMES)}"
    )


def unavailable_reason(impl: str) -> str | None:
  """None when `impl`'s kernels run here, else why not (loads them on first use)."""
  _check_name(impl)
  loaded = _load(impl)
  return str(loaded) if isinstance(loaded, impls.Unavailable) else None


def available_impls() -> tuple[str, ...]:
  """The impls whose kernels run here, in the table's order."""
  return tuple(name for name in impls.NAMES if unavailable_reason(name) is None)


def auto_impl(platform: str) -> str:
  """The impl "auto" means for a program lowered for `platform`, whether or not it runs here
  (an ahead-of-time compile for TPU asks from a CPU host)."""
  preferred = impls.for_platform(platform)
  return "xla" if preferred is None else preferred.name


def resolve_impl(impl: str) -> str:
  """Maps "auto" to the impl for the default backend that runs here; checks a name."""
  if impl == "auto":
    preferred = auto_impl(jax.default_backend())
    loaded = _load(preferred)
    if not isinstance(loaded, impls.Unavailable):
      return preferred
    if not loaded.deliberate and preferred not in _warned:
      _warned.add(preferred)
      warnings.warn(f"memjax: the {preferred} lookup kernels are unavailable ({loaded}); using "
                    "the slower xla impl", RuntimeWarning, stacklevel=3)
    return "xla"
  _check_name(impl)
  if (reason := unavailable_reason(impl)) is not None:
    raise ValueError(f"embedding_bag impl {impl!r} is not available: {reason}")
  return impl


def kernels(impl: str) -> impls.Kernels:
  """The kernels of `impl` ("auto" or a name)."""
  return _load(resolve_impl(impl))
