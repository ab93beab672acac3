"""Reference checkpoints: memjax -> consolidated.pth -> memjax round trips, the shared table's
aliases, errors naming the key, one memory layer from torch, and parity with the torch oracle's
reference-format state dicts (memjax.interop.torch_checkpoint)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memjax.config import Config, ConfigError, MemoryConfig, ModelConfig, from_dict
from memjax.interop import lingua
from memjax.interop import torch_checkpoint as tc
from memjax.model import Transformer

torch = pytest.importorskip("torch")
from memjax.interop.torch_reference import OracleMemory, OracleTransformer  # noqa: E402

VOCAB = 97
TABLE = "layers.1.feed_forward.values.weight"  # the shared table's owner: the first memory layer


def make_config(dim: int = 64, **memory) -> Config:
  """Six blocks, memory in 1, 3, 5; grouped-query attention; as the reference can express it."""
  mem = dict(layers=(1, 3, 5), n_keys=16, heads=2, knn=4, k_dim=16, value_dtype="bfloat16")
  model = ModelConfig(
      dim=dim, n_layers=6, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, max_seqlen=128,
      memory=MemoryConfig(**(mem | memory)),
  )
  return Config(model=model, seed=3)


def make_model(cfg: Config) -> Transformer:
  """`cfg`'s model with every parameter drawn by numpy: faster on CPU than compiling the inits,
  and biases and norm weights are random too (memjax starts them at 0 and 1), so a mix-up shows."""
  model = nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(cfg.seed)))
  rng = np.random.default_rng(cfg.seed)
  for path, var in nnx.to_flat_state(nnx.state(model)):
    if isinstance(var, nnx.RngKey):
      value = jax.random.key(0)
    elif isinstance(var, nnx.RngCount):
      value = np.zeros(var.shape)
    elif path[-1] in ("kernel", "keys"):  # keep activations O(1)
      value = rng.standard_normal(var.shape) * var.shape[-2 if path[-1] == "kernel" else -1] ** -0.5
    elif path[-1] == "weight":  # RMSNorm
      value = 1 + 0.1 * rng.standard_normal(var.shape)
    else:  # biases, embeddings and value tables
      value = rng.standard_normal(var.shape) * (0.1 if path[-1] == "bias" else 1.0)
    var.set_value(jnp.asarray(value, var.dtype))
  return model


# Compiled once per model structure: quicker on CPU than running the forward op by op.
forward = nnx.jit(lambda model, tokens_BT: model(tokens_BT))


def assert_close_to_scale(actual, expected, tol: float, what: str) -> None:
  """max|actual - expected| <= tol * max|expected|."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
  err, scale = np.abs(actual - expected).max(), np.abs(expected).max()
  assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:g} * scale {scale:.3g}"


def tokens(seed: int = 0) -> jax.Array:
  return jax.random.randint(jax.random.key(seed), (2, 16), 0, VOCAB)


def flat_params(model) -> dict:
  return {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def assert_same_params(a, b) -> None:
  pa, pb = flat_params(a), flat_params(b)
  assert pa.keys() == pb.keys()
  for path in pa:
    assert pa[path].dtype == pb[path].dtype, path
    np.testing.assert_array_equal(
        np.asarray(pa[path], np.float32), np.asarray(pb[path], np.float32), err_msg=str(path)
    )


def state_dict(out_dir) -> dict:
  return torch.load(out_dir / tc.CHECKPOINT_NAME, weights_only=True)["model"]


def save_state_dict(out_dir, sd: dict) -> None:
  torch.save({"model": sd}, out_dir / tc.CHECKPOINT_NAME)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """(config, model, folder) of make_config()'s model, exported once for the tests below."""
  cfg = make_config()
  model = make_model(cfg)
  out = tmp_path_factory.mktemp("exported")
  tc.export_consolidated(model, cfg, out)
  return cfg, model, out


def edited_copy(exported, out_dir, edit=None) -> dict:
  """Copies the exported checkpoint to `out_dir`, its state dict changed by `edit(sd)`."""
  _, _, src = exported
  (out_dir / tc.PARAMS_NAME).write_text((src / tc.PARAMS_NAME).read_text())
  sd = state_dict(src)
  if edit is not None:
    edit(sd)
  save_state_dict(out_dir, sd)
  return sd


VARIANTS = {
    "memory_plus_shared": dict(),
    "own_tables_gated": dict(share_values=False, gated=True),
    "memory_vdim": dict(swilu=False, v_dim=32),  # plain Memory projecting V=32 back to D
    "memory_plain": dict(swilu=False),  # the bag is the output: no projections at all
    "dense": dict(layers=()),
}


@pytest.mark.parametrize("memory", VARIANTS.values(), ids=VARIANTS.keys())
def test_export_then_load_is_identical(tmp_path, memory):
  cfg = make_config(**memory)
  model = make_model(cfg)
  tc.export_consolidated(model, cfg, tmp_path / "ckpt")
  cfg2, model2 = tc.load_consolidated(tmp_path / "ckpt")
  if cfg.model.memory.enabled:  # (a dense model's memory fields are not written)
    assert (cfg2.model, cfg2.seed) == (cfg.model, cfg.seed)
  assert cfg2.optim == cfg.optim  # params.json carries the optimizer's rates
  assert_same_params(model, model2)
  np.testing.assert_array_equal(forward(model, tokens()), forward(model2, tokens()))


def test_state_dict_has_the_reference_names_and_layouts(exported):
  sd = state_dict(exported[2])
  assert sd["tok_embeddings.weight"].shape == (VOCAB, 64)
  assert sd["output.weight"].shape == (VOCAB, 64)
  assert sd["layers.0.attention.wk.weight"].shape == (2 * 16, 64)  # (n_kv_heads * head_dim, D)
  assert sd["layers.0.feed_forward.w1.weight"].shape == (256, 64)
  assert sd["layers.1.feed_forward.keys"].shape == (2 * 2 * 16, 8)  # (2 H n, k_dim / 2)
  assert sd["layers.1.feed_forward.query_proj.query_mlps.0.weight"].shape == (2 * 16, 64)
  assert sd[TABLE].shape == (16**2, 64) and sd[TABLE].dtype == torch.bfloat16
  assert "layers.3.feed_forward.values.weight" not in sd  # stored once
  assert all(v.dtype == torch.float32 for k, v in sd.items() if k != TABLE)


def test_params_json_is_a_lingua_model_section(exported):
  params = json.loads((exported[2] / tc.PARAMS_NAME).read_text())
  assert set(params["model"]) == set(lingua.MODEL_DEFAULTS)
  assert set(params["model"]["productkey_args"]) == set(lingua.PRODUCTKEY_DEFAULTS)
  assert params["model"]["productkey_args"]["layers"] == "1,3,5"
  assert params["distributed"]["model_dtype"] == "fp32"
  assert set(params["data"]["tokenizer"]) == {"name", "path"}


def test_float32_table_loads_as_float32_with_an_override(tmp_path):
  cfg = make_config(value_dtype="float32")
  model = make_model(cfg)
  tc.export_consolidated(model, cfg, tmp_path)
  default_cfg, rounded = tc.load_consolidated(tmp_path)  # Lingua's format: a bfloat16 table
  assert default_cfg.model.memory.value_dtype == "bfloat16"
  assert rounded.layers[1].feed_forward.values.dtype == jnp.bfloat16
  cfg2, model2 = tc.load_consolidated(tmp_path, ["model.memory.value_dtype=float32"])
  assert cfg2.model == cfg.model
  assert_same_params(model, model2)


def test_loads_a_pth_path_and_a_bare_state_dict(exported, tmp_path):
  sd = edited_copy(exported, tmp_path)
  torch.save(sd, tmp_path / tc.CHECKPOINT_NAME)  # no {"model": ...} wrapper
  _, model2 = tc.load_consolidated(tmp_path / tc.CHECKPOINT_NAME)
  assert_same_params(exported[1], model2)


def add_aliases(sd: dict) -> None:
  for i in (3, 5):
    sd[f"layers.{i}.feed_forward.values.weight"] = sd[TABLE].clone()


def test_table_aliased_under_every_memory_layer_loads(exported, tmp_path):
  edited_copy(exported, tmp_path, add_aliases)
  _, model2 = tc.load_consolidated(tmp_path)
  assert_same_params(exported[1], model2)
  assert model2.layers[5].feed_forward.values is model2.layers[1].feed_forward.values


def test_differing_aliases_raise(exported, tmp_path):
  def edit(sd):
    add_aliases(sd)
    sd["layers.5.feed_forward.values.weight"][7, 3] += 1

  edited_copy(exported, tmp_path, edit)
  with pytest.raises(tc.CheckpointError, match=r"layers\.5\.feed_forward\.values\.weight: differs"):
    tc.load_consolidated(tmp_path)


@pytest.mark.parametrize(
    "key,shape,expected",
    [
        ("layers.2.attention.wq.weight", (64, 63), "(64, 64)"),
        ("layers.3.feed_forward.keys", (2, 2, 16, 8), "(64, 8)"),
        (TABLE, (16**2, 32), "(256, 64)"),
        ("output.weight", (64, VOCAB), f"({VOCAB}, 64)"),  # not transposed in torch
    ],
)
def test_wrong_shape_names_the_key(exported, tmp_path, key, shape, expected):
  def edit(sd):
    sd[key] = torch.zeros(shape, dtype=sd[key].dtype)

  edited_copy(exported, tmp_path, edit)
  with pytest.raises(tc.CheckpointError) as err:
    tc.load_consolidated(tmp_path)
  assert str(err.value).startswith(key) and f"expected shape {expected}" in str(err.value)


def test_missing_and_unexpected_keys_raise(exported, tmp_path):
  sd = edited_copy(exported, tmp_path, lambda sd: sd.pop("layers.3.feed_forward.value_proj.bias"))
  with pytest.raises(tc.CheckpointError, match=r"value_proj\.bias: missing .*\(64,\)"):
    tc.load_consolidated(tmp_path)
  sd["layers.3.feed_forward.value_proj.bias"] = torch.zeros(64)
  save_state_dict(tmp_path, {**sd, "layers.3.feed_forward.gating.weight": torch.zeros(1, 64)})
  with pytest.raises(tc.CheckpointError, match=r"gating\.weight: unexpected"):
    tc.load_consolidated(tmp_path)


def test_unsupported_params_json_names_the_key(exported, tmp_path):
  edited_copy(exported, tmp_path)
  params = json.loads((tmp_path / tc.PARAMS_NAME).read_text())
  params["model"]["productkey_args"]["peer_variant"] = True
  (tmp_path / tc.PARAMS_NAME).write_text(json.dumps(params))
  with pytest.raises(ConfigError) as err:
    tc.load_consolidated(tmp_path)
  assert err.value.field == "model.productkey_args.peer_variant"
  assert tc.PARAMS_NAME in str(err.value) and "model.peer" in str(err.value)


def test_the_reference_peer_variant_is_refused_with_what_differs():
  params = lingua.from_memjax(make_config())
  params["model"]["productkey_args"]["peer_variant"] = True
  with pytest.raises(ConfigError) as err:
    lingua.to_memjax(params, training=False)
  assert err.value.field == "model.productkey_args.peer_variant"
  # Its tables are shared (mem_share_values) and trained as value parameters; memjax's PEER
  # baseline keeps one pair per layer in the dense group, so it is named, not mapped onto.
  for words in ("values_u/values_v", "mem_share_values", "value_fixed_lr", "model.peer"):
    assert words in str(err.value)


def test_params_json_carries_the_optimizer():
  cfg = make_config()
  cfg = dataclasses.replace(cfg, optim=dataclasses.replace(
      cfg.optim, lr=2e-4, value_lr=5e-3, scheduler="cosine", warmup=7, lr_min_ratio=0.2,
      weight_decay=0.05, clip=0.5))
  params = lingua.from_memjax(cfg)
  assert params["optim"]["lr"] == 2e-4 and params["model"]["productkey_args"]["value_fixed_lr"] == 5e-3
  back = from_dict(Config, lingua.to_memjax(params, training=False))
  assert back.optim == cfg.optim


def test_missing_files_raise(tmp_path):
  with pytest.raises(FileNotFoundError, match="consolidated.pth"):
    tc.load_consolidated(tmp_path)


def test_export_refuses_to_overwrite(exported, tmp_path):
  cfg, model, _ = exported
  tc.export_consolidated(model, cfg, tmp_path / "ckpt")
  with pytest.raises(FileExistsError, match="overwrite=True"):
    tc.export_consolidated(model, cfg, tmp_path / "ckpt")
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "notes.txt").write_text("keep me")
  with pytest.raises(FileExistsError):
    tc.export_consolidated(model, cfg, tmp_path / "other")
  tc.export_consolidated(model, cfg, tmp_path / "ckpt", overwrite=True)
  tc.export_consolidated(model, cfg, tmp_path / "empty")  # a new folder is made
  with pytest.raises(ValueError, match="model.cfg"):
    tc.export_consolidated(model, make_config(dim=32), tmp_path / "wrong")


def test_export_refuses_what_the_reference_cannot_express(tmp_path):
  cfg = make_config(qk_norm=True)
  with pytest.raises(ConfigError) as err:
    tc.export_consolidated(make_model(cfg), cfg, tmp_path)
  assert err.value.field == "model.memory.qk_norm"
  assert not any(tmp_path.iterdir())  # nothing written


def layer_kwargs(cfg: ModelConfig, **extra) -> dict:
  """HashingMemory's constructor arguments for `cfg`'s memory."""
  mem = cfg.memory
  return dict(
      input_dim=cfg.dim, output_dim=cfg.dim, mem_n_keys=mem.n_keys, mem_heads=mem.heads,
      mem_knn=mem.knn, mem_k_dim=mem.k_dim, mem_v_dim=mem.v_dim, swilu_projection=mem.swilu,
      mem_gated=mem.gated,
  ) | extra


@pytest.mark.parametrize("memory", [dict(), dict(gated=True, v_dim=32)], ids=["plus", "gated_vdim"])
def test_memory_layer_from_torch_equals_the_layer(tmp_path, memory):
  cfg = make_config(value_dtype="float32", **memory)
  model = make_model(cfg)
  tc.export_consolidated(model, cfg, tmp_path)
  prefix = "layers.1.feed_forward."
  sd = {k[len(prefix):]: v for k, v in state_dict(tmp_path).items() if k.startswith(prefix)}
  layer_cfg, layer = tc.memory_layer_from_torch(sd, **layer_kwargs(cfg.model))
  assert layer_cfg.memory.layers == (0,) and layer_cfg.memory.v_dim == cfg.model.memory.v_dim
  assert_same_params(model.layers[1].feed_forward, layer)
  x = jax.random.normal(jax.random.key(1), (2, 5, 64))
  np.testing.assert_array_equal(model.layers[1].feed_forward(x), layer(x))


def test_memory_layer_from_torch_checks_its_arguments():
  with pytest.raises(ConfigError, match="output_dim: must equal input_dim=64"):
    tc.memory_layer_from_torch({}, input_dim=64, output_dim=32)
  with pytest.raises(ConfigError) as err:
    tc.memory_layer_from_torch({}, input_dim=64, output_dim=64, mem_n_keys=16, mem_knn=32)
  assert err.value.field == "mem_knn" and "n_keys=16" in str(err.value)
  with pytest.raises(ConfigError, match="PEER"):
    tc.memory_layer_from_torch({}, input_dim=64, output_dim=64, peer_variant=True)


# ----------------------------------------------------------------------------------------------
# Parity with the torch oracle: its state dicts carry the reference's names, and a shared table
# appears under every memory layer (the aliases the reference's state dict probably holds).


def randomize_keys(oracle, k_dim: int) -> None:
  """The oracle starts its keys at zero (all scores tie): draw them as the reference does."""
  for module in oracle.modules():
    if isinstance(module, OracleMemory):
      torch.nn.init.uniform_(module.keys, -(k_dim**-0.5), k_dim**-0.5)


def test_oracle_checkpoint_gives_the_oracle_logits(tmp_path):
  cfg = make_config(value_dtype="float32")
  torch.manual_seed(0)
  oracle = OracleTransformer(cfg.model)
  randomize_keys(oracle, cfg.model.memory.k_dim)
  sd = oracle.state_dict()
  assert all(f"layers.{i}.feed_forward.values.weight" in sd for i in (1, 3, 5))  # aliases
  save_state_dict(tmp_path, sd)
  (tmp_path / tc.PARAMS_NAME).write_text(json.dumps(lingua.from_memjax(cfg)))
  _, model = tc.load_consolidated(tmp_path, ["model.memory.value_dtype=float32"])
  tok = tokens(2)
  with torch.no_grad():
    expected = oracle(torch.from_numpy(np.array(tok)).long()).numpy()
  assert_close_to_scale(forward(model, tok), expected, 1e-4, "logits")


def test_oracle_memory_layer_gives_the_oracle_output():
  cfg = make_config(value_dtype="float32", gated=True).model
  torch.manual_seed(1)
  oracle = OracleMemory(cfg)
  randomize_keys(oracle, cfg.memory.k_dim)
  _, layer = tc.memory_layer_from_torch(oracle.state_dict(), **layer_kwargs(cfg))
  x = np.random.default_rng(0).standard_normal((2, 7, 64)).astype(np.float32)
  with torch.no_grad():
    expected = oracle(torch.from_numpy(x)).numpy()
  assert_close_to_scale(layer(jnp.asarray(x)), expected, 1e-5, "memory layer")
