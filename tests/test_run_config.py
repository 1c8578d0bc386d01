"""Run-level behaviour in process: bad input refused clearly, packing changes nothing, epochs, NaN stops."""

import importlib.util
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from ift_jax import train
from ift_jax.errors import UserError
from tests import fixtures
from tests.test_train import ENV, ROOT

# packed and one-per-row differ in summation order only
_PACKING_ATOL = 1e-5


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  root = tmp_path_factory.mktemp("inputs")
  return fixtures.write_model(root / "model"), fixtures.write_data(root / "data", copies=12)


def _config(inputs, **overrides):
  spec = importlib.util.spec_from_file_location("tiny", ROOT / "configs" / "tiny.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  model, data = inputs
  c.model.path, c.data.source, c.data.templates = str(model), str(data / "reviews.jsonl"), str(data / "templates.yaml")
  for dotted, value in overrides.items():
    section, key = dotted.split("__")
    setattr(getattr(c, section), key, value)
  return c


def test_packed_and_unpacked_give_the_same_per_example_metrics(inputs, tmp_path):
  results = []
  for packing in (True, False):
    s = train.build_session(_config(inputs, data__packing=packing, data__max_eval_examples=0), tmp_path / str(packing))
    from ift_jax.model import load
    results.append(train.run_eval(s, load.load_params(s.pretrained, s.mesh), "validation"))
  packed, unpacked = results
  assert set(packed) == set(unpacked) and packed["validation/examples"] > 5
  for key in packed:
    np.testing.assert_allclose(packed[key], unpacked[key], atol=_PACKING_ATOL, err_msg=key)


def test_epochs_set_the_step_count_and_the_loader_walks_them(inputs, tmp_path):
  c = _config(inputs, train__steps=0, train__epochs=2, train__eval_every=100, checkpoint__every=100)
  s = train.build_session(c, tmp_path)
  per_epoch = [s.train_loader.batches_in_epoch(e) for e in range(2)]
  assert s.total_steps == sum(per_epoch)
  train.train(c, tmp_path)
  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert max(r["step"] for r in rows) == s.total_steps
  # every training example's target tokens are seen exactly once per epoch
  tokens = sum(r["train/target_tokens"] for r in rows if "train/target_tokens" in r)
  expected = 2 * sum(float(e.weights[1:].sum()) for e in s.prepared.examples("train"))
  assert tokens == expected


@pytest.mark.parametrize("overrides, message", [
    (dict(mesh__data=3), r"mesh: data×fsdp×tensor = \[3, 1, 1\] does not divide the 8 devices"),
    (dict(mesh__data=4, mesh__fsdp=2, train__batch_size=12), r"train.batch_size=12 must divide by 8"),
    (dict(model__compute_dtype="fp8"), r"model.compute_dtype='fp8'"),
    (dict(model__remat="full", model__scan_layers=False), r"model.remat='full' needs model.scan_layers=True"),
    (dict(model__path="/nonexistent/model"), r"model.path='/nonexistent/model': not a folder"),
])
def test_bad_config_is_refused_by_name(inputs, tmp_path, overrides, message):
  with pytest.raises(UserError, match=message):
    train.build_session(_config(inputs, **overrides), tmp_path)


def test_malformed_data_lines_are_reported_or_skipped_with_a_count(inputs, tmp_path):
  _, data = inputs
  bad = tmp_path / "reviews.jsonl"
  lines = (data / "reviews.jsonl").read_text().splitlines()
  bad.write_text("\n".join(lines[:5] + ['{"text": "broken'] + lines[5:]) + "\n")
  with pytest.raises(UserError, match=r"reviews.jsonl.*1 malformed.*line 6.*skip_malformed"):
    train.build_session(_config(inputs, data__source=str(bad)), tmp_path / "a")
  s = train.build_session(_config(inputs, data__source=str(bad), data__skip_malformed=True), tmp_path / "b")
  assert any("1 skipped" in note for note in s.prepared.notes)


def test_template_with_a_missing_field_is_refused(inputs, tmp_path):
  templates = tmp_path / "t.yaml"
  templates.write_text('broken:\n  prompt: "{{ txet }} :"\n  completion: "{{ sentiment }}"\n')
  with pytest.raises(UserError, match="txet"):
    train.build_session(_config(inputs, data__templates=str(templates)), tmp_path)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(inputs, tmp_path):
  model, data = inputs
  cmd = [sys.executable, "-c", "from ift_jax.cli import main; main()", "train", "--config=configs/tiny.py",
         f"--workdir={tmp_path}", f"--config.model.path={model}", f"--config.data.source={data / 'reviews.jsonl'}",
         f"--config.data.templates={data / 'templates.yaml'}", "--config.optim.lr=1e30",
         "--config.optim.clip_norm=1e30",
         "--config.checkpoint.every=1", "--config.train.eval_every=100"]
  proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 3, proc.stderr[-2000:]
  last_line = proc.stderr.strip().splitlines()[-1]
  assert last_line.startswith("error: step ") and "last good checkpoint is" in last_line
  saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  failed_step = int(last_line.split()[2].rstrip(":"))
  assert saved and max(saved) < failed_step
  import orbax.checkpoint as ocp
  with ocp.StandardCheckpointer() as ckpt:
    params = ckpt.restore(tmp_path / "checkpoints" / str(max(saved)) / "state")["params"]
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_cli_prints_one_line_error_without_traceback(inputs, tmp_path):
  model, data = inputs
  cmd = [sys.executable, "-c", "from ift_jax.cli import main; main()", "train", "--config=configs/tiny.py",
         f"--workdir={tmp_path}", f"--config.model.path={model}", f"--config.data.source={data / 'nope.jsonl'}",
         f"--config.data.templates={data / 'templates.yaml'}"]
  proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "nope.jsonl" in proc.stderr


def test_skip_nonfinite_skips_bad_updates_and_counts_them(inputs, tmp_path):
  c = _config(inputs, optim__lr=1e30, optim__clip_norm=1e30, train__skip_nonfinite=True, train__eval_every=100)
  train.train(c, tmp_path)
  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  skipped = [r["step"] for r in rows if r.get("train/skipped")]
  assert skipped and max(r["step"] for r in rows) == c.train.steps  # went on to the end
  from tests.test_train import _final_params
  params = _final_params(tmp_path, c.train.steps)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_dry_run_reports_per_device_memory_that_grows_with_the_batch(inputs):
  small = train.dry_run(_config(inputs, train__batch_size=8))
  large = train.dry_run(_config(inputs, train__batch_size=32))
  from ift_jax.model import load
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(
      load.abstract_model(load.open_pretrained(inputs[0].as_posix()).cfg)[1]))
  assert small["bytes_per_device"] > 3 * 4 * n_params / 8  # at least the weights + 2 Adam moments, sharded
  assert large["bytes_per_device"] > small["bytes_per_device"]
  # the eval step holds the (replicated-per-shard) weights but no optimizer state
  assert 4 * n_params / 8 < small["eval_bytes_per_device"] < small["bytes_per_device"]


def test_held_out_templates_are_evaluated_but_never_trained_on(inputs):
  c = _config(inputs, data__holdout_templates="reviews/rating")
  tokenizer = train.load.open_pretrained(c.model.path).load_tokenizer()
  prepared = train.prepare_data(c, tokenizer)
  templates_in = lambda split: {e.template for e in prepared.examples(split)}
  assert templates_in("train") == {"reviews/sentiment"}
  assert templates_in("test") == templates_in("validation") == {"reviews/rating", "reviews/sentiment"}
  assert "  held out of training: reviews/rating" in prepared.notes
  c.data.holdout_templates = "reviews/ratings"
  with pytest.raises(UserError, match="data.holdout_templates: 'reviews/ratings' is not a template of the data; "
                                      "use source/template names from reviews/rating, reviews/sentiment"):
    train.prepare_data(c, tokenizer)


def test_auto_attention_picks_cudnn_and_splash_only_where_they_run(inputs, monkeypatch):
  from types import SimpleNamespace
  c = _config(inputs, model__compute_dtype="bfloat16")
  assert c.model.attention == "auto"
  cfg = SimpleNamespace(head_dim=64, layer_is_sliding=(False, False))
  gemma = SimpleNamespace(head_dim=256, layer_is_sliding=(True, False))
  assert train.attention_implementation(c, cfg) == "einsum"  # CPU
  monkeypatch.setattr(train.jax, "devices", lambda: [SimpleNamespace(platform="gpu")])
  assert train.attention_implementation(c, cfg) == "cudnn"
  assert train.attention_implementation(c, SimpleNamespace(head_dim=256, layer_is_sliding=())) == "einsum"  # > cuDNN 9
  c.model.compute_dtype = "float32"
  assert train.attention_implementation(c, cfg) == "einsum"  # cuDNN's flash attention is 16-bit only
  monkeypatch.setattr(train.jax, "devices", lambda: [SimpleNamespace(platform="tpu")])
  assert train.attention_implementation(c, SimpleNamespace(head_dim=128, layer_is_sliding=())) == "splash"
  assert train.attention_implementation(c, cfg) == "einsum"  # heads of 64: older JAX splash kernels refuse them
  assert train.attention_implementation(c, gemma) == "splash"  # its sliding layers get the window kernel
  c.model.attention = "jax"
  assert train.attention_implementation(c, cfg) == "jax"
  c.model.attention = "splash"
  assert train.attention_implementation(c, cfg) == "splash"  # forced, even for heads of 64
  monkeypatch.setattr(train.jax, "devices", lambda: [SimpleNamespace(platform="gpu")])
  with pytest.raises(UserError, match="model.attention='splash' is a TPU kernel and this run is on gpu"):
    train.attention_implementation(c, cfg)


def test_auto_compute_dtype_is_float32_on_cpu_bfloat16_on_accelerators(inputs, monkeypatch):
  from types import SimpleNamespace
  c = _config(inputs)
  c.model.compute_dtype = "auto"
  train.validate_config(c)
  assert train.compute_dtype_name(c) == "float32"  # this suite's CPU devices
  monkeypatch.setattr(train.jax, "devices", lambda: [SimpleNamespace(platform="gpu")])
  assert train.compute_dtype_name(c) == "bfloat16"
  cfg = SimpleNamespace(head_dim=64, layer_is_sliding=())
  assert train.attention_implementation(c, cfg) == "cudnn"  # auto sees the resolved dtype
  c.model.compute_dtype = "float32"
  assert train.compute_dtype_name(c) == "float32"
