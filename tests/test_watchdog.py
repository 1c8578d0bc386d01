"""The watchdog that ends a run making no progress (end to end, with a stuck process: test_multiprocess)."""

import threading
import time

from ift_jax import watchdog


def _recording_watchdog(timeout_s):
  stalls, fired = [], threading.Event()
  dog = watchdog.Watchdog(timeout_s, on_stall=lambda doing, t: (stalls.append((doing, t)), fired.set()))
  return dog, stalls, fired


def test_beats_keep_it_quiet_and_silence_fires_once_naming_what_was_awaited():
  dog, stalls, fired = _recording_watchdog(0.5)
  with dog:
    for step in range(8):  # 1.6 s of progress, each beat well within the timeout
      dog.beat(f"train step {step}")
      time.sleep(0.2)
    assert stalls == []
    start = time.monotonic()
    assert fired.wait(5)
    assert 0.2 <= time.monotonic() - start < 2  # the last beat was 0.2 s before: 0.5 s, to the second's poll
    assert stalls == [("train step 7", 0.5)]
    time.sleep(1.2)
    assert len(stalls) == 1


def test_closing_stops_it_and_zero_turns_it_off():
  dog, stalls, _ = _recording_watchdog(0.3)
  dog.close()
  time.sleep(0.6)
  assert stalls == [] and not dog._thread.is_alive()
  off, stalls, _ = _recording_watchdog(0)
  time.sleep(0.2)
  off.close()
  assert stalls == [] and off._thread is None
