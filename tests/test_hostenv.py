"""The entry points' restart with huge-page malloc: exactly once, same process, same arguments, user's choice kept."""

import os
import subprocess
import sys

import pytest

from ift_jax import hostenv

_PROBE = ("import os, sys; print(os.getpid(), os.environ.get('GLIBC_TUNABLES'), sys.argv[1:], flush=True); "
          "from ift_jax import hostenv; hostenv.use_huge_pages(); print('after', os.getpid(), flush=True)")


def _probe(env_tunables):
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  if env_tunables is not None:
    env["GLIBC_TUNABLES"] = env_tunables
  out = subprocess.run([sys.executable, "-c", _PROBE, "train", "--flag=1"], env=env, capture_output=True,
                       text=True, check=True, timeout=60).stdout
  return out.splitlines()


@pytest.mark.skipif(not hostenv.wants_restart({}), reason="only Linux with glibc restarts")
def test_restarts_once_with_the_tunable_keeping_pid_and_arguments():
  first, second, after = _probe(None)
  pid = first.split()[0]
  assert first == f"{pid} None ['train', '--flag=1']"
  assert second == f"{pid} {hostenv.HUGE_PAGES} ['train', '--flag=1']"
  assert after == f"after {pid}"


def test_a_tunable_the_user_set_is_left_alone():
  first, after = _probe("glibc.malloc.hugetlb=0")
  assert first.split()[1] == "glibc.malloc.hugetlb=0"
  assert after.startswith("after ")
  assert not hostenv.wants_restart({"GLIBC_TUNABLES": ""})
