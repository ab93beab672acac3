"""Configs: every file in configs/ loads, overrides, validation errors that name the field, and
reference (Lingua) YAML files loading unchanged through the mapping in memjax.interop.lingua
(the schema in memjax.config, the loading in memjax.config_loading)."""

import dataclasses
import pathlib
import subprocess
import sys
import warnings

import pytest

from memjax import config, config_loading
from memjax.config import Config, ConfigError, MemoryConfig
from memjax.interop import lingua

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
# Copies of the reference's apps/main/configs/*.yaml (keys and values; comments stripped).
LINGUA = pathlib.Path(__file__).resolve().parent / "data" / "lingua"


def lingua_path(name: str) -> pathlib.Path:
  return LINGUA / f"{name}.yaml"


# ----------------------------------------------------------------------------------------------
# memjax's own configs.


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_loads(path):
  cfg = config_loading.load(path)
  assert isinstance(cfg, Config)
  assert config_loading.load(path.stem) == cfg  # by name, from configs/


def test_the_expected_configs_exist():
  names = {p.stem for p in CONFIGS}
  expected = {"tiny", "pkplus_373m_1024k", "dense_373m", "pk_7b"} | {
      f"ladder_{size}_{kind}"
      for size in ("134m", "373m", "720m", "1p3b")
      for kind in ("dense", "memory")
  }
  assert expected <= names


def test_tiny_is_a_small_memory_plus_model():
  cfg = config_loading.load("tiny")
  m = cfg.model
  assert (m.dim, m.n_layers, m.vocab_size) == (128, 4, 258)
  assert m.memory.enabled and m.memory.swilu and m.memory.layers == (1, 3)
  assert m.memory.n_slots == 64**2
  assert (cfg.optim.value_lr, cfg.optim.warmup) == (0.01, 50)


def test_the_schema_imports_neither_yaml_nor_the_interop_code():
  code = (
      "import sys, memjax.config; "
      "print(sorted(m for m in sys.modules if m.startswith(('memjax.interop', 'yaml', 'omegaconf'))))"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]"


def test_the_optimizer_settings_live_in_optim():
  cfg = config_loading.load("tiny", ["optim.lr=1e-3", "optim.state_dtype=bfloat16",
                                     "optim.table_update=sparse", "optim.scheduler=cosine"])
  assert (cfg.optim.lr, cfg.optim.state_dtype) == (1e-3, "bfloat16")
  assert (cfg.optim.table_update, cfg.optim.scheduler) == ("sparse", "cosine")
  assert config.OptimConfig() == config.Config().optim


@pytest.mark.parametrize("size", ["134m", "373m", "720m", "1p3b"])
def test_ladder_pairs_differ_only_in_memory(size):
  dense = config_loading.load(f"ladder_{size}_dense").model
  memory = config_loading.load(f"ladder_{size}_memory").model
  assert not dense.memory.enabled and memory.memory.enabled
  assert memory.memory.n_keys == 1024 and memory.memory.swilu and memory.memory.share_values
  assert memory.memory.value_dtype == "bfloat16"
  assert dense == dataclasses.replace(memory, memory=MemoryConfig())


def test_overrides():
  cfg = config_loading.load("tiny", ["model.dim=256", "model.memory.knn=8", "model.memory.layers=[0,2]",
                             "seed=5", "model.dtype=bfloat16"])
  assert cfg.model.dim == 256 and cfg.model.memory.knn == 8 and cfg.model.memory.layers == (0, 2)
  assert cfg.seed == 5 and cfg.model.dtype == "bfloat16"
  assert cfg.model.n_layers == 4  # untouched


def test_override_without_equals_sign():
  with pytest.raises(ConfigError, match="key=value"):
    config_loading.load("tiny", ["model.dim"])


def test_missing_file_names_the_known_configs():
  with pytest.raises(FileNotFoundError, match="tiny"):
    config_loading.load("no_such_config")


BAD = {
    # overrides on tiny -> (field named, words in the message)
    "odd_k_dim": (["model.memory.k_dim=129"], "model.memory.k_dim", "even"),
    "knn_above_n_keys": (["model.memory.knn=65"], "model.memory.knn", "[1, n_keys=64]"),
    "layer_out_of_range": (["model.memory.layers=[1,4]"], "model.memory.layers", "n_layers=4"),
    "v_dim_zero": (["model.memory.v_dim=0"], "model.memory.v_dim", "positive int or -1"),
    "v_dim_minus_two": (["model.memory.v_dim=-2"], "model.memory.v_dim", "positive int or -1"),
    "unknown_model_key": (["model.dimm=3"], "model.dimm", "unknown key"),
    "unknown_memory_key": (["model.memory.slots=3"], "model.memory.slots", "n_keys"),
    "int_as_text": (["model.dim=wide"], "model.dim", "must be an int"),
    "bool_as_text": (["model.memory.swilu=maybe"], "model.memory.swilu", "true or false"),
    "float_as_text": (["model.norm_eps=small"], "model.norm_eps", "must be a number"),
    "bad_dtype": (["model.dtype=fp32"], "model.dtype", "'float32', 'bfloat16'"),
    "bad_value_dtype": (
        ["model.memory.value_dtype=bf16"], "model.memory.value_dtype", "'bfloat16'"
    ),
    "bad_impl": (["model.memory.impl=cuda"], "model.memory.impl", "'triton'"),
    "heads_not_dividing_dim": (["model.n_heads=3"], "model.n_heads", "divide dim=128"),
    "negative_value_lr": (["optim.value_lr=-1"], "optim.value_lr", "must be >= 0"),
    "zero_lr": (["optim.lr=0"], "optim.lr", "must be > 0"),
    "min_ratio_above_one": (["optim.lr_min_ratio=2"], "optim.lr_min_ratio", "[0, 1]"),
    "zero_clip": (["optim.clip=0"], "optim.clip", "must be > 0"),
    "bad_scheduler": (["optim.scheduler=wsd"], "optim.scheduler", "'linear', 'cosine'"),
    "bad_state_dtype": (["optim.state_dtype=fp8"], "optim.state_dtype", "'bfloat16'"),
    "sparse_without_memory": (["optim.table_update=sparse", "model.memory.layers=[]"],
                              "optim.table_update", "no memory layers"),
    "old_train_lr": (["train.lr=1e-3"], "train.lr", "unknown key"),
    "old_memory_value_lr": (["model.memory.value_lr=0.01"], "model.memory.value_lr", "unknown key"),
}


@pytest.mark.parametrize("overrides,field,words", BAD.values(), ids=BAD.keys())
def test_bad_config_names_the_field(overrides, field, words):
  with pytest.raises(ConfigError) as err:
    config_loading.load("tiny", overrides)
  assert err.value.field == field
  assert words in str(err.value)


@pytest.mark.parametrize(
    "text,field,words",
    [
        ("model:\n  memory:\n    layers: [0]\nmodle: {}\n", "modle", "unknown key"),
        ("model:\n  memory:\n    layers: 3\n", "model.memory.layers", "must be a list"),
        ("model:\n  memory:\n    layers: [0, x]\n", "model.memory.layers[1]", "must be an int"),
        ("model: 3\n", "model", "must be a mapping"),
    ],
)
def test_bad_file_names_the_field(tmp_path, text, field, words):
  path = tmp_path / "c.yaml"
  path.write_text(text)
  with pytest.raises(ConfigError) as err:
    config_loading.load(path)
  assert err.value.field == field and words in str(err.value)


# ----------------------------------------------------------------------------------------------
# Reference (Lingua) configs.

LINGUA_FILES = ["pkplus_373m_1024k", "dense_373m", "pk_7b", "llama_1B", "llama_7B", "debug"]


def lingua_model(name: str, overrides=()) -> Config:
  """A reference file's config as a trained model's (`training=False`): nothing about how it is
  trained is checked or warned about."""
  raw = config_loading.load_dict(lingua_path(name), overrides)
  return config.from_dict(Config, lingua.to_memjax(raw, training=False))


def lingua_trainable(name: str, overrides=()) -> Config:
  """A reference file without its data layout (so that it trains on the synthetic corpus) and
  its eval harness, loaded as `config_loading.load` loads a file."""
  raw = config_loading.load_dict(lingua_path(name))
  for key in ("root_dir", "sources"):
    raw["data"].pop(key, None)
  raw.pop("eval", None)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the ignored logging keys and the synthetic corpus
    data = lingua.to_memjax(config_loading.merge_overrides(raw, overrides))
  return config.from_dict(Config, data)


@pytest.mark.parametrize("name", LINGUA_FILES)
def test_lingua_files_map_as_trained_models(name):
  assert lingua.is_lingua(config_loading.load_dict(lingua_path(name)))
  cfg = lingua_model(name)
  assert cfg.seed == 42  # model.seed, Lingua's default; the top-level 777 seeds nothing we train
  assert cfg.model.dtype == "bfloat16" and cfg.model.param_dtype == "float32"


@pytest.mark.parametrize("name", LINGUA_FILES)
def test_lingua_files_train_on_their_own_data_layout(name):
  # Never the synthetic corpus in its place: the same folders, mixed by the same weights.
  raw = config_loading.load_dict(lingua_path(name))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the ignored logging keys and the eval harness
    cfg = config.from_dict(Config, lingua.to_memjax(raw))
  assert cfg.data.source == "lingua" and cfg.data.root_dir == raw["data"]["root_dir"]
  assert cfg.data.sources == {k: float(v) for k, v in raw["data"]["sources"].items()}
  assert cfg.data.add_bos and cfg.data.add_eos


def test_lingua_data_sources_without_a_root_name_the_missing_root():
  with pytest.raises(ConfigError) as err:
    lingua.to_memjax({"model": {"dim": 64, "n_heads": 4}, "data": {"sources": {"dclm": 1.0}}})
  assert err.value.field == "data.root_dir" and "needs both" in str(err.value)


def test_lingua_eval_harness_is_named_in_a_warning_that_points_to_memjax_eval():
  with pytest.warns(UserWarning, match=r"eval\.harness: .*train\.eval_every.*memjax\.eval"):
    lingua.to_memjax({"model": {"dim": 64, "n_heads": 4}, "eval": {"harness": {"tasks": ["piqa"]}},
                      "data": {"root_dir": "data/shuffled", "sources": {"dclm": 1.0}}})


def test_lingua_file_without_data_trains_on_the_synthetic_corpus_and_says_so():
  with pytest.warns(UserWarning, match="synthetic knowledge corpus"):
    data = lingua.to_memjax({"model": {"dim": 64, "n_heads": 4}, "steps": 9})
  assert config.from_dict(Config, data).data.source == "knowledge"


def test_lingua_pkplus_373m_maps():
  cfg = lingua_model("pkplus_373m_1024k")
  m = cfg.model
  assert (m.dim, m.n_layers, m.n_heads, m.vocab_size) == (1024, 24, 16, 32000)
  assert (m.rope_theta, m.max_seqlen, m.ffn_hidden_dim) == (500000.0, 4096, 2816)
  mem = m.memory
  assert mem.layers == (4, 12, 20) and mem.share_values and mem.swilu and not mem.gated
  assert (mem.n_keys, mem.heads, mem.knn, mem.k_dim, mem.v_dim) == (1024, 4, 32, 512, -1)
  assert cfg.optim.value_lr == 1e-3 and mem.value_dtype == "bfloat16"
  assert mem.query_bias and not mem.qk_norm
  assert cfg.mesh.memory == 8  # distributed.memory_parallel_size


def test_lingua_dense_373m_has_no_memory():
  # The file also holds `path: !!CHANGETHIS!!`, a tag YAML does not know: read as a placeholder.
  tokenizer = config_loading.load_dict(lingua_path("dense_373m"))["data"]["tokenizer"]
  assert tokenizer["path"] == "!!CHANGETHIS!!"
  m = lingua_model("dense_373m").model
  assert not m.memory.enabled and (m.dim, m.n_layers) == (1024, 24)


def test_lingua_pk_7b_maps():
  m = lingua_model("pk_7b").model
  assert (m.dim, m.n_layers, m.n_heads, m.rope_theta) == (4096, 32, 32, 100000.0)
  assert m.ffn_hidden_dim == 11008 and m.memory.layers == (4, 12, 20)


@pytest.mark.parametrize(
    "name,vocab,seqlen",
    [("llama_1B", 128256, 4096), ("llama_7B", 128256, 4096), ("debug", 258, 2048)],
)
def test_lingua_dense_files_take_the_tokenizer_vocabulary(name, vocab, seqlen):
  m = lingua_model(name).model
  assert (m.vocab_size, m.max_seqlen, m.memory.enabled) == (vocab, seqlen, False)


@pytest.mark.parametrize("name", ["pkplus_373m_1024k", "dense_373m", "pk_7b"])
def test_our_reference_configs_match_the_lingua_files(name):
  assert config_loading.load(name).model == lingua_model(name).model


def test_lingua_overrides_use_lingua_names():
  cfg = lingua_trainable(
      "pkplus_373m_1024k",
      ["model.productkey_args.mem_knn=16", "model.vocab_size=1000", "distributed.model_dtype=fp32"],
  )
  assert cfg.model.memory.knn == 16 and cfg.model.vocab_size == 1000
  assert cfg.model.dtype == "float32"


def test_lingua_head_dim_without_n_heads():
  cfg = lingua_trainable("debug", ["model.n_heads=null", "model.head_dim=128"])
  assert (cfg.model.n_heads, cfg.model.resolved_head_dim) == (8, 128)


BAD_LINGUA = {
    "unknown_top_level": (["wandb=1"], "wandb", "unknown key"),
    "unknown_model_key": (["model.attn_impl=sdpa"], "model.attn_impl", "LMTransformerArgs"),
    "unknown_data_key": (["data.shuffle=true"], "data.shuffle", "DataArgs"),
    "unknown_distributed_key": (["distributed.pp_size=2"], "distributed.pp_size",
                                "DistributedArgs"),
    "unknown_checkpoint_key": (["checkpoint.dump.every_s=60"], "checkpoint.dump.every_s",
                               "SaveEvery"),
    "unknown_productkey_key": (
        ["model.productkey_args.mem_slots=3"], "model.productkey_args.mem_slots", "ProductKeyArgs"
    ),
    "weight_tying": (["model.weight_tying=true"], "model.weight_tying", "must be false"),
    "sliding_window": (["model.sliding_window=512"], "model.sliding_window", "must be null"),
    "peer": (["model.productkey_args.peer_variant=true"], "model.productkey_args.peer_variant",
             "PEER"),
    "negative_value_lr": (["model.productkey_args.value_fixed_lr=-1"],
                          "model.productkey_args.value_fixed_lr", "must be >= 0"),
    "cosine_cycle_length": (["optim.scheduler=cosine", "optim.cycle_length=0"],
                            "optim.cycle_length", "> 0"),
    "inv_sqrt": (["optim.scheduler=inv_sqrt"], "optim.scheduler", "no inv_sqrt"),
    "knn_above_n_keys": (["model.productkey_args.mem_knn=2000"], "model.productkey_args.mem_knn",
                         "n_keys=1024"),
    "odd_k_dim": (["model.productkey_args.mem_k_dim=511"], "model.productkey_args.mem_k_dim",
                  "even"),
    "layer_out_of_range": (['model.productkey_args.layers="4,12,24"'],
                           "model.productkey_args.layers", "n_layers=24"),
    "layers_not_indices": (['model.productkey_args.layers="4;12"'], "model.productkey_args.layers",
                           '"4,12,20"'),
    "bad_model_dtype": (["distributed.model_dtype=fp8"], "distributed.model_dtype", "bf16"),
    "unknown_tokenizer": (["model.vocab_size=-1", "data.tokenizer.name=gpt2"], "model.vocab_size",
                          "set model.vocab_size"),
    "no_heads": (["model.n_heads=null"], "model.n_heads", "head_dim"),
    "bad_seq_len": (["data.seq_len=0"], "data.seq_len", ">= 1"),
    "bad_seed": (["model.seed=abc"], "model.seed", "must be an int"),
    "memory_parallel_not_dividing": (["distributed.memory_parallel_size=3"],
                                     "distributed.memory_parallel_size", "value dim 1024"),
    "tensor_parallel": (["distributed.tp_size=2"], "distributed.tp_size", "tensor parallelism"),
    "float8": (["distributed.float8_recipe=rowwise"], "distributed.float8_recipe", "float8"),
    "fsdp_type": (["distributed.fsdp_type=hybrid"], "distributed.fsdp_type", "full_shard"),
    "init_ckpt_path": (["checkpoint.init_ckpt_path=/ckpt/consolidated.pth"],
                       "checkpoint.init_ckpt_path", "load_consolidated"),
    "checkpoint_path": (["checkpoint.path=/ckpt"], "checkpoint.path", "train.run_dir"),
    "continue_from_init": (["checkpoint.continue_training_from_init=true"],
                           "checkpoint.continue_training_from_init", "must be false"),
    "one_view": (["data.n_views=1"], "data.n_views", "seq_len + 1"),
    "root_dir_alone": (["data.root_dir=/data/shuffled"], "data.sources", "needs both"),
}


@pytest.mark.parametrize("overrides,field,words", BAD_LINGUA.values(), ids=BAD_LINGUA.keys())
def test_bad_lingua_config_names_the_lingua_key(overrides, field, words):
  with pytest.raises(ConfigError) as err:
    lingua_trainable("pkplus_373m_1024k", overrides)
  assert err.value.field == field
  assert words in str(err.value)


def test_is_lingua():
  assert not lingua.is_lingua(config_loading.load_dict("tiny"))
  assert not lingua.is_lingua({"model": {"dim": 8, "memory": {}}, "steps": 3})
  assert lingua.is_lingua({"model": {"dim": 8}, "steps": 3})
  assert lingua.is_lingua({"model": {"productkey_args": {}}})
  assert not lingua.is_lingua({"seed": 3})  # a key both formats have


@pytest.mark.parametrize("name", ["pkplus_373m_1024k", "dense_373m", "pk_7b", "tiny"])
def test_from_memjax_maps_back(name):
  cfg = config_loading.load(name, ["model.memory.value_dtype=bfloat16"])
  back = config.from_dict(Config, lingua.to_memjax(lingua.from_memjax(cfg), training=False))
  assert back.seed == cfg.seed and back.optim == cfg.optim
  if cfg.model.memory.enabled:
    assert back.model == cfg.model
  else:  # a dense model's memory fields are not written
    assert back.model.memory.layers == () and back.model.dim == cfg.model.dim


def test_from_memjax_refuses_what_the_reference_cannot_express():
  cfg = config_loading.load("tiny", ["model.memory.qk_norm=true"])
  with pytest.raises(ConfigError) as err:
    lingua.from_memjax(cfg)
  assert err.value.field == "model.memory.qk_norm"


def test_lingua_training_keys_map():
  cfg = lingua_trainable("pkplus_373m_1024k", ["dump_dir=/runs/pk", "data.seed=5"])
  raw = config_loading.load_dict(lingua_path("pkplus_373m_1024k"))
  assert cfg.train.steps == raw["steps"]
  assert cfg.optim.lr == raw["optim"]["lr"]
  assert cfg.optim.warmup == raw["optim"]["warmup"]
  assert cfg.optim.lr_min_ratio == raw["optim"]["lr_min_ratio"]
  assert cfg.optim.clip == raw["optim"]["clip"]
  assert cfg.optim.scheduler == raw["optim"]["scheduler"]
  assert cfg.optim.value_lr == raw["model"]["productkey_args"]["value_fixed_lr"]
  assert cfg.train.batch_size == raw["data"]["batch_size"]
  assert cfg.train.checkpoint_every == raw["checkpoint"]["dump"]["every"]
  assert cfg.train.keep_checkpoints == raw["checkpoint"]["dump"]["keep"]
  assert cfg.train.eval_every == raw["checkpoint"]["eval"]["every"]
  assert cfg.train.run_dir == "/runs/pk"
  assert cfg.data.seed == 5 and cfg.data.tokenizer == "sentencepiece"
  assert lingua_trainable("pkplus_373m_1024k").data.seed == 42  # DataArgs' default, not `seed`
  debug = lingua_trainable("debug", ["steps=7", "optim.lr=0.5", "grad_acc_steps=4"])
  assert (debug.train.steps, debug.optim.lr, debug.train.grad_accum) == (7, 0.5, 4)
  assert debug.train.batch_size == 32 * 4  # Lingua's per-micro-step batch, times accumulation


def test_lingua_memory_parallel_size_is_the_memory_mesh_axis():
  cfg = lingua_trainable("pkplus_373m_1024k", ["distributed.memory_parallel_size=4"])
  assert (cfg.mesh.memory, cfg.mesh.fsdp, cfg.mesh.data) == (4, 1, -1)
  assert lingua_trainable("debug", ["distributed.dp_shard=2"]).mesh.fsdp == 2


@pytest.mark.parametrize("overrides, remat", [
    ([], "none"),
    (["distributed.checkpoint_each_layer=true"], "block"),
    (["distributed.selective_activation_checkpointing=true"], "attention"),
])
def test_lingua_activation_checkpointing_maps_onto_model_remat(overrides, remat):
  assert lingua_trainable("debug", overrides).model.remat == remat


def test_model_remat_round_trips_through_lingua_s_distributed_section():
  for remat in ("none", "attention", "block"):
    cfg = config_loading.load("tiny", [f"model.remat={remat}"])
    back = config.from_dict(Config, lingua.to_memjax(lingua.from_memjax(cfg), training=False))
    assert back.model.remat == remat


def test_lingua_optimizer_keys_left_out_take_lingua_defaults():
  # debug.yaml gives lr, warmup, lr_min_ratio and clip; OptimArgs' defaults give the rest.
  optim = lingua_trainable("debug").optim
  assert (optim.lr, optim.warmup, optim.lr_min_ratio, optim.clip) == (3e-4, 2000, 1e-6, 10.0)
  assert (optim.scheduler, optim.weight_decay) == ("cosine", 0.1)
  with pytest.warns(UserWarning):
    data = lingua.to_memjax({"model": {"dim": 64, "n_heads": 4}, "steps": 9})
  bare = config.from_dict(Config, data)
  assert (bare.optim.lr, bare.optim.warmup, bare.optim.lr_min_ratio) == (3e-4, 2000, 0.1)
  assert (bare.optim.scheduler, bare.optim.cycle_length, bare.optim.cosine_theta) == (
      "cosine", 1.0, 1.0)
  assert bare.optim.value_lr == 1e-3  # ProductKeyArgs' value_fixed_lr


def test_a_lingua_file_without_optim_trains_on_lingua_s_schedule(tmp_path):
  path = tmp_path / "lingua.yaml"
  path.write_text("steps: 9\nmodel:\n  dim: 64\n  n_heads: 4\n")
  with pytest.warns(UserWarning, match="synthetic knowledge corpus"):
    optim = config_loading.load(path).optim
  assert (optim.scheduler, optim.lr, optim.warmup) == ("cosine", 3e-4, 2000)
  assert optim.lr_min_ratio == 0.1


def test_lingua_training_keys_left_out_take_lingua_defaults():
  with pytest.warns(UserWarning):
    bare = config.from_dict(Config, lingua.to_memjax({"model": {"dim": 64, "n_heads": 4}}))
  train = bare.train
  assert train.steps == 1000  # TrainArgs.steps
  assert train.batch_size == 2  # DataArgs.batch_size, one rank, no accumulation
  assert (train.checkpoint_every, train.eval_every, train.keep_checkpoints) == (1000, 1000, 0)
  assert train.log_every == 10  # LoggingArgs.freq


def test_a_lingua_file_without_data_seq_len_trains_on_lingua_s_2048_tokens():
  model = {"dim": 64, "n_heads": 4, "max_seqlen": 512}
  with pytest.warns(UserWarning):
    bare = config.from_dict(Config, lingua.to_memjax({"model": model}))
  # DataArgs.seq_len, which Lingua's training also writes into the model's max_seqlen.
  assert (bare.train.seq_len, bare.model.max_seqlen) == (2048, 2048)
  given = config.from_dict(Config, lingua.to_memjax({"model": model}, training=False))
  assert given.model.max_seqlen == 512  # a trained model's own, as its params.json says


def test_lingua_cosine_shape_keys_map():
  optim = lingua_trainable("debug", ["optim.cycle_length=0.5", "optim.cosine_theta=2"]).optim
  assert (optim.scheduler, optim.cycle_length, optim.cosine_theta) == ("cosine", 0.5, 2.0)


def test_lingua_constant_schedule_is_linear_without_warmup_or_decay():
  # The reference's constant schedule ignores warmup: a multiplier of 1 from the first step.
  optim = lingua_trainable("debug", ["optim.scheduler=constant"]).optim
  assert (optim.scheduler, optim.warmup, optim.lr_min_ratio) == ("linear", 0, 1.0)


@pytest.mark.parametrize("value_fixed_lr", ["null", "0", "0.0"])
def test_lingua_null_or_zero_value_lr_trains_the_table_at_the_base_rate(value_fixed_lr):
  # The reference's optimizer groups take `fixed_lr if fixed_lr else lr`.
  cfg = lingua_trainable(
      "pkplus_373m_1024k",
      [f"model.productkey_args.value_fixed_lr={value_fixed_lr}", "optim.lr=2e-4"],
  )
  assert cfg.optim.value_lr == cfg.optim.lr == 2e-4


def test_lingua_profiling_and_unmapped_wandb_keys_warn_that_they_are_ignored():
  raw = {"model": {"dim": 64, "n_heads": 4}, "logging": {"wandb": {"project": "pk", "dir": "/w"}},
         "profiling": {"run": True}, "distributed": {"compile": True}}
  with pytest.warns(UserWarning) as record:
    lingua.to_memjax(raw)
  [message] = [str(r.message) for r in record if "ignored" in str(r.message)]
  for key in ("logging.wandb.dir", "profiling", "distributed.compile"):
    assert key in message
  assert "probe_freq" not in message  # keys at the reference's default are not named
  assert "logging.wandb.project" not in message  # mapped


def test_lingua_logging_wandb_maps_onto_train_wandb_with_the_top_level_name():
  raw = {"model": {"dim": 64, "n_heads": 4}, "name": "pk_373m",
         "logging": {"wandb": {"project": "pk", "entity": "team", "mode": "dryrun"}}}
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the synthetic corpus
    cfg = config.from_dict(config.Config, lingua.to_memjax(raw))
  assert cfg.train.wandb == config.WandbConfig(
      mode="offline", project="pk", entity="team", name="pk_373m")
  raw["logging"]["wandb"] = {}  # wandb.init's defaults: online
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    assert config.from_dict(config.Config, lingua.to_memjax(raw)).train.wandb.mode == "online"
  raw["logging"]["wandb"] = None
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    assert config.from_dict(config.Config, lingua.to_memjax(raw)).train.wandb.mode == "disabled"


def test_lingua_keys_at_their_defaults_do_not_warn():
  raw = {"model": {"dim": 64, "n_heads": 4}, "logging": {"freq": 5, "wandb": None},
         "profiling": {"run": False}, "data": {"root_dir": None, "sources": {}}}
  with pytest.warns(UserWarning) as record:
    lingua.to_memjax(raw)
  assert [str(r.message) for r in record if "ignored" in str(r.message)] == []


@pytest.mark.parametrize("override,field,allowed", [
    ("optim.scheduler=wsd", "optim.scheduler", "linear, cosine, constant"),
    ("optim.beta2=0.99", "optim.beta2", "0.95"),
    ("optim.lr=-1", "optim.lr", "> 0"),
    ("data.tokenizer.name=mock", "data.tokenizer.name", "bytes, sp, tiktoken"),
])
def test_lingua_training_keys_refused_by_name(override, field, allowed):
  with pytest.raises(config.ConfigError, match=allowed) as error:
    lingua_trainable("debug", [override])
  assert error.value.field == field


def test_a_command_line_splits_into_config_options_and_overrides():
  path, options, overrides = config_loading.split_command_line(
      ["model.dim=64", "config=configs/pk_7b.yaml", "topology=v5p-8", "optim.lr=1e-3"], ("topology",)
  )
  assert (path, options, overrides) == (
      "configs/pk_7b.yaml", {"topology": "v5p-8"}, ["model.dim=64", "optim.lr=1e-3"]
  )
  assert config_loading.split_command_line([])[0] == config_loading.DEFAULT_CONFIG


def test_lingua_framing_maps_onto_the_data_config():
  cfg = lingua_trainable("pkplus_373m_1024k", ["data.add_bos=false"])
  assert not cfg.data.add_bos and cfg.data.add_eos
