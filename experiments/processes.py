"""Child processes that the experiment drivers (the sweep, the GPU-check runner) start and stop
as a group: a run's compilers and helpers go with it."""

import os
import signal
import subprocess
import sys
from typing import Any


def _own_group_dying_with_parent() -> None:
  """In the child, before exec: a session of its own (a stop or timeout signals its whole
  group), and on Linux SIGKILL when the parent dies, however it dies (even by SIGKILL), so
  that no child outlives a stopped driver and writes on where a rerun resumes."""
  os.setsid()
  if sys.platform == 'linux':
    import ctypes  # pylint: disable=g-import-not-at-top
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG


def start_group(argv: list[str], **popen: Any) -> subprocess.Popen:
  """subprocess.Popen(argv, **popen) in its own process group, dying with this process."""
  return subprocess.Popen(argv, preexec_fn=_own_group_dying_with_parent, **popen)


def stop_group(proc: subprocess.Popen, grace_s: float = 10.0) -> int:
  """SIGTERM to the child's group (a benchmark can finish writing), SIGKILL after grace_s;
  returns its exit status."""
  os.killpg(proc.pid, signal.SIGTERM)
  try:
    return proc.wait(timeout=grace_s)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    return proc.wait()
