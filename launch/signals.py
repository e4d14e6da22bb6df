"""Ctrl-C and SIGTERM (preemption) stop a run like each other: a ``KeyboardInterrupt``
at the next safe point, so that the loop saves a checkpoint and exits.

A signal that arrives during a checkpoint save (:func:`deferred`) is held until the
save is complete -- interrupting orbax mid-write leaves its event loop closed under
running threads, which then print pages of tracebacks -- and raised right after.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
from typing import Iterator

PARENT_ENV = "BILEVEL_DIE_WITH_PARENT"  # set by a sweep to its pid for its children
_PR_SET_PDEATHSIG = 1

_state = {"deferring": 0, "pending": None}


def _handler(signum, frame):
  if _state["deferring"]:
    _state["pending"] = signum
    return
  raise KeyboardInterrupt


def install() -> None:
  """SIGTERM and SIGINT raise ``KeyboardInterrupt``, except inside :func:`deferred`."""
  if threading.current_thread() is not threading.main_thread():
    return
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, _handler)


@contextlib.contextmanager
def deferred(raise_after: bool = True) -> Iterator[None]:
  """Holds SIGTERM/SIGINT for the duration; raises ``KeyboardInterrupt`` after it when
  one arrived (``raise_after``), else forgets it (the run is stopping anyway)."""
  _state["deferring"] += 1
  try:
    yield
  finally:
    _state["deferring"] -= 1
    pending, _state["pending"] = _state["pending"], None
    if pending is not None and raise_after and not _state["deferring"]:
      raise KeyboardInterrupt


def die_with_parent() -> None:
  """When started by a sweep (``$BILEVEL_DIE_WITH_PARENT`` = its pid): receive SIGTERM
  when the sweep dies, even by ``kill -9`` (Linux ``PR_SET_PDEATHSIG``), and stop at
  once if it is already gone. The SIGTERM then saves a checkpoint like any other."""
  parent = os.environ.pop(PARENT_ENV, "")
  if not parent or not sys.platform.startswith("linux"):
    return
  libc = ctypes.CDLL(None, use_errno=True)
  libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
  if str(os.getppid()) != parent:  # the sweep died before prctl took effect
    sys.exit(130)


__all__ = ["PARENT_ENV", "deferred", "die_with_parent", "install"]
