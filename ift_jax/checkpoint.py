"""Orbax checkpoints in the workdir: full weights, optimizer state, step, loader position, resolved config.

    DIR/checkpoints/<step>/   the last `keep` checkpoints (rerunning the same command resumes from the newest)
    DIR/best/<step>/          the best one by a validation metric: its parameters and step only, which is all
                              that evaluation and export read (Adam's moments would triple its size on disk)

Each save is atomic (Orbax writes to a temporary directory and renames it when complete), so a run killed while
saving leaves the previous checkpoint as the latest. Restoring takes the target shardings of the current mesh,
so a checkpoint written on one mesh restores onto another.
"""

from __future__ import annotations

import logging
import pathlib
from typing import Any

import orbax.checkpoint as ocp

from ift_jax.errors import UserError

_log = logging.getLogger(__name__)


def _manager(directory: pathlib.Path, keep: int) -> ocp.CheckpointManager:
  # Both managers may save the same step at once; on several processes their barriers need distinct names.
  multiprocessing = ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=directory.name)
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True,
                                         multiprocessing_options=multiprocessing)
  return ocp.CheckpointManager(directory.absolute(), options=options, item_names=("state", "loader", "config"))


def _save_args(state: Any, loader_state: dict[str, Any], config: dict[str, Any]) -> ocp.args.Composite:
  return ocp.args.Composite(state=ocp.args.StandardSave(state), loader=ocp.args.JsonSave(loader_state),
                            config=ocp.args.JsonSave(config))


class Checkpointer:
  """Saves and restores (state, loader position, config) under a workdir."""

  def __init__(self, workdir: str | pathlib.Path, *, keep: int):
    self.workdir = pathlib.Path(workdir)
    self._latest = _manager(self.workdir / "checkpoints", keep)
    self._best = _manager(self.workdir / "best", 1)

  @classmethod
  def open_read_only(cls, workdir: str | pathlib.Path) -> "Checkpointer":
    """For eval, export and generate: a run directory's checkpoints, never pruned (nothing is saved)."""
    path = pathlib.Path(workdir)
    if not str(workdir) or not (path / "checkpoints").is_dir():
      raise UserError(f"--workdir={str(workdir)!r}: not a run directory with checkpoints; pass the --workdir of "
                      "`ift-jax train` (or --model=PATH to use a model without training)")
    return cls(path, keep=1_000_000)

  def latest_step(self) -> int | None:
    return self._latest.latest_step()

  def best_step(self) -> int | None:
    return self._best.latest_step()

  def save(self, step: int, state: Any, loader_state: dict[str, Any], config: dict[str, Any], *,
           best: bool = False) -> None:
    """Starts an asynchronous save; `wait()` (or the next save) makes sure it is finished."""
    self._latest.save(step, args=_save_args(state, loader_state, config))
    if best:
      self._best.save(step, args=_save_args({"step": state["step"], "params": state["params"]}, loader_state,
                                            config))

  def restore(self, abstract_state: Any, *, step: int | str = "latest") -> tuple[Any, dict, dict]:
    """(state, loader state, config) of `step` ("latest" or a number), laid out as `abstract_state`."""
    if step == "best":
      raise ValueError("the best checkpoint holds parameters only; read it with restore_params")
    manager, number = self._resolve(step)
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), loader=ocp.args.JsonRestore(),
                              config=ocp.args.JsonRestore())
    restored = manager.restore(number, args=args)
    return restored["state"], dict(restored["loader"]), dict(restored["config"])

  def restore_newest_valid(self, abstract_state: Any) -> tuple[Any, dict, dict]:
    """Restores the newest checkpoint that reads back whole, skipping (with a warning) damaged newer ones."""
    for number in sorted(self._latest.all_steps(), reverse=True):
      try:
        return self.restore(abstract_state, step=number)
      except UserError:
        raise
      except Exception as e:  # a damaged checkpoint fails in many ways (tensorstore, JSON, missing files)
        _log.warning("checkpoint %s/checkpoints/%d is unreadable (%s: %s); falling back to the one before",
                     self.workdir, number, type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
    raise UserError(f"{self.workdir}/checkpoints: no readable checkpoint; move the folder away to start over")

  def restore_params(self, params_target: Any, *, step: int | str = "latest") -> tuple[Any, int]:
    """Only the parameters of `step` (not the optimizer state), laid out as `params_target`; and the step."""
    manager, number = self._resolve(step)
    folder = pathlib.Path(manager.directory) / str(number) / "state"
    item = {"params": params_target}
    args = ocp.args.PyTreeRestore(item=item, partial_restore=True,
                                  restore_args=ocp.checkpoint_utils.construct_restore_args(item))
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as reader:
      return reader.restore(folder, args=args)["params"], number

  def restore_config(self, *, step: int | str = "latest") -> dict[str, Any]:
    manager, number = self._resolve(step)
    restored = manager.restore(number, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return dict(restored["config"])

  def _resolve(self, step: int | str) -> tuple[ocp.CheckpointManager, int]:
    if step == "best":
      manager, number = self._best, self._best.latest_step()
    elif step == "latest":
      manager, number = self._latest, self._latest.latest_step()
    else:
      manager, number = self._latest, int(step)
      if number not in manager.all_steps():
        raise UserError(f"--checkpoint={step}: no such step in {self.workdir}/checkpoints; have "
                        f"{sorted(manager.all_steps())}")
    if number is None:
      raise UserError(f"{self.workdir}: no {step} checkpoint; train first (ift-jax train --workdir=...)")
    return manager, number

  def wait(self) -> None:
    self._latest.wait_until_finished()
    self._best.wait_until_finished()

  def close(self) -> None:
    self._latest.close()
    self._best.close()
