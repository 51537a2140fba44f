"""Checkpoints that fail cost only themselves: restoring skips (and moves aside) the unreadable
ones, a full disk is one line saying how much space the run needs, and orbax's threads and event
loops report either fault once instead of as a wall of tracebacks.

  state = restore_newest_readable(manager, workdir, args_of_step)  # None: start from step 0
  try: ... manager.save(...) ...
  except Exception as error:
    if is_disk_full(error): raise disk_full(directory, workdir, keep, state_bytes)
"""
from __future__ import annotations

import asyncio
import errno
import glob
import logging
import os
import re
import shutil
import threading
from typing import Any, Dict

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint._src import asyncio_utils as orbax_asyncio
from etils import epath

from moe_jax import routers

STATE = routers.STATE


class NoReadableCheckpoint(RuntimeError):
  """Every checkpoint of a run failed to restore (each was moved aside); the message says so."""


UNREADABLE = "checkpoints_unreadable"  # where unreadable checkpoints go, beside checkpoints/


def reason_of(error: BaseException) -> str:
  """Why a restore failed, in one line: tensorstore's status line when a cause has one
  ("OUT_OF_RANGE: Error reading ..."; orbax's wrapper prints the whole array spec), else the
  error's own first line."""
  chain = [error]
  while (chain[-1].__cause__ or chain[-1].__context__) is not None:
    chain.append(chain[-1].__cause__ or chain[-1].__context__)
  firsts = [next((line.strip() for line in str(e).splitlines() if line.strip()), "")
            for e in chain]
  status = [line for line in firsts if re.match(r"^[A-Z_]{4,}: ", line)]
  return (status or firsts)[0] or type(error).__name__


def stored_state_names(abstract_state: Dict[str, Any], checkpoints: ocp.CheckpointManager,
                       step: int) -> Dict[str, Any]:
  """abstract_state as checkpoint `step` names its entries: the router state under
  routers.LEGACY_STATE in a checkpoint written before the rename (routers.renamed_state undoes
  it after the restore)."""
  handler = ocp.PyTreeCheckpointHandler()  # the item's own: its metadata, nothing restored
  try:
    stored = handler.metadata(epath.Path(os.fspath(checkpoints.directory)) / str(step) / "state")
  except FileNotFoundError:  # a damaged checkpoint: the restore says why
    return abstract_state
  finally:
    handler.close()
  if routers.LEGACY_STATE not in stored.tree:
    return abstract_state
  return {routers.LEGACY_STATE if key == STATE else key: value
          for key, value in abstract_state.items()}


def restore_newest_readable(checkpoints: ocp.CheckpointManager, workdir: str, args_of_step):
  """The newest checkpoint that restores (None when there is none at all); args_of_step(step):
  its restore args.

  A checkpoint that fails to restore (a truncated or missing file, lost metadata) costs only
  itself: one line says which step and why, the step moves to <workdir>/checkpoints_unreadable/
  (nothing is deleted) and the next older one is tried. Raises NoReadableCheckpoint when every
  checkpoint failed.
  """
  unreadable = []
  while (step := checkpoints.latest_step()) is not None:
    try:
      return checkpoints.restore(step, args=args_of_step(step))
    except Exception as error:  # orbax and tensorstore raise many types for damaged files
      reason = reason_of(error)
    aside = os.path.join(workdir, UNREADABLE, str(step))
    while os.path.exists(aside):  # an earlier unreadable copy of the same step stays
      aside += "+"
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(aside), exist_ok=True)
      os.rename(os.path.join(os.fspath(checkpoints.directory), str(step)), aside)
    sync_global_devices(f"unreadable checkpoint {step}")
    checkpoints.reload()
    unreadable.append(step)
    print(f"Checkpoint step {step} is unreadable ({reason}); moved to {aside}", flush=True)
  if unreadable:
    raise NoReadableCheckpoint(
        f"no checkpoint of {workdir} is readable: steps {', '.join(map(str, unreadable))} "
        f"moved to {os.path.join(workdir, UNREADABLE)}; running again starts from step 0")
  return None


class DiskFull(RuntimeError):
  """The disk filled up while the run wrote (a checkpoint, most often); the message says how much
  space the run needs and where. The partial checkpoint is removed, the complete ones kept."""


def is_disk_full(error: BaseException) -> bool:
  """Whether `error` or a cause of it is "no space left on device" (Python's OSError ENOSPC, or
  tensorstore's RESOURCE_EXHAUSTED with the OS error in its text)."""
  while error is not None:
    if (isinstance(error, OSError) and error.errno == errno.ENOSPC) or (
        "No space left on device" in str(error)):
      return True
    error = error.__cause__ or error.__context__
  return False


def _megabytes(size: float) -> str:
  return f"{size / 2**20:.1f} MB"


def disk_full(directory: str, workdir: str, keep: int, state_bytes: int) -> DiskFull:
  """The DiskFull of a run whose disk filled up, its checkpoint manager closed: removes the
  partial checkpoints orbax left in `directory` (<step>.orbax-checkpoint-tmp*, which a rerun does
  not resume from) and says how much space the run needs: keep + 1 checkpoints (a new one is
  written before the oldest is deleted) of the size of the newest complete one (before the first,
  the train state's bytes)."""
  partial = sorted(glob.glob(os.path.join(directory, "*.orbax-checkpoint-tmp*")))
  if jax.process_index() == 0:
    for path in partial:
      shutil.rmtree(path, ignore_errors=True)
  steps = [int(name) for name in os.listdir(directory) if name.isdigit()]
  last = max(steps, default=None)
  size = state_bytes if last is None else sum(
      os.lstat(os.path.join(root, name)).st_blocks * 512
      for root, _, names in os.walk(os.path.join(directory, str(last))) for name in names)
  saving = "".join(f" saving step {os.path.basename(path).split('.')[0]}" for path in partial)
  kept = "no checkpoint yet" if last is None else f"step {last} kept"
  return DiskFull(
      f"no space left on device in {workdir}{saving} (free: "
      f"{_megabytes(shutil.disk_usage(directory).free)}): the run needs about "
      f"{_megabytes((keep + 1) * size)} there for its checkpoints ({keep + 1} of "
      f"{_megabytes(size)}: keep_checkpoints={keep} and the one being written); the partial "
      f"checkpoint was removed, {kept}: free space and run the same command to resume")


def _run_sync_draining(coro):
  """orbax's run of a coroutine on a fresh event loop, which then waits for the loop's other
  tasks before closing it. When one tensorstore read or write failed (a truncated checkpoint
  file, a full disk), orbax closed the loop while the others were pending: each printed a
  "RuntimeError: Event loop is closed" traceback as it completed (176 after one truncated file),
  and the coroutines left unfinished printed more at exit."""
  loop = asyncio.new_event_loop()
  try:
    asyncio.set_event_loop(loop)
    return loop.run_until_complete(coro)
  finally:
    pending = asyncio.all_tasks(loop)
    if pending:
      loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    asyncio.set_event_loop(None)
    loop.close()


class _ReportedFaults(logging.Filter):
  """Drops orbax's logs of a full disk at any level (a traceback from each of its threads, and a
  warning from a write that failed after the others: seen once in 3 fresh-clone test runs): the
  run reports it in one line (DiskFull)."""

  def filter(self, record: logging.LogRecord) -> bool:
    if "orbax" not in record.pathname:
      return True
    return not (is_disk_full(record.exc_info[1]) if record.exc_info else
                "No space left on device" in record.getMessage())


# orbax's private function (orbax-checkpoint 0.12.8), hence the check: without the replacement
# a failed read or write is only noisier.
if hasattr(orbax_asyncio, "_run_sync_via_new_loop"):
  orbax_asyncio._run_sync_via_new_loop = _run_sync_draining
logging.getLogger("absl").addFilter(_ReportedFaults())


def _thread_exception(args: threading.ExceptHookArgs) -> None:
  """A full disk raised in one of orbax's writer threads: the run reports it in one line
  (DiskFull), without the thread's traceback; every other thread exception as Python prints it."""
  if not is_disk_full(args.exc_value):
    _default_thread_hook(args)


_default_thread_hook = threading.excepthook
threading.excepthook = _thread_exception


def sync_global_devices(name: str) -> None:
  """Waits for every process of a multi-process run (nothing to wait for with one)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
