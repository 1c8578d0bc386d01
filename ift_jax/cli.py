"""`ift-jax train | eval | render | export | generate`: flags → config → one package call. Short on purpose.

    ift-jax train  [--config=configs/NAME.py] [--workdir=DIR] [--config.section.key=value ...] [--dry_run]
    ift-jax eval   --workdir=DIR [--checkpoint=latest|best|STEP[,...]] [--k_shot=3] [--splits=validation,test]
    ift-jax render [--config=...] [--split=train] [--num_examples=3]
    ift-jax export --workdir=DIR [--checkpoint=latest|best|STEP] --out=HF_DIR [--dtype=bfloat16|float32]
    ift-jax export --model=PATH --out=HF_DIR   # convert a model (a .gguf file, say) without training
    ift-jax generate --model=PATH | --workdir=DIR [--checkpoint=...] --prompt=TEXT ... | --prompts_file=FILE
        [--template=SOURCE/NAME] [--max_new_tokens=64] [--temperature=0] [--top_p=1] [--seed=0] [--stop=TEXT ...]
"""

from __future__ import annotations

import logging
import os
import pathlib
import sys
import traceback

from absl import app, flags
from ml_collections import config_flags

from ift_jax import hostenv
from ift_jax.errors import UserError

_DEFAULT_CONFIG = str(pathlib.Path(__file__).parent / "configs" / "default.py")
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Config file with get_config().")
_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Run directory: checkpoints, metrics, TensorBoard.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "latest", "eval, export, generate: latest, best or a step number "
                                  "(eval: a comma-separated list compares several).")
_K_SHOT = flags.DEFINE_integer("k_shot", None, "eval: solved train examples in the base model's few-shot prompt "
                               "(default: the run config's eval.k_shot, 3; 0 = no few-shot row).")
_SPLITS = flags.DEFINE_string("splits", None, "eval: comma-separated eval splits (default validation,test).")
_SPLIT = flags.DEFINE_enum("split", "train", ["train", "validation", "test"], "render: which split.")
_NUM = flags.DEFINE_integer("num_examples", 3, "render: how many examples to show.")
_DRY_RUN = flags.DEFINE_boolean("dry_run", False, "train: compile the step and print per-device memory (and the "
                                "largest batch that fits where the device reports its capacity); no training.")
_OUT = flags.DEFINE_string("out", "", "export: the Hugging Face folder to write (new or empty).")
_DTYPE = flags.DEFINE_enum("dtype", "auto", ["auto", "bfloat16", "float32", "float16"],
                           "export: weight dtype; auto = the source model's (float32 for GGUF).")
_MODEL = flags.DEFINE_string("model", "", "export, generate: use this model.path instead of a workdir checkpoint.")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "generate: a prompt (repeatable).")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", "", "generate: a text file of prompts, one a line.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "generate (and eval, for free-text templates): the most "
                                "tokens generated per prompt.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "generate: 0 = greedy; otherwise sample at this temperature.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "generate: sample from the smallest token set with this much mass.")
_SEED = flags.DEFINE_integer("seed", 0, "generate: the sampling seed.")
_STOP = flags.DEFINE_multi_string("stop", [], "generate: cut a completion at this string (repeatable).")
_TEMPLATE = flags.DEFINE_string("template", "", "generate: render prompts through this template's prompt: "
                                "source/name from the catalog or FILE.yaml:source/name; --prompts_file is then "
                                "JSON lines of records, and each --prompt fills a one-field template. Its stop "
                                "strings apply.")
# Multi-host: named like jax.distributed.initialize's arguments; leave unset on one host or on Cloud TPU.
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0, reachable by all.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job (one per host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0 .. num_processes-1.")
_INIT_TIMEOUT = flags.DEFINE_integer("initialization_timeout", 300, "Seconds to wait for all processes to join.")
_HEARTBEAT = flags.DEFINE_integer("heartbeat_timeout", 100, "Seconds of silence after which a process counts as "
                                  "dead and the job's other processes are ended.")
_HANG = flags.DEFINE_integer("hang_timeout", 1800, "train, eval, export, generate: seconds without progress (a "
                            "step, an evaluation or generation batch, a checkpoint save, an exported tensor) after "
                            "which the run prints every thread's stack and exits 4, ending a multi-host job that "
                            "would otherwise hang; 0 = never.")

COMMANDS = ("train", "eval", "render", "export", "generate")


def _main(argv: list[str]) -> int:
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f"usage: ift-jax {{{'|'.join(COMMANDS)}}} [flags]; got {argv[1:]}")
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every file operation at INFO
  absl_logging.use_python_logging()
  logging.getLogger("ift_jax").setLevel(logging.INFO)
  from ift_jax import train  # after flag parsing: importing jax reads XLA flags from the environment
  from ift_jax import distributed
  try:
    distributed.initialize(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                           process_id=_PROCESS_ID.value, timeout_s=_INIT_TIMEOUT.value,
                           heartbeat_timeout_s=_HEARTBEAT.value)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  code = _run_command(argv[1], train)
  import jax
  if code and jax.process_count() > 1:  # failed here alone, maybe: end the job rather than stall it
    distributed.exit_now(code)
  return code


def _run_command(command: str, train) -> int:
  try:
    if command == "train" and _DRY_RUN.value:
      import json
      print(json.dumps(train.dry_run(_CONFIG.value)))
    elif command == "train":
      train.train(_CONFIG.value, _WORKDIR.value, hang_timeout_s=_HANG.value)
    elif command == "eval":
      from ift_jax import task_eval
      task_eval.evaluate_tasks(_WORKDIR.value, hang_timeout_s=_HANG.value, checkpoints=_CHECKPOINT.value,
                               k_shot=_K_SHOT.value, splits=_SPLITS.value,
                               max_new_tokens=_MAX_NEW.value if _MAX_NEW.present else None)
      print(f"wrote {_WORKDIR.value}/eval/report.md, metrics.json, predictions.jsonl and charts")
    elif command == "export":
      from ift_jax import export
      with _watchdog() as dog:
        export.export(_OUT.value, dtype=_DTYPE.value, model=_MODEL.value, workdir=_WORKDIR.value,
                      checkpoint=_CHECKPOINT.value, progress=dog.beat)
    elif command == "generate":
      with _watchdog() as dog:
        _generate(dog.beat)
    else:
      print(train.render(_CONFIG.value, split=_SPLIT.value, num_examples=_NUM.value))
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except train.NonFiniteLoss as e:
    print(f"error: {e}", file=sys.stderr)
    return 3
  except Exception:
    import jax
    if jax.process_count() == 1:
      raise
    traceback.print_exc()
    return 1
  return 0


def _watchdog():
  """The --hang_timeout watchdog of `export` and `generate` (train and eval start their own)."""
  from ift_jax import distributed, watchdog
  return watchdog.Watchdog(_HANG.value, where=distributed.this_process())


def _generate(progress) -> None:
  import json
  from ift_jax import generate
  prompts = generate.read_prompts(_PROMPT.value, _PROMPTS_FILE.value, _TEMPLATE.value)
  stop = list(_STOP.value)
  if _TEMPLATE.value:
    from ift_jax.data import templates
    stop += templates.find_template(_TEMPLATE.value).stop
  for line in generate.generate_cli(
      prompts, model=_MODEL.value, workdir=_WORKDIR.value, checkpoint=_CHECKPOINT.value,
      max_new_tokens=_MAX_NEW.value, sampling=generate.Sampling(_TEMPERATURE.value, _TOP_P.value),
      seed=_SEED.value, stop=stop, progress=progress):
    print(json.dumps(line))


def main() -> None:
  """The `ift-jax` command. Restarts itself once with huge-page malloc first (see `ift_jax.hostenv`)."""
  hostenv.use_huge_pages()
  # Batched tokenization (data preparation) uses every core; nothing forks after it (subprocesses exec at once).
  os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
  app.run(_main)
