"""Preparing a corpus into tokenized ArrayRecord shards, and how fast a training run starts on it.

  python benchmarks/prepare.py [--corpus FILE.jsonl] [--size-mb 1000] [--processes 1 2]
                               [--tokenizer bytes|sentencepiece] [--work-dir DIR] [--keep]
                               [--json FILE] [--smoke]

Without `--corpus` a synthetic JSONL corpus of `--size-mb` MB is built under `--work-dir`
(default /tmp/memjax_prepare_bench) and kept for the next run: documents of log-normally varied
length (mean about 2 KB) made of sentences over a Zipf-distributed vocabulary of random words,
with some non-ASCII words. `--tokenizer sentencepiece` trains an 8k BPE model on the corpus's
first 20 MB first (a subword tokenizer costs more per byte than the byte tokenizer).

Measured:
- `python -m memjax.data.prepare` throughput (input MB/s, tokens/s) with each process count,
  from nothing (shards deleted first), pool start-up included;
- train start-up: the time from building the source and the batch iterator to the first batch
  (`--batch-size` x `--seq-len`), for `data.source=files` with no cached index (every line parsed
  and checked, which every start did before the index cache), with its index cached (a restart),
  and for `data.source=arrayrecord` on the prepared shards; then the tokens/s of the next
  `--batches` batches. Best of `--repeats`. The corpus is in the page cache (a restart on the
  same host); a cold disk or a bucket adds its read time to every row.

`--smoke`: a 4 MB corpus, one repeat, a few batches: seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import shutil
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from memjax import data  # noqa: E402
from memjax.data import prepare  # noqa: E402


def build_corpus(path: pathlib.Path, size_bytes: int, seed: int = 0) -> None:
  """A synthetic JSONL corpus of about `size_bytes` (see the module docstring)."""
  rng = np.random.default_rng(seed)
  letters = list("abcdefghijklmnopqrstuvwxyz")
  words = ["".join(rng.choice(letters, size=rng.integers(2, 10))) for _ in range(5000)]
  words += ["größe", "café", "naïve", "東京", "данные", "—"]
  zipf = 1 / np.arange(1, len(words) + 1)
  sentences = []
  for _ in range(20000):
    picks = rng.choice(len(words), size=rng.integers(5, 25), p=zipf / zipf.sum())
    text = " ".join(words[i] for i in picks)
    sentences.append(text[0].upper() + text[1:] + ".")
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp, written, n = path.with_name(path.name + ".tmp"), 0, 0
  with open(tmp, "w", encoding="utf-8") as f:
    while written < size_bytes:
      k = int(np.clip(rng.lognormal(2.5, 1.0), 1, 2000))  # sentences in this document
      doc = " ".join(sentences[i] for i in rng.integers(0, len(sentences), k))
      line = json.dumps({"text": doc, "id": n}, ensure_ascii=False) + "\n"
      written += f.write(line)  # characters, about bytes: a few words are not ASCII
      n += 1
  os.replace(tmp, path)


def train_sentencepiece(corpus: pathlib.Path, prefix: pathlib.Path, sample_bytes: int) -> str:
  import sentencepiece as spm

  sample = prefix.with_suffix(".txt")
  with open(corpus, "rb") as f:
    lines = f.read(sample_bytes).splitlines()[:-1]  # whole lines only
  sample.write_text("\n".join(json.loads(ln)["text"] for ln in lines), encoding="utf-8")
  spm.SentencePieceTrainer.train(
      input=str(sample), model_prefix=str(prefix), vocab_size=8000, model_type="bpe",
      byte_fallback=True, character_coverage=1.0, minloglevel=2, num_threads=2,
      input_sentence_size=200_000, shuffle_input_sentence=True,
  )
  return str(prefix) + ".model"


def start_up(make_source, tokenizer, args) -> dict:
  """Seconds from building the source to the first batch; tokens/s of the next batches."""
  t0 = time.perf_counter()
  source = make_source()
  it = data.make_batches(
      source, tokenizer, batch_size=args.batch_size, seq_len=args.seq_len, seed=0
  )
  with contextlib.closing(it):
    next(it)
    t1 = time.perf_counter()
    for _ in range(args.batches):
      next(it)
    t2 = time.perf_counter()
  tokens = args.batches * args.batch_size * args.seq_len
  return {"seconds": t1 - t0, "tokens_per_s": tokens / (t2 - t1), "documents": len(source)}


def best(runs: list[dict]) -> dict:
  return min(runs, key=lambda r: r["seconds"])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--corpus", type=pathlib.Path, help="a JSONL file (default: synthetic)")
  parser.add_argument("--size-mb", type=float, default=1000, help="the synthetic corpus's size")
  parser.add_argument("--processes", type=int, nargs="*", default=[1, 2])
  parser.add_argument("--tokenizer", choices=["bytes", "sentencepiece"], default="bytes")
  parser.add_argument("--shard-mb", type=float, default=128)
  parser.add_argument("--batch-size", type=int, default=8)
  parser.add_argument("--seq-len", type=int, default=2048)
  parser.add_argument("--batches", type=int, default=50, help="read after the first")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--work-dir", type=pathlib.Path,
                      help="default: /tmp/memjax_prepare_bench (smoke: ..._smoke)")
  parser.add_argument("--keep", action="store_true", help="keep the prepared shards")
  parser.add_argument("--json", type=pathlib.Path, help="write the figures here")
  parser.add_argument("--smoke", action="store_true", help="a 4 MB corpus, one repeat")
  args = parser.parse_args()
  if args.smoke:
    args.size_mb, args.repeats, args.batches, args.shard_mb = 4, 1, 3, 1
  default = "memjax_prepare_bench" + "_smoke" * args.smoke
  work = args.work_dir or pathlib.Path(tempfile.gettempdir(), default)
  work.mkdir(parents=True, exist_ok=True)

  synthetic = args.corpus is None
  corpus = args.corpus or work / f"corpus_{args.size_mb:g}mb.jsonl"
  if synthetic and not corpus.is_file():
    t = time.perf_counter()
    build_corpus(corpus, int(args.size_mb * 1e6))
    print(f"built {corpus} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
  size = corpus.stat().st_size
  model = None
  if args.tokenizer == "sentencepiece":
    model = train_sentencepiece(corpus, work / "bpe8k", min(size, 20_000_000))
  tokenizer = data.make_tokenizer(args.tokenizer, model)

  preparations, out = [], None
  for n in args.processes:
    out = work / f"prepared_{n}"
    shutil.rmtree(out, ignore_errors=True)
    result = prepare.prepare(
        [str(corpus)], out, tokenizer=args.tokenizer, tokenizer_path=model, processes=n,
        shard_bytes=int(args.shard_mb * (1 << 20)), progress=False,
    )
    print(prepare.summary(result, n), file=sys.stderr, flush=True)
    preparations.append({
        "processes": n, "seconds": result["seconds"], "documents": result["documents"],
        "tokens": result["tokens"], "shards": len(result["shards"]),
        "MB_per_s": size / 1e6 / result["seconds"],
        "tokens_per_s": result["tokens"] / result["seconds"],
        "output_bytes": sum(p.stat().st_size for p in out.glob("*.array_record")),
    })
    if n != args.processes[-1] and not args.keep:
      shutil.rmtree(out)

  files = lambda: data.file_source(str(corpus))  # noqa: E731
  cache = pathlib.Path(tempfile.mkdtemp(dir=work, prefix="index_cache"))
  rows = []
  try:
    cold = []
    for k in range(args.repeats):
      os.environ["MEMJAX_CACHE_DIR"] = str(cache / f"cold{k}")  # nothing cached yet
      cold.append(start_up(files, tokenizer, args))
    rows.append({"source": "files, no index cached (every line parsed)", **best(cold)})
    # The last cold start left its index: a restart reads it.
    cached = [start_up(files, tokenizer, args) for _ in range(args.repeats)]
    rows.append({"source": "files, index cached", **best(cached)})
  finally:
    shutil.rmtree(cache)
  if out is not None:
    prepared = lambda: data.arrayrecord_source(str(out), tokenizer, model)  # noqa: E731
    runs = [start_up(prepared, tokenizer, args) for _ in range(args.repeats)]
    rows.append({"source": "arrayrecord (prepared shards)", **best(runs)})
    if not args.keep:
      shutil.rmtree(out)

  kind = "synthetic JSONL" if synthetic else "JSONL"
  print(f"{kind} corpus {corpus}: {size / 1e6:,.0f} MB, {preparations[0]['documents']:,} "
        f"documents; tokenizer {args.tokenizer}; {os.cpu_count()} CPUs")
  print("| prepare | processes | seconds | MB/s | tokens/s | shards | output MB |")
  print("|---|---|---|---|---|---|---|")
  for p in preparations:
    print(f"| memjax.data.prepare | {p['processes']} | {p['seconds']:.1f} | {p['MB_per_s']:.1f} | "
          f"{p['tokens_per_s'] / 1e6:.2f}M | {p['shards']} | {p['output_bytes'] / 1e6:,.0f} |")
  print()
  print(f"| train start-up: source | to the first batch (s) | then tokens/s "
        f"({args.batch_size} x {args.seq_len}) |")
  print("|---|---|---|")
  for r in rows:
    print(f"| {r['source']} | {r['seconds']:.2f} | {r['tokens_per_s'] / 1e6:.2f}M |")
  if args.json:
    args.json.write_text(json.dumps({
        "corpus": {"path": str(corpus), "bytes": size, "synthetic": synthetic,
                   "documents": preparations[0]["documents"]},
        "tokenizer": args.tokenizer, "cpus": os.cpu_count(),
        "batch": [args.batch_size, args.seq_len], "prepare": preparations, "startup": rows,
    }, indent=2))


if __name__ == "__main__":
  main()
