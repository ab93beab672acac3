"""Tokenizers: round trips (non-ASCII included), special ids, model files and their errors."""

import base64

import pytest

from memjax.data import tokenizers

TEXTS = ["Hello, world!", "Grüße aus Köln — naïve café", "東京 and Zürich 🙂", "a\t  b\n"]


def test_byte_tokenizer_is_the_references():
  tok = tokenizers.ByteTokenizer()
  assert (tok.bos_id, tok.eos_id, tok.vocab_size, tok.name) == (256, 257, 258, "bytes")
  assert tok.encode("aé") == [97, 0xC3, 0xA9]
  for text in TEXTS:
    assert tok.decode(tok.encode(text)) == text


def test_byte_decode_skips_specials_and_replaces_bad_utf8():
  tok = tokenizers.ByteTokenizer()
  assert tok.decode([256, 104, 105, 257]) == "hi"
  assert tok.decode([104, 0xFF, 105]) == "h\ufffdi"
  with pytest.raises(ValueError, match=r"\[0, 258\)"):
    tok.decode([104, 300])


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory):
  """A tiny BPE model trained here, normalising nothing so that text round-trips exactly."""
  import sentencepiece as spm

  root = tmp_path_factory.mktemp("spm")
  (root / "corpus.txt").write_text("\n".join(TEXTS * 20 + ["the cat sat on the mat"] * 20))
  spm.SentencePieceTrainer.train(
      input=str(root / "corpus.txt"), model_prefix=str(root / "tiny"), vocab_size=300,
      model_type="bpe", byte_fallback=True, character_coverage=1.0,
      normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2,
  )
  return root / "tiny.model"


def test_sentencepiece_round_trips_and_uses_the_models_specials(sentencepiece_model):
  tok = tokenizers.make_tokenizer("sentencepiece", str(sentencepiece_model))
  assert isinstance(tok, tokenizers.SentencePieceTokenizer)
  assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 300)  # the trainer's defaults
  for text in TEXTS + ["unseen: Ωμέγα 🚀"]:  # byte fallback covers characters never seen
    ids = tok.encode(text)
    assert tok.bos_id not in ids and tok.eos_id not in ids
    assert tok.decode([tok.bos_id, *ids, tok.eos_id]) == text
  assert len(tok.encode("the cat sat on the mat")) < len("the cat sat on the mat")  # merges


def test_sentencepiece_model_without_bos_is_refused(tmp_path):
  import sentencepiece as spm

  (tmp_path / "c.txt").write_text("abc def ghi\n" * 10)
  spm.SentencePieceTrainer.train(
      input=str(tmp_path / "c.txt"), model_prefix=str(tmp_path / "nobos"), vocab_size=12,
      bos_id=-1, minloglevel=2,
  )
  with pytest.raises(ValueError, match="no BOS or EOS"):
    tokenizers.SentencePieceTokenizer(tmp_path / "nobos.model")
  (tmp_path / "junk.model").write_bytes(b"not a model")
  with pytest.raises(ValueError, match="junk.model is no SentencePiece model"):
    tokenizers.SentencePieceTokenizer(tmp_path / "junk.model")


MERGES = [b"th", b"the", b" t", b" the", b"at", "ü".encode()]  # ü: two bytes, merged


def write_ranks(path, tokens):
  path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(tokens)))
  return path


@pytest.fixture
def ranks_file(tmp_path):
  return write_ranks(tmp_path / "tiny.tiktoken", [bytes([b]) for b in range(256)] + MERGES)


def test_tiktoken_round_trips_with_bos_eos_after_the_ranks(ranks_file):
  tok = tokenizers.make_tokenizer("tiktoken", str(ranks_file))
  n_ranks = 256 + len(MERGES)
  assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (n_ranks, n_ranks + 1, n_ranks + 2)
  assert tok.encode("the") == [256 + MERGES.index(b"the")]
  assert tok.encode(" the") == [256 + MERGES.index(b" the")]
  assert tok.encode("ü") == [256 + MERGES.index(b"\xc3\xbc")]
  for text in TEXTS:
    ids = tok.encode(text)
    assert max(ids) < n_ranks
    assert tok.decode([tok.bos_id, *ids, tok.eos_id]) == text
  # Text spelling a special token is ordinary text, never the special id.
  assert tok.bos_id not in tok.encode("<|begin_of_text|>")


@pytest.mark.parametrize(
    "content, message",
    [
        ("aGk= 0\nnot-base64! 1\n", r"tiny.tiktoken:2: expected 'base64-token rank'"),
        ("aGk= 0\naGk= 1\n", "listed twice"),
        ("aGk= 0\naGo= 5\n", r"ranks must be 0..1"),
        ("aGk= 0\n", "every single byte must be a token"),
    ],
)
def test_tiktoken_bad_ranks_files_name_the_line(tmp_path, content, message):
  (tmp_path / "tiny.tiktoken").write_text(content)
  with pytest.raises(ValueError, match=message):
    tokenizers.TiktokenTokenizer(tmp_path / "tiny.tiktoken")


def test_make_tokenizer_errors_name_the_config_field(tmp_path):
  assert isinstance(tokenizers.make_tokenizer("bytes", None), tokenizers.ByteTokenizer)
  missing = tmp_path / "absent.model"
  for kind in ("sentencepiece", "tiktoken"):
    with pytest.raises(FileNotFoundError, match=rf"data.tokenizer_path: .*{missing}"):
      tokenizers.make_tokenizer(kind, str(missing))
    with pytest.raises(ValueError, match="data.tokenizer_path: .* needs its model file"):
      tokenizers.make_tokenizer(kind, None)
  with pytest.raises(ValueError, match="data.tokenizer: must be one of bytes, sentencepiece"):
    tokenizers.make_tokenizer("wordpiece", None)
  with pytest.raises(ValueError, match="data.tokenizer_path: the byte tokenizer takes no model"):
    tokenizers.make_tokenizer("bytes", str(missing))
