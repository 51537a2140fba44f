"""One writer per run: an exclusive lock on `<workdir>/run.lock` while a run trains in it.

The lock is an fcntl.flock, which the kernel releases when its holder exits in any way (kill -9
included), so a lock left by a dead run is simply taken over; the file keeps the holder's pid
and host for the message a second writer stops with. flock is local to one machine (and
unreliable over NFS): a multi-host run takes it on process 0 only.

`interrupt_on_sigterm`: the entry points treat SIGTERM (a scheduler's stop, a dying sweep's
signal to its members) like Ctrl-C, so a run finishes a pending checkpoint save. Inside
`deferred_interrupts` (a run, from the moment it holds its workdir's lock) the first of them only
asks the loop to stop at its next step (`stop_requested`): a KeyboardInterrupt raised at an
arbitrary point, inside orbax's asynchronous save or the data loader, left a run hung (2 of 18
SIGTERMs sent to a tiny run at various points, none of 6 since) or printing a RuntimeError from a
thread pool as it exited; raised during the run's setup it could land in a garbage-collection
callback, which Python swallows, and a sweep member went on training after its runner was
killed (once in a loaded test run).
`stop_with_parent`: a sweep member (started with PARENT_ENV set to the runner's pid) asks Linux
for that SIGTERM when its runner dies, so a killed sweep leaves no member training on its own.
"""
from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import signal
import socket
import sys
from typing import Optional, TextIO

LOCK_FILE = "run.lock"
PARENT_ENV = "MOE_JAX_STOP_WITH"  # a sweep member's runner pid: the member stops when it dies
PR_SET_PDEATHSIG = 1  # linux/prctl.h


class Busy(RuntimeError):
  """Another live process holds the workdir's lock; the message names it."""


def acquire(workdir: str) -> TextIO:
  """Locks `workdir` (which must exist) for this process; the lock lasts until the returned file
  is closed or the process exits. Raises Busy naming the holder."""
  path = os.path.join(workdir, LOCK_FILE)
  lock = open(path, "a+")  # not "w": that would erase the holder's name before we know
  try:
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    lock.seek(0)
    holder = lock.read().strip() or "another process"
    lock.close()
    raise Busy(f"{workdir} is in use by {holder} ({path}); stop that run or wait for it to end")
  lock.seek(0)
  lock.truncate()
  lock.write(f"pid {os.getpid()} on host {socket.gethostname()}\n")
  lock.flush()
  return lock


def holder(workdir: str) -> Optional[str]:
  """"pid N on host H" of the live process that holds `workdir`'s lock, None when none does."""
  path = os.path.join(workdir, LOCK_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as lock:
    try:
      fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)  # released when the file closes
    except BlockingIOError:
      return lock.read().strip() or "another process"
  return None


_deferral = {"active": False, "requested": False}


def _interrupt(signum, frame):
  if _deferral["active"] and not _deferral["requested"]:
    _deferral["requested"] = True
    return
  raise KeyboardInterrupt


def interrupt_on_sigterm() -> None:
  """From now on SIGTERM raises KeyboardInterrupt in the main thread, as Ctrl-C does (both
  deferred inside `deferred_interrupts`)."""
  signal.signal(signal.SIGTERM, _interrupt)
  signal.signal(signal.SIGINT, _interrupt)


@contextlib.contextmanager
def deferred_interrupts():
  """Within it, the first Ctrl-C or SIGTERM (once interrupt_on_sigterm is on) sets
  `stop_requested` instead of raising; a second one raises KeyboardInterrupt at once."""
  _deferral.update(active=True, requested=False)
  try:
    yield
  finally:
    _deferral.update(active=False, requested=False)


def stop_requested() -> bool:
  """Whether a deferred Ctrl-C or SIGTERM asks the loop to stop."""
  return _deferral["requested"]


def stop_with_parent() -> None:
  """With PARENT_ENV set: SIGTERM this process when its parent dies (Linux prctl
  PR_SET_PDEATHSIG; set here rather than between fork and exec, which is unsafe in a threaded
  parent), or at once if the parent has already died."""
  parent = os.environ.get(PARENT_ENV)
  if not parent or not sys.platform.startswith("linux"):
    return
  ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
  if os.getppid() != int(parent):  # it died before the request took effect
    os.kill(os.getpid(), signal.SIGTERM)
