"""Run directories, data and configs on Google Cloud Storage, against a local emulator.

The emulator (gcp-storage-emulator) runs in this process on the loopback address; `train.py` and
`memjax.generate` run in subprocesses told where it is. Not every library reads
`STORAGE_EMULATOR_HOST`, the emulator variable of Google's clients:

- gcsfs (etils.epath's gs:// backend: the run directory's write check, metrics.jsonl, orbax's
  checkpoint metadata and memjax's data-shard files, config and tokenizer files, TFDS's dataset
  metadata, consolidated checkpoints; and fsspec's, which memjax.paths uses for what epath
  lacks: the `files` and `lingua` sources' and `memjax.data.prepare`'s recursive globs with
  generations, and their ranged reads) and google-cloud-storage (tensorboardX's gs:// event
  writer) read it.
- tensorstore (orbax's array files) does not: it reads `TENSORSTORE_GCS_HTTP_URL`, and
  `GOOGLE_AUTH_TOKEN_FOR_TESTING` in place of credentials.
- array_record (TFDS's ArrayRecord reader and the `arrayrecord` source's, through
  google-cloud-cpp) does not: it reads `CLOUD_STORAGE_EMULATOR_ENDPOINT`. Its writer opens local
  files only, so `memjax.data.prepare` refuses a gs:// output.

Each is pointed at the same emulator, so every path of a default run is tested against it and
none needs another fsspec filesystem (epath would refuse one such as memory:// anyway). Only the
JAX profiler's trace (`train.profile`, off by default) is not: its writer (tsl's GCS file
system, not fsspec) reads no endpoint variable and always calls www.googleapis.com.

The emulator falls short of GCS twice, and the test fills in: it sends no generation headers on
reads (tensorstore needs them; `_with_generation` adds them), and it lacks the storage-control
API that gcsfs asks for a bucket's type (turned off: `GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`).
It ignores write preconditions, which one writer per object never needs.
"""

import base64
import contextlib
import itertools
import json
import os
import pathlib
import socket
import subprocess
import sys
from http import HTTPStatus

import numpy as np
import pytest

from memjax import data, paths
from memjax.config import ConfigError
from memjax.data import prepare
from memjax.training import inputs, metrics

from support.training import SMOKE

ROOT = pathlib.Path(__file__).resolve().parent.parent
BUCKET = "test-bucket"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _with_generation(read):
  """An emulator handler that reads an object, plus the generation headers that real GCS sends
  and tensorstore requires (it refuses a read without them: "Malformed StorageGeneration")."""

  def handler(request, response, storage, *args, **kwargs):
    read(request, response, storage, *args, **kwargs)
    if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
      response["x-goog-generation"] = obj["generation"]
      response["x-goog-metageneration"] = obj["metageneration"]

  handler.original = read
  return handler


@pytest.fixture(scope="module")
def emulator():
  """The emulator's URL; it serves one in-memory bucket, BUCKET, until the module ends."""
  from gcp_storage_emulator import server as emulator_server
  from gcp_storage_emulator.handlers import objects

  routes = [methods for _, methods in emulator_server.HANDLERS]
  for methods in routes:
    for verb, handler in methods.items():
      if handler in (objects.get, objects.download):  # media reads: ?alt=media and /download/
        methods[verb] = _with_generation(handler)
  port = _free_port()
  server = emulator_server.create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
  server.start()
  yield f"http://127.0.0.1:{port}"
  server.stop()
  for methods in routes:
    for verb, handler in methods.items():
      methods[verb] = getattr(handler, "original", handler)


@pytest.fixture(scope="module")
def gcs(emulator):
  """A gcsfs filesystem on the emulator, for the test's own reads and uploads."""
  from gcsfs.core import GCSFileSystem  # the plain one: no bucket-type lookup

  return GCSFileSystem(endpoint_url=emulator, token="anon", skip_instance_cache=True)


def _env(emulator: str, tmp: pathlib.Path) -> dict[str, str]:
  env = dict(os.environ)
  env.update(
      STORAGE_EMULATOR_HOST=emulator,
      TENSORSTORE_GCS_HTTP_URL=emulator,
      GOOGLE_AUTH_TOKEN_FOR_TESTING="emulator",
      CLOUD_STORAGE_EMULATOR_ENDPOINT=emulator,
      GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false",
      TMPDIR=str(tmp),  # where a wrongly local "gs:" folder from a temporary file would land
      JAX_PLATFORMS="cpu",
      XLA_FLAGS="--xla_force_host_platform_device_count=8",
      JAX_DISABLE_MOST_OPTIMIZATIONS="true",  # compiles faster, same maths
  )
  return env


def _run(
    args: list[str], emulator: str, cwd: pathlib.Path, tmp: pathlib.Path, returncode: int = 0
) -> str:
  proc = subprocess.run(
      [sys.executable, *args], cwd=cwd, env=_env(emulator, tmp), stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True, timeout=300,
  )
  assert proc.returncode == returncode, proc.stdout[-4000:]
  return proc.stdout


def _local_gs_folders(*roots: pathlib.Path) -> list[str]:
  return [
      os.path.join(where, name)
      for root in roots
      for where, dirs, files in os.walk(root)
      for name in dirs + files
      if name.startswith("gs:")
  ]


def _python(code: str, emulator: str, tmp: pathlib.Path) -> str:
  """Runs `code` in a subprocess on the emulator, able to import this module, with memjax's cache
  (the files source's indexes) in `tmp`/cache."""
  prelude = (
      f"import os, sys; sys.path.insert(0, {str(ROOT / 'tests')!r}); "
      f"os.environ['MEMJAX_CACHE_DIR'] = {str(tmp / 'cache')!r}\n"
  )
  return _run(["-c", prelude + code], emulator, tmp, tmp)


def _upload(gcs, local: pathlib.Path, prefix: str) -> None:
  """The files under folder `local` to gs://BUCKET/`prefix`/, at the same relative paths."""
  for path in sorted(local.rglob("*")):
    if path.is_file():
      gcs.put_file(str(path), f"{BUCKET}/{prefix}/{path.relative_to(local).as_posix()}")


def _batches(source, n: int = 6, resume_after: int = 2) -> np.ndarray:
  """`n` byte-token batches of `source`, then its batches `resume_after`.. again from an iterator
  restored to the state a checkpoint stores after `resume_after` batches."""
  tokenizer = data.make_tokenizer("bytes")
  make = lambda: data.make_batches(  # noqa: E731
      source, tokenizer, batch_size=4, seq_len=32, seed=3, prefetch=0
  )
  with contextlib.closing(make()) as it:
    out = list(itertools.islice(it, n))
  with contextlib.closing(make()) as it:
    for _ in range(resume_after):
      next(it)
    state = json.loads(json.dumps(it.get_state()))
  with contextlib.closing(make()) as it:
    it.set_state(state)
    out += list(itertools.islice(it, n - resume_after))
  return np.stack(out)


def _write_jsonl(path: pathlib.Path, texts) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts))


def _logged(gcs, key: str) -> dict[int, float]:
  lines = gcs.cat_file(f"{BUCKET}/run/metrics.jsonl").decode().splitlines()
  return {r["step"]: r[key] for r in map(json.loads, lines) if key in r}


def test_a_uri_stays_a_uri_and_a_local_path_is_made_absolute(tmp_path, monkeypatch):
  assert os.fspath(paths.as_path("gs://bucket/runs/x")) == "gs://bucket/runs/x"
  assert paths.is_remote("gs://bucket/runs/x") and not paths.is_remote(tmp_path)
  monkeypatch.chdir(tmp_path)
  assert os.fspath(paths.as_path("runs/x")) == str(tmp_path / "runs" / "x")


@pytest.mark.slow
def test_a_run_on_gcs_trains_resumes_and_generates_without_local_folders(
    emulator, gcs, tmp_path
):
  # The config is read from the bucket, and the corpus is built into it (then read from it).
  gcs.put(str(ROOT / "configs" / "tiny.yaml"), f"{BUCKET}/configs/tiny.yaml")
  cwd, tmp = tmp_path / "cwd", tmp_path / "tmp"
  cwd.mkdir()
  tmp.mkdir()
  args = [
      str(ROOT / "train.py"), f"config=gs://{BUCKET}/configs/tiny.yaml", *SMOKE,
      f"data.data_dir=gs://{BUCKET}/tfds", f"train.run_dir=gs://{BUCKET}/run",
  ]

  out = _run([*args, "train.stop_after=3"], emulator, cwd, tmp)
  assert "done: step 3 of 6" in out, out[-2000:]
  assert gcs.exists(f"{BUCKET}/tfds/memjax_knowledge/n24_seed0/1.0.0/dataset_info.json")
  assert sorted(_logged(gcs, "train/loss")) == [1, 2, 3]
  assert gcs.isdir(f"{BUCKET}/run/checkpoints/3/state")
  assert gcs.ls(f"{BUCKET}/run/checkpoints/3/data")
  assert [p for p in gcs.ls(f"{BUCKET}/run/tensorboard") if "events.out.tfevents" in p]

  out = _run(args, emulator, cwd, tmp)
  assert f"resumed from gs://{BUCKET}/run/checkpoints/3" in out, out[-2000:]
  # The rewritten metrics.jsonl keeps the first invocation's lines.
  assert sorted(_logged(gcs, "train/loss")) == [1, 2, 3, 4, 5, 6]
  assert set(_logged(gcs, "eval/loss")) == {3, 6}
  assert gcs.isdir(f"{BUCKET}/run/checkpoints/6/state")

  out = _run(
      ["-m", "memjax.generate", f"gs://{BUCKET}/run", "--prompt", "Ada was born in",
       "--max-new-tokens", "4"],
      emulator, cwd, tmp,
  )
  assert out.splitlines()[-1].startswith("Ada was born in"), out[-2000:]
  code = (
      "from memjax import evaluation_harness as h; "
      f"cfg, *_ = h.load_run('gs://{BUCKET}/run/checkpoints/6'); print(cfg.model.dim)"
  )
  assert _run(["-c", code], emulator, cwd, tmp).splitlines()[-1] == "32"
  assert not _local_gs_folders(cwd, tmp, ROOT, tmp_path)


def test_metrics_on_an_object_store_are_rewritten_whole_keeping_earlier_lines(tmp_path, monkeypatch):
  # A local folder standing for a bucket: the writer takes the object-store path.
  monkeypatch.setattr(paths, "is_remote", lambda path: True)
  (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
  writer = metrics.MetricsWriter(tmp_path, tensorboard=False, flush_seconds=3600)
  writer.write(2, {"loss": 1.5})
  assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n'  # not yet flushed
  writer.close()
  lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in lines] == [1, 2] and lines[1]["loss"] == 1.5
  writer = metrics.MetricsWriter(tmp_path, tensorboard=False, flush_seconds=0)
  writer.write(3, {"loss": 1.0})
  assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 3  # flushed at once
  writer.close()


def test_a_bucket_tensorboardx_cannot_write_to_is_refused_by_name():
  with pytest.raises(ConfigError, match="train.tensorboard"):
    metrics.check_tensorboard_dir("az://container/runs/x")
  metrics.check_tensorboard_dir("gs://bucket/runs/x")


@pytest.mark.slow
def test_two_processes_share_one_run_on_gcs_and_only_the_first_writes_logs(
    emulator, gcs, tmp_path
):
  # As the workers of a pod slice: one command each, joined through jax.distributed.
  local = tmp_path / "tfds"
  data.build_knowledge_dataset(24, inputs.KNOWLEDGE_SEED, local)
  port = _free_port()
  args = [
      str(ROOT / "train.py"), *SMOKE, f"data.data_dir={local}", "data.shards=2",
      "train.steps=3", f"train.run_dir=gs://{BUCKET}/pod", "train.tensorboard=false",
      f"distributed.coordinator=localhost:{port}", "distributed.num_processes=2",
  ]
  env = dict(_env(emulator, tmp_path), XLA_FLAGS="--xla_force_host_platform_device_count=4")
  procs = [
      subprocess.Popen(
          [sys.executable, *args, f"distributed.process_id={i}"], cwd=tmp_path, env=env,
          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      )
      for i in range(2)
  ]
  outs = [proc.communicate(timeout=300)[0] for proc in procs]
  for proc, out in zip(procs, outs):
    assert proc.returncode == 0, out[-4000:]
  lines = gcs.cat_file(f"{BUCKET}/pod/metrics.jsonl").decode().splitlines()
  assert sorted(r["step"] for r in map(json.loads, lines) if "train/loss" in r) == [1, 2, 3]
  assert gcs.isdir(f"{BUCKET}/pod/checkpoints/3/state")
  names = [p.rsplit("/", 1)[1] for p in gcs.ls(f"{BUCKET}/pod/checkpoints/3/data")]
  assert sorted(n for n in names if n.startswith("shard_")) == [  # one written by each process
      "shard_0-of-2.json", "shard_1-of-2.json"
  ]
  assert "done: step 3" in outs[0] and "done:" not in outs[1]
  assert not _local_gs_folders(tmp_path, ROOT)


def test_a_missing_bucket_is_one_clear_error(emulator, tmp_path):
  args = [str(ROOT / "train.py"), *SMOKE, "train.run_dir=gs://no-such-bucket/run"]
  out = _run(args, emulator, tmp_path, tmp_path, returncode=2)
  assert "error: train.run_dir: cannot write to gs://no-such-bucket/run (no such bucket)" in out
  assert not _local_gs_folders(tmp_path)


@pytest.mark.slow
def test_tokenizer_files_are_read_from_gcs(emulator, gcs, tmp_path):
  ranks = "".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256))
  gcs.pipe_file(f"{BUCKET}/tok/bytes.tiktoken", ranks.encode())
  code = (
      "from memjax import data; "
      f"t = data.make_tokenizer('tiktoken', 'gs://{BUCKET}/tok/bytes.tiktoken'); "
      "print(t.vocab_size, t.decode(t.encode('hi')))"
  )
  out = _run(["-c", code], emulator, tmp_path, tmp_path)
  assert out.splitlines()[-1] == "258 hi"


@pytest.mark.slow
def test_the_files_source_reads_jsonl_on_gcs_as_the_same_files_locally_and_caches_the_index(
    emulator, gcs, tmp_path, monkeypatch
):
  monkeypatch.setenv("MEMJAX_CACHE_DIR", str(tmp_path / "local-cache"))  # this process's
  local = tmp_path / "corpus"
  texts = [f"document {i}: Grüße aus Köln. " * (i % 4) for i in range(30)]
  _write_jsonl(local / "a.jsonl", texts)
  _write_jsonl(local / "b.jsonl", ["bbb", "ccc"])
  (local / "notes.txt").write_text("not matched")
  _upload(gcs, local, "corpus")
  code = (
      "import numpy as np; from memjax import data; from memjax.data import sources; "
      "from test_gcs import _batches\n"
      "indexed = []; index = sources._index_file\n"
      "sources._index_file = lambda path, key: indexed.append(path) or index(path, key)\n"
      f"np.save({str(tmp_path / 'gcs.npy')!r}, _batches(data.file_source("
      f"'gs://{BUCKET}/corpus/*.jsonl')))\n"
      "print(indexed)"
  )
  out = _python(code, emulator, tmp_path)
  assert out.splitlines()[-1] == str([f"gs://{BUCKET}/corpus/{n}.jsonl" for n in "ab"])
  expected = _batches(data.file_source(str(local / "*.jsonl")))
  np.testing.assert_array_equal(np.load(tmp_path / "gcs.npy"), expected)

  # A rewrite of the same size within the same second (which epath's whole-second mtime would
  # miss) is a new generation: only that file is indexed again.
  _write_jsonl(local / "b.jsonl", ["BBB", "ccc"])
  gcs.put_file(str(local / "b.jsonl"), f"{BUCKET}/corpus/b.jsonl")
  out = _python(code, emulator, tmp_path)
  assert out.splitlines()[-1] == str([f"gs://{BUCKET}/corpus/b.jsonl"])
  expected = _batches(data.file_source(str(local / "*.jsonl")))
  np.testing.assert_array_equal(np.load(tmp_path / "gcs.npy"), expected)
  assert len(list((tmp_path / "cache" / "file_index").iterdir())) == 3
  assert not _local_gs_folders(tmp_path)


@pytest.mark.slow
def test_a_lingua_root_dir_on_gcs_reads_as_the_same_folders_locally(
    emulator, gcs, tmp_path, monkeypatch
):
  monkeypatch.setenv("MEMJAX_CACHE_DIR", str(tmp_path / "local-cache"))
  local = tmp_path / "lingua"
  for name, n_chunks in (("arxiv", 2), ("wiki", 3)):
    for k in range(n_chunks):
      texts = [f"{name} chunk {k} document {i}" for i in range(9)]
      _write_jsonl(local / name / f"{name}.chunk.{k:02d}.jsonl", texts)
    (local / name / "README").write_text("not a chunk")
  _upload(gcs, local, "lingua")
  weights = {"arxiv": 2.0, "wiki": 1.0}
  code = (
      "import numpy as np; from memjax import data; from memjax.config import ConfigError; "
      "from test_gcs import _batches\n"
      f"source = data.lingua_source('gs://{BUCKET}/lingua', {weights!r})\n"
      f"np.save({str(tmp_path / 'gcs.npy')!r}, _batches(source))\n"
      "print(source)\n"
      "try:\n"
      f"  data.lingua_source('gs://{BUCKET}/lingua', {{'books': 1.0}})\n"
      "except ConfigError as e:\n"
      "  print(e)"
  )
  out = _python(code, emulator, tmp_path)
  assert out.splitlines()[-2:] == [
      "Mixture(arxiv 2 (18 documents), wiki 1 (27 documents))",
      f"data.sources.books: no chunk files (*.chunk.*.jsonl) in gs://{BUCKET}/lingua/books",
  ]
  expected = _batches(data.lingua_source(str(local), weights))
  np.testing.assert_array_equal(np.load(tmp_path / "gcs.npy"), expected)
  assert not _local_gs_folders(tmp_path)


@pytest.mark.slow
def test_inputs_on_gcs_prepare_as_local_ones_and_shards_copied_to_gcs_read_as_local_ones(
    emulator, gcs, tmp_path
):
  local = tmp_path / "corpus"
  _write_jsonl(local / "a.jsonl", [f"document {i}: café 東京. " * (i % 5) for i in range(40)])
  _write_jsonl(local / "b.jsonl", ["last"])
  _upload(gcs, local, "to-prepare")
  settings = {"processes": 1, "shard_bytes": int(0.001 * (1 << 20)), "progress": False}
  prepare.prepare([str(local / "*.jsonl")], tmp_path / "from-local", **settings)
  _upload(gcs, tmp_path / "from-local", "prepared")
  code = (
      "import numpy as np; from memjax import data; from memjax.data import prepare; "
      "from test_gcs import _batches\n"
      f"prepare.main(['gs://{BUCKET}/to-prepare/*.jsonl', '--output', "
      f"{str(tmp_path / 'from-gcs')!r}, '--processes=2', '--shard-mb=0.001', '--quiet'])\n"
      f"source = data.arrayrecord_source('gs://{BUCKET}/prepared', data.make_tokenizer('bytes'))\n"
      f"np.save({str(tmp_path / 'gcs.npy')!r}, _batches(source))"
  )
  out = _python(code, emulator, tmp_path)
  assert "prepared 41 documents" in out, out[-2000:]
  shards = sorted((tmp_path / "from-local").glob("*.array_record"))
  assert len(shards) > 2
  for shard in shards:  # the same bytes from the same documents, wherever they were read
    assert (tmp_path / "from-gcs" / shard.name).read_bytes() == shard.read_bytes()
  plan = json.loads((tmp_path / "from-gcs" / prepare.PLAN_FILE).read_text())
  assert [p for p, _, _ in plan["inputs"]] == [f"gs://{BUCKET}/to-prepare/{n}.jsonl" for n in "ab"]
  local_source = data.arrayrecord_source(str(tmp_path / "from-local"), data.make_tokenizer("bytes"))
  np.testing.assert_array_equal(np.load(tmp_path / "gcs.npy"), _batches(local_source))
  assert not _local_gs_folders(tmp_path)


def test_prepared_shards_are_not_written_to_a_bucket_and_the_error_names_output(tmp_path):
  (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
  with pytest.raises(ValueError, match="--output: gs://bucket/prepared: ArrayRecord writes local"):
    prepare.prepare([str(tmp_path / "a.jsonl")], "gs://bucket/prepared", progress=False)
  assert not _local_gs_folders(tmp_path, pathlib.Path.cwd())


@pytest.mark.slow
def test_a_consolidated_checkpoint_is_exported_to_and_loaded_from_gcs(emulator, gcs, tmp_path):
  pytest.importorskip("torch")
  code = (
      "from memjax.interop import torch_checkpoint as tc\n"
      "from test_interop import assert_same_params, make_config, make_model\n"
      "cfg = make_config(); model = make_model(cfg)\n"
      f"tc.export_consolidated(model, cfg, 'gs://{BUCKET}/consolidated')\n"
      f"cfg2, model2 = tc.load_consolidated('gs://{BUCKET}/consolidated')\n"
      "assert_same_params(model, model2)\n"
      "print(cfg2.model == cfg.model)"
  )
  assert _python(code, emulator, tmp_path).splitlines()[-1] == "True"
  assert sorted(p.rsplit("/", 1)[1] for p in gcs.ls(f"{BUCKET}/consolidated")) == [
      "consolidated.pth", "params.json"
  ]
  assert not _local_gs_folders(tmp_path)
