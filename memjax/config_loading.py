"""Loading configs: a YAML file (by path or by name in `configs/`) plus `key=value` overrides,
validated into `memjax.config.Config`; and the command line that names them.

A file is memjax's own or in one of `FORMATS`, the other layouts recognised and mapped onto
memjax's before validation: today the reference's (Meta Lingua) `TrainArgs`, by
`memjax.interop.lingua`. The schema module stays free of YAML and of the interop code; this one
depends on both.
"""

from __future__ import annotations

import io
import pathlib
import re
from typing import Any, Callable, Sequence

import yaml
from etils import epath
from omegaconf import OmegaConf, errors as omegaconf_errors

from memjax import paths
from memjax.config import Config, ConfigError, from_dict, to_dict
from memjax.interop import lingua

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = "tiny"

# Other config layouts: (whether a parsed file is in it, its mapping onto memjax's layout).
FORMATS: tuple[tuple[Callable[[dict], bool], Callable[[dict], dict]], ...] = (
    (lingua.is_lingua, lingua.to_memjax),
)


def split_command_line(
    argv: list[str], options: tuple[str, ...] = ()
) -> tuple[str, dict[str, str], list[str]]:
  """`config=NAME_OR_PATH` (default: DEFAULT_CONFIG), the `OPTION=VALUE` arguments for each
  of `options`, and the remaining `key=value` overrides, from a command line."""
  path, found, overrides = DEFAULT_CONFIG, {}, []
  for arg in argv:
    key, _, value = arg.partition("=")
    if key == "config":
      path = value
    elif key in options:
      found[key] = value
    else:
      overrides.append(arg)
  return path, found, overrides


def resolve_path(name_or_path: str | epath.PathLike) -> epath.Path | pathlib.Path:
  """A path (local or gs://...), or the name of a file in `configs/` (with or without `.yaml`)."""
  if paths.is_remote(name_or_path):
    p = epath.Path(name_or_path)
    if p.is_file():
      return p
    raise FileNotFoundError(f"config {str(name_or_path)!r} not found")
  p = pathlib.Path(name_or_path)
  candidates = [p, CONFIG_DIR / p, CONFIG_DIR / f"{p}.yaml"]
  for c in candidates:
    if c.is_file():
      return c
  known = sorted(x.stem for x in CONFIG_DIR.glob("*.yaml")) if CONFIG_DIR.is_dir() else []
  raise FileNotFoundError(
      f"config {str(name_or_path)!r} not found: give a YAML path or one of {', '.join(known)}"
  )


class _PlaceholderTagLoader(yaml.SafeLoader):
  """Reads a scalar with a tag YAML does not know as the tag's text (e.g. "!!CHANGETHIS!!")."""


def _placeholder(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> str:
  if not isinstance(node, yaml.ScalarNode):
    raise ConfigError(f"{node.tag}", f"unknown YAML tag on a collection at {node.start_mark}")
  return node.value or f"!!{suffix}"


_PlaceholderTagLoader.add_multi_constructor("tag:yaml.org,2002:", _placeholder)
# YAML 1.2 floats such as 1e-4, as OmegaConf reads them (plain YAML 1.1 would keep a string).
_PlaceholderTagLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+"
        r"|\.[0-9_]+(?:[eE][-+]?[0-9]+)?|\.(?:inf|Inf|INF))$|^\.(?:nan|NaN|NAN)$"
    ),
    list("-+0123456789."),
)
_PlaceholderTagLoader.add_multi_constructor("!", _placeholder)


def _yaml_problem(error: yaml.YAMLError) -> str:
  """A YAML error in one line: what is wrong and where (PyYAML's message spans several)."""
  if isinstance(error, yaml.MarkedYAMLError) and error.problem_mark is not None:
    mark = error.problem_mark
    return f"{error.problem} at line {mark.line + 1}, column {mark.column + 1}"
  return str(error).splitlines()[0] if str(error) else type(error).__name__


def _load_yaml(path: epath.Path | pathlib.Path):
  """The mapping in YAML file `path`; a file that is not one is a ConfigError naming it."""
  try:
    text = path.read_bytes().decode("utf-8")
  except UnicodeDecodeError as e:
    raise ConfigError(str(path), f"is not UTF-8 text (byte {e.start}: {e.reason})") from None
  try:
    root = yaml.compose(text, Loader=yaml.SafeLoader)  # the document's shape, values unread
    if root is not None and not isinstance(root, yaml.MappingNode):
      kind = "a list" if isinstance(root, yaml.SequenceNode) else f"the single value {root.value!r}"
      raise ConfigError(str(path), f"must be a YAML mapping of config keys to values, got {kind}")
    try:
      return OmegaConf.load(io.StringIO(text))
    except yaml.constructor.ConstructorError:
      # Lingua's templates mark values to edit with an unknown tag (`path: !!CHANGETHIS!!`): read
      # the placeholder as a string, so the model the file describes still loads.
      return OmegaConf.create(yaml.load(text, Loader=_PlaceholderTagLoader) or {})
  except yaml.YAMLError as e:
    raise ConfigError(str(path), f"is not valid YAML: {_yaml_problem(e)}") from None
  except omegaconf_errors.OmegaConfBaseException as e:  # e.g. a key OmegaConf cannot hold
    raise ConfigError(str(path), str(e).splitlines()[0]) from None


def merge_overrides(base: Any, overrides: Sequence[str] = ()) -> dict:
  """`base` (a dict or an OmegaConf node) with dotted `key=value` overrides merged in."""
  for item in overrides:
    if "=" not in item:
      raise ConfigError(item, "overrides are written key=value, e.g. model.dim=256")
  merged = OmegaConf.create(base)
  for item in overrides:
    # YAML 1.1 reads 2:4 as the base-60 int 124; memjax has no such field, and train.profile is
    # written START:STOP.
    quoted = re.sub(r"^([^=]+)=(\d+(?::\d+)+)$", r"\1='\2'", item)
    try:
      merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([quoted]))
    except yaml.YAMLError as e:
      raise ConfigError(item, f"the value is not valid YAML: {_yaml_problem(e)}") from None
    except omegaconf_errors.OmegaConfBaseException as e:  # a malformed key, a clash of types
      raise ConfigError(item, str(e).splitlines()[0]) from None
    except TypeError as e:  # OmegaConf's for a list merged into a mapping, or the reverse
      raise ConfigError(
          item, f"{e}: the file or an earlier override gives it another type"
      ) from None
  try:
    return OmegaConf.to_container(merged, resolve=True)
  except omegaconf_errors.OmegaConfBaseException as e:  # e.g. ${oc.env:NAME} of an unset NAME
    reason = str(e).splitlines()[0].removeprefix("KeyError raised while resolving interpolation: ")
    reason = reason.strip('"')
    field = getattr(e, "full_key", None) or "config"
    raise ConfigError(field, f"cannot resolve an interpolation: {reason}") from None


def load_dict(path: str | pathlib.Path | None, overrides: Sequence[str] = ()) -> dict:
  """Parses a YAML file and merges dotted `key=value` overrides into it (no validation yet)."""
  base = _load_yaml(resolve_path(path)) if path is not None else {}
  return merge_overrides(base, overrides)


def to_yaml(cfg: Config) -> str:
  """`cfg` as a memjax YAML file (every field, resolved) that `load` reads back to `cfg`."""
  return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def load(path: str | pathlib.Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
  """The validated config of a YAML file (memjax's own or one of `FORMATS`) plus overrides.

  Overrides are merged before any mapping, so they use the file's own key names. A Lingua file is
  read as a training setup: what memjax cannot train with is refused by name
  (`memjax.interop.lingua.to_memjax`).
  """
  data = load_dict(path, overrides)
  for detect, convert in FORMATS:
    if detect(data):
      data = convert(data)
      break
  return from_dict(Config, data)
