"""Bad inputs of issue 17 (items 7 and 8): config files, overrides, tokenizer files, generate's
paths and arguments, imported checkpoints. Each gives one error naming the file or field; the
command lines print it as one `error:` line and exit 2 (`memjax.cli`), and a bug is reported as
one."""

import dataclasses
import math
import os
import pathlib
import string
import subprocess
import sys
import typing

import hypothesis
import hypothesis.strategies as st
import jax
import pytest
import yaml
from flax import nnx

from memjax import checkpoint, cli, config_loading, generate
from memjax.config import Config, ConfigError, ModelConfig
from memjax.data import tokenizers
from memjax.model import Transformer

ROOT = pathlib.Path(__file__).resolve().parent.parent


def load_error(*args) -> str:
  with pytest.raises(ConfigError) as err:
    config_loading.load(*args)
  return str(err.value)


def write(path: pathlib.Path, content: str | bytes) -> pathlib.Path:
  (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
  return path


def run_command(*argv: str, cwd) -> subprocess.CompletedProcess:
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=cwd, env=env,
                        timeout=300)


def error_lines(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if line.startswith("error: ")]


# ----------------------------------------------------------------------------------------------
# Config files and overrides.


@pytest.mark.parametrize(
    "content, message",
    [
        ("- model\n- train\n", "must be a YAML mapping of config keys to values, got a list"),
        ("hello\n",
         "must be a YAML mapping of config keys to values, got the single value 'hello'"),
        ("7\n", "must be a YAML mapping of config keys to values, got the single value '7'"),
        ("model: [1\n", "is not valid YAML: expected ',' or ']', but got '<stream end>' at line 2, "
         "column 1"),
        ("model:\n  dim: 1\n dim: 2\n", "is not valid YAML: expected <block end>, but found "
         "'<block mapping start>' at line 3, column 2"),
        (b"seed: 1\n\xff\xfe\n", "is not UTF-8 text (byte 8: invalid start byte)"),
    ],
    ids=["list", "string", "number", "syntax", "indentation", "not utf-8"],
)
def test_a_config_file_that_is_not_a_yaml_mapping_is_named_with_what_is_wrong(
    content, message, tmp_path
):
  path = write(tmp_path / "bad.yaml", content)
  assert load_error(str(path)) == f"{path}: {message}"


def test_an_unset_environment_variable_names_the_field_that_uses_it(tmp_path, monkeypatch):
  monkeypatch.delenv("MEMJAX_NO_SUCH_VAR", raising=False)
  path = write(tmp_path / "env.yaml", "train:\n  run_dir: ${oc.env:MEMJAX_NO_SUCH_VAR}\n")
  expected = ("train.run_dir: cannot resolve an interpolation: Environment variable "
              "'MEMJAX_NO_SUCH_VAR' not found")
  assert load_error(str(path)) == expected
  message = load_error("tiny", ["seed=${oc.env:MEMJAX_NO_SUCH_VAR}"])
  assert message.startswith("seed: cannot resolve an interpolation")
  monkeypatch.setenv("MEMJAX_NO_SUCH_VAR", "runs/x")
  assert config_loading.load(str(path)).train.run_dir == "runs/x"


def test_an_override_that_is_not_yaml_is_named():
  assert load_error("tiny", ["model.dim=[1"]) == (
      "model.dim=[1: the value is not valid YAML: did not find expected ',' or ']' at line 2, "
      "column 1"
  )


@pytest.mark.parametrize("field", ["seed", "data.seed"])
def test_a_negative_seed_is_refused(field):
  assert load_error("tiny", [f"{field}=-1"]) == f"{field}: must be in [0, 2**63), got -1"


FINITE_FIELDS = [
    "optim.lr", "optim.value_lr", "optim.weight_decay", "optim.clip", "optim.lr_min_ratio",
    "optim.cycle_length", "optim.cosine_theta", "model.norm_eps", "model.rope_theta",
    "model.ffn_dim_multiplier", "model.init_base_std", "model.memory.input_dropout",
    "model.memory.query_dropout", "model.memory.value_dropout", "model.moe.balance_coef",
    "train.loss_spike_factor",
]


@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
@pytest.mark.parametrize("field", FINITE_FIELDS)
def test_a_float_that_must_be_finite_refuses_inf_and_nan(field, value):
  assert load_error("tiny", [f"{field}={value}"]) == (
      f"{field}: must be a finite number, got {float(value)}"
  )


def float_fields(cls: type, prefix: str = "") -> list[str]:
  out = []
  for name, tp in typing.get_type_hints(cls).items():
    if dataclasses.is_dataclass(tp):
      out += float_fields(tp, f"{prefix}{name}.")
    elif tp in (float, float | None):
      out.append(f"{prefix}{name}")
  return out


def test_every_float_field_is_checked_as_finite():
  # A new float field must join FINITE_FIELDS (and be checked in memjax.config), or be exempted
  # here with the reason.
  assert sorted(float_fields(Config)) == sorted(FINITE_FIELDS)


def test_a_data_source_weight_must_be_finite():
  message = load_error("tiny", ["data.source=lingua", "data.root_dir=/x", "data.sources.a=inf"])
  assert message == "data.sources.a: must be a finite weight > 0, got inf"


def test_config_errors_survive_a_worker_process():
  import pickle

  error = pickle.loads(pickle.dumps(ConfigError("data.tokenizer_path", "no model")))
  assert (error.field, str(error)) == ("data.tokenizer_path", "data.tokenizer_path: no model")


# ----------------------------------------------------------------------------------------------
# Random inputs: a Config or a ConfigError, nothing else.

KEYS = ["model", "train", "optim", "data", "mesh", "seed", "dim", "memory", "layers", "lr", "steps",
        "source", "sources", "name", "x", "1", ""]
scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats()
           | st.text(max_size=12))
keys = st.sampled_from(KEYS) | st.text(max_size=6) | st.integers(-3, 3)
documents = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=4),
    max_leaves=12,
)
dotted = st.lists(st.sampled_from(KEYS) | st.text(string.ascii_letters + "._[]${}:", max_size=6),
                  min_size=1, max_size=3).map(".".join)
override_values = (st.sampled_from(["inf", "nan", "-1", "[1", "${oc.env:MEMJAX_NOPE}", "{a: 1}",
                                    "'x'", "1e400", "[]", "null", "2:4"])
                   | st.text(max_size=10))
overrides = st.lists(st.tuples(dotted, override_values).map("=".join) | st.text(max_size=10),
                     max_size=3)


def assert_config_or_config_error(load) -> None:
  try:
    assert isinstance(load(), Config)
  except ConfigError:
    pass


@pytest.mark.filterwarnings("ignore::UserWarning")  # Lingua's notes on ignored keys
@hypothesis.settings(max_examples=60, deadline=None, derandomize=True)
@hypothesis.given(
    document=documents | st.text(max_size=40) | st.binary(max_size=40), override_list=overrides
)
def test_random_yaml_files_and_overrides_give_a_config_or_a_config_error(
    document, override_list, tmp_path_factory
):
  path = tmp_path_factory.mktemp("random") / "c.yaml"
  if isinstance(document, (str, bytes)):
    write(path, document)
  else:
    write(path, yaml.safe_dump(document))
  assert_config_or_config_error(lambda: config_loading.load(str(path), override_list))


@pytest.mark.filterwarnings("ignore::UserWarning")  # Lingua's notes on ignored keys
@hypothesis.settings(max_examples=60, deadline=None, derandomize=True)
@hypothesis.given(argv=st.lists(
    st.sampled_from(["config=tiny", "config=", "config=nope", "topology=v5e-8"])
    | st.tuples(dotted, override_values).map("=".join) | st.text(max_size=10), max_size=4,
))
def test_random_command_lines_give_a_config_or_a_config_error(argv):
  def load():
    path, _, rest = config_loading.split_command_line(argv, ("topology",))
    try:
      return config_loading.load(path, rest)
    except FileNotFoundError:  # a config name that is no file: the one line of memjax.cli
      return Config()

  assert_config_or_config_error(load)


CONFIG_FILES = [
    *sorted((ROOT / "tests" / "data" / "lingua").glob("*.yaml")), ROOT / "configs" / "tiny.yaml"
]


def dotted_keys(data: dict, prefix: str = "") -> list[str]:
  out = []
  for key, value in data.items():
    out.append(f"{prefix}{key}")
    if isinstance(value, dict):
      out += dotted_keys(value, f"{prefix}{key}.")
  return out


FILE_KEYS = sorted({k for f in CONFIG_FILES for k in dotted_keys(config_loading.load_dict(f))})


@pytest.mark.filterwarnings("ignore::UserWarning")  # Lingua's notes on ignored keys
@hypothesis.settings(max_examples=60, deadline=None, derandomize=True)
@hypothesis.given(
    path=st.sampled_from(CONFIG_FILES),
    override_list=st.lists(st.tuples(st.sampled_from(FILE_KEYS), override_values).map("=".join),
                           min_size=1, max_size=3),
)
def test_random_values_in_memjax_and_reference_files_give_a_config_or_a_config_error(
    path, override_list
):
  assert_config_or_config_error(lambda: config_loading.load(path, override_list))


@pytest.mark.parametrize("command", ["aot", "prepare"])
def test_every_command_names_a_bad_config_file_in_one_line(command, tmp_path, capsys):
  from memjax import aot
  from memjax.data import prepare

  path = write(tmp_path / "list.yaml", "- a\n")
  if command == "aot":
    status = aot.main([f"config={path}", "topology=v5e-8"])
  else:
    status = prepare.main([str(tmp_path), "--output", str(tmp_path / "out"), f"config={path}"])
  assert status == 2
  assert capsys.readouterr().err == (
      f"error: {path}: must be a YAML mapping of config keys to values, got a list\n"
  )


# ----------------------------------------------------------------------------------------------
# Tokenizer files.


@pytest.mark.parametrize("kind", ["sentencepiece", "tiktoken"])
def test_a_missing_or_garbage_tokenizer_file_names_data_tokenizer_path(kind, tmp_path):
  with pytest.raises(FileNotFoundError) as missing:
    tokenizers.make_tokenizer(kind, str(tmp_path / "nothing.model"))
  assert str(missing.value) == (
      f"data.tokenizer_path: no tokenizer model file at {tmp_path}/nothing.model"
  )
  junk = write(tmp_path / "junk.model", b"\x00\x01 not a model\n")
  with pytest.raises(ConfigError) as garbage:
    tokenizers.make_tokenizer(kind, str(junk))
  assert garbage.value.field == "data.tokenizer_path" and str(junk) in str(garbage.value)


def test_training_with_a_garbage_tokenizer_prints_one_error_line(tmp_path):
  junk = write(tmp_path / "junk.model", "not a model")
  result = run_command(str(ROOT / "train.py"), "data.tokenizer=sentencepiece",
                       f"data.tokenizer_path={junk}", f"train.run_dir={tmp_path / 'run'}",
                       cwd=tmp_path)
  assert result.returncode == 2, result.stderr
  (line,) = error_lines(result.stderr)
  assert line.startswith(f"error: data.tokenizer_path: {junk} is no SentencePiece model"), line
  assert "Traceback" not in result.stderr


def test_training_with_a_config_file_that_is_a_list_prints_one_error_line(tmp_path):
  path = write(tmp_path / "list.yaml", "- a\n")
  result = run_command(str(ROOT / "train.py"), f"config={path}", cwd=tmp_path)
  assert result.returncode == 2, result.stderr
  assert result.stderr.strip() == (
      f"error: {path}: must be a YAML mapping of config keys to values, got a list"
  )


# ----------------------------------------------------------------------------------------------
# memjax.generate: its paths and arguments.


def test_generate_without_a_run_directory_prints_one_error_line(tmp_path):
  result = run_command("-m", "memjax.generate", str(tmp_path / "missing"), "--prompt", "x",
                       cwd=ROOT)
  assert result.returncode == 2, result.stderr
  assert result.stderr.strip() == (
      f"error: {tmp_path}/missing: not a memjax run directory (no checkpoints/ inside) nor one of "
      "its checkpoints"
  )


def test_generate_names_a_folder_that_is_not_a_run_or_holds_no_checkpoint(tmp_path, capsys):
  (tmp_path / "folder").mkdir()
  assert generate.main([str(tmp_path / "folder"), "--prompt", "x"]) == 2
  assert capsys.readouterr().err.startswith(f"error: {tmp_path}/folder: not a memjax run directory")
  (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
  assert generate.main([str(tmp_path / "empty"), "--prompt", "x"]) == 2
  assert capsys.readouterr().err == f"error: {tmp_path}/empty: holds no checkpoint yet\n"


def test_generate_names_a_checkpoint_it_cannot_read(tmp_path, capsys):
  step = tmp_path / "run" / "checkpoints" / "1"
  (step / "config").mkdir(parents=True)
  write(step / "config" / "metadata", "garbage")
  write(step / "_CHECKPOINT_METADATA", "junk")
  assert generate.main([str(tmp_path / "run"), "--prompt", "x"]) == 2
  # The reason is memjax.checkpoint's (or, for an error it does not name, cli.reading's).
  (line,) = error_lines(capsys.readouterr().err)
  assert str(tmp_path / "run") in line and "read" in line, line


@pytest.fixture(scope="module")
def tiny_model():
  cfg = ModelConfig(dim=32, n_layers=1, n_heads=2, multiple_of=16, max_seqlen=32)
  return Transformer(cfg, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("temperature", [math.nan, math.inf, -1.0])
def test_generate_refuses_a_temperature_that_is_not_finite_and_non_negative(
    tiny_model, temperature
):
  with pytest.raises(ValueError, match=r"temperature must be a finite number >= 0 \(0 = greedy\)"):
    generate.generate(tiny_model, [[256]], max_new_tokens=2, temperature=temperature,
                      rng=jax.random.key(0))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--temperature", "nan"],
         "temperature must be a finite number >= 0 (0 = greedy), got nan"),
        (["--top-p", "nan"], "top_p must be in (0, 1], got nan"),
        (["--top-p", "0"], "top_p must be in (0, 1], got 0.0"),
        (["--max-new-tokens", "-1"], "max_new_tokens must be >= 0, got -1"),
    ],
)
def test_the_generate_command_refuses_bad_sampling_flags_in_one_line(
    flags, message, tiny_model, monkeypatch, capsys
):
  loaded = (None, tiny_model, tokenizers.ByteTokenizer())
  monkeypatch.setattr(checkpoint, "load_for_inference", lambda path: loaded)
  assert generate.main(["run", "--prompt", "x", *flags]) == 2
  captured = capsys.readouterr()
  assert (captured.out, captured.err) == ("", f"error: {message}\n")


# ----------------------------------------------------------------------------------------------
# Imported (reference) checkpoints.


@pytest.fixture
def consolidated(tmp_path):
  pytest.importorskip("torch")
  from memjax.interop import torch_checkpoint as tc

  cfg = Config(model=ModelConfig(dim=32, n_layers=1, n_heads=2, multiple_of=16, max_seqlen=128))
  tc.export_consolidated(Transformer(cfg.model, rngs=nnx.Rngs(0)), cfg, tmp_path / "ckpt")
  return tc, tmp_path / "ckpt"


def test_a_params_json_that_is_not_json_is_named(consolidated):
  tc, ckpt = consolidated
  write(ckpt / tc.PARAMS_NAME, "{not json")
  with pytest.raises(tc.CheckpointError) as err:
    tc.load_consolidated(ckpt)
  assert str(err.value) == (f"{ckpt}/params.json: not a JSON file (Expecting property name "
                            "enclosed in double quotes: line 1 column 2 (char 1))")
  write(ckpt / tc.PARAMS_NAME, "[1, 2]")
  with pytest.raises(tc.CheckpointError, match="expected a JSON object of settings, got"):
    tc.load_consolidated(ckpt)


def test_nan_weights_in_an_imported_checkpoint_are_refused_by_name(consolidated):
  import torch

  tc, ckpt = consolidated
  state = torch.load(ckpt / tc.CHECKPOINT_NAME, weights_only=True)
  state["model"]["layers.0.attention.wq.weight"][0, 3] = float("nan")
  torch.save(state, ckpt / tc.CHECKPOINT_NAME)
  with pytest.raises(tc.CheckpointError) as err:
    tc.load_consolidated(ckpt)
  assert str(err.value) == (
      "layers.0.attention.wq.weight: 1 non-finite value(s) (nan or inf) as float32"
  )


# ----------------------------------------------------------------------------------------------
# The handler itself.


def test_every_known_error_type_exists():
  import importlib

  for module, names in cli._KNOWN_ERRORS.items():
    for name in names:
      assert issubclass(getattr(importlib.import_module(module), name), Exception), (module, name)


def test_a_known_error_is_one_line_and_exit_2_and_anything_else_is_reported_as_a_bug(capsys):
  @cli.entry_point
  def refuses(error):
    raise error

  assert refuses(ConfigError("train.steps", "must be >= 1, got 0")) == 2
  assert capsys.readouterr().err == "error: train.steps: must be >= 1, got 0\n"
  assert refuses(FileNotFoundError(2, "No such file or directory", "/x/y.yaml")) == 2
  assert capsys.readouterr().err == "error: /x/y.yaml: No such file or directory\n"
  assert refuses(KeyError("oops")) == 1
  err = capsys.readouterr().err
  assert err.startswith("Traceback") and "KeyError: 'oops'" in err
  assert err.strip().splitlines()[-1].startswith("This is a bug in memjax (KeyError)")
  assert cli.entry_point(lambda: None)() == 0
