"""Ends a run that stops making progress, instead of letting it hang.

A multi-host job hangs, with no error anywhere, when one process stops advancing while staying alive — blocked on
a storage read, a deadlocked thread, or a collective that the other processes never enter: its heartbeats go on,
so the coordination service sees nothing wrong, and every other process waits for it in its next collective
(gloo, NCCL and TPU collectives have no timeout of their own). The training loop marks each step, evaluation
batch and checkpoint save as progress, `ift-jax eval` each generation or scoring batch, `ift-jax export` each
tensor it gathers and writes, `ift-jax generate` each batch; when none comes for
`timeout_s`, the watchdog prints every thread's stack and a one-line error naming what was awaited, and ends the
process (`distributed.exit_now`), which ends the job.
"""

from __future__ import annotations

import functools
import sys
import threading
import time
import traceback
from typing import Callable

from ift_jax import distributed

EXIT_CODE = 4  # ift-jax's exit codes: 1 unexpected error, 2 bad input, 3 non-finite loss, 4 no progress


class Watchdog:
  """`beat(doing)` after each unit of progress; `doing` names what is awaited next (the error quotes it)."""

  def __init__(self, timeout_s: float, *, where: str = "",
               on_stall: Callable[[str, float], None] | None = None):
    """`where` names this process in the error (given, not asked of JAX when firing: the stuck main thread
    may hold JAX's locks)."""
    self.timeout_s = timeout_s
    self._on_stall = on_stall or functools.partial(_report_and_exit, where=where)
    self._lock = threading.Lock()
    self._deadline = time.monotonic() + timeout_s
    self._doing = "starting"
    self._closed = threading.Event()
    self._thread = None
    if timeout_s > 0:  # 0 turns it off
      self._thread = threading.Thread(target=self._watch, name="ift-jax-watchdog", daemon=True)
      self._thread.start()

  def beat(self, doing: str) -> None:
    with self._lock:
      self._deadline, self._doing = time.monotonic() + self.timeout_s, doing

  def close(self) -> None:
    self._closed.set()
    if self._thread is not None:
      self._thread.join()

  def __enter__(self) -> "Watchdog":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def _watch(self) -> None:
    while True:
      with self._lock:
        deadline, doing = self._deadline, self._doing
      left = deadline - time.monotonic()
      if left <= 0:
        self._on_stall(doing, self.timeout_s)
        return
      if self._closed.wait(min(left, 1.0)):  # wakes at least each second to see beats that moved the deadline
        return


def _report_and_exit(doing: str, timeout_s: float, *, where: str) -> None:
  frames = sys._current_frames()
  for thread in threading.enumerate():
    if thread.ident in frames and thread is not threading.current_thread():
      print(f"--- stack of thread {thread.name}:\n" + "".join(traceback.format_stack(frames[thread.ident])),
            file=sys.stderr)
  where = f" ({where})" if where else ""
  print(f"error: no progress for {timeout_s:g} s while {doing}{where}; a process is stuck or the processes "
        "took different paths (stacks above); rerun the same command (a training run resumes from its last "
        "checkpoint), or raise --hang_timeout if this phase is legitimately that slow", file=sys.stderr)
  distributed.exit_now(EXIT_CODE)
