"""Checkpoints of a training run: orbax ``CheckpointManager`` with a small, safe API.

A checkpoint at step ``s`` (directory ``<workdir>/checkpoints/<s>/``) holds

* ``state`` -- the whole :class:`bilevel.train.TrainState` (step, params, solver
  params such as learned feedback weights, optimizer state, skipped count) and
  the averaged (Polyak/EMA) parameters, as one orbax pytree;
* ``host`` -- JSON host state: the data sampler position (``seed``, ``step``:
  batches are pure functions of them), elapsed wall time, counters.

Writes are atomic: orbax writes into a temporary directory and renames it when
complete, so a run killed mid-save leaves the previous checkpoints intact (the
unfinished temporary directory is ignored). The last ``keep`` checkpoints are
kept. :meth:`Checkpointer.restore` tries the newest checkpoint first; a corrupt
or unreadable one is moved aside to ``<workdir>/checkpoints_corrupt/`` with a
warning and the previous one is used.
"""

from __future__ import annotations

import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import numpy as np

PyTree = Any


def _ocp():
  import orbax.checkpoint as ocp  # noqa: PLC0415 -- heavy import, only when used
  return ocp


def _abstract(tree: PyTree) -> PyTree:
  def one(x):
    if isinstance(x, jax.Array):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    x = np.asarray(x)
    return jax.ShapeDtypeStruct(x.shape, x.dtype)
  return jax.tree.map(one, tree)


def _pack(state: Any, average: Optional[Any]) -> dict:
  """TrainState (a NamedTuple) and the average -> nested dicts with readable names."""
  tree = {"train": dict(state._asdict())}
  if average is not None:
    tree["average"] = dict(average._asdict()) if hasattr(average, "_asdict") else average
  return tree


class Checkpointer:
  """Save / restore (TrainState, averaged params, host dict) under ``directory``."""

  def __init__(self, directory: os.PathLike | str, keep: int = 3,
               warn: Optional[Callable[[str], None]] = None):
    self.directory = Path(directory).absolute()
    self.keep = int(keep)
    self._manager = None
    self._warn = warn or (lambda msg: warnings.warn(msg, RuntimeWarning, stacklevel=3))

  # orbax objects are created lazily so that constructing one is free.
  @property
  def manager(self):
    if self._manager is None:
      ocp = _ocp()
      options = ocp.CheckpointManagerOptions(
          max_to_keep=self.keep, create=True, enable_async_checkpointing=False,
          cleanup_tmp_directories=True)
      self._manager = ocp.CheckpointManager(self.directory, options=options)
    return self._manager

  def close(self) -> None:
    if self._manager is not None:
      self._manager.wait_until_finished()
      self._manager.close()
      self._manager = None

  def steps(self) -> list[int]:
    """Complete checkpoints, oldest first."""
    if not self.directory.exists():
      return []
    return sorted(self.manager.all_steps())

  def path(self, step: int) -> Path:
    return self.directory / str(step)

  def save(self, step: int, state: Any, average: Optional[PyTree], host: dict) -> Path:
    """Saves synchronously (returns when the checkpoint is complete on disk)."""
    ocp = _ocp()
    step = int(step)
    if step in set(self.manager.all_steps()):
      return self.path(step)
    args = ocp.args.Composite(state=ocp.args.StandardSave(_pack(state, average)),
                              host=ocp.args.JsonSave(dict(host, step=step)))
    self.manager.save(step, args=args, force=True)
    self.manager.wait_until_finished()
    return self.path(step)

  def _restore_step(self, step: int, template: dict) -> tuple[dict, dict]:
    ocp = _ocp()
    args = ocp.args.Composite(state=ocp.args.StandardRestore(_abstract(template)),
                              host=ocp.args.JsonRestore())
    out = self.manager.restore(step, args=args)
    return out["state"], dict(out["host"])

  def restore(self, state_template: Any, average_template: Optional[Any]
              ) -> Optional[tuple[int, Any, Optional[dict], dict]]:
    """Newest readable checkpoint as ``(step, state, average, host)``; None if none.

    ``state_template`` gives structure, shapes, dtypes and shardings (e.g. a
    freshly initialised state); ``average_template`` likewise for the averaged
    parameters (None when averaging is off). ``average`` is returned as a dict
    ``{"params", "count"}``, or None if the checkpoint has none (averaging was
    turned on later). Unreadable checkpoints are moved to ``checkpoints_corrupt/``
    with a warning, falling back to older ones.
    """
    if average_template is None:  # the checkpoint may still hold one: allow both
      params = state_template.params
      average_template = {"params": params, "count": np.zeros((), np.int32)}
      want_average = False
    else:
      want_average = True
    variants = [_pack(state_template, average_template), _pack(state_template, None)]
    bad: list[int] = []
    result = None
    for step in reversed(self.steps()):
      error = None
      for template in variants:
        try:
          tree, host = self._restore_step(step, template)
          break
        except Exception as e:  # noqa: BLE001 -- any failure means: try the next
          error = error or e
      else:
        msg = (f"checkpoint {self.path(step)} is corrupt or incomplete "
               f"({type(error).__name__}: {_first_line(error)}); skipping it and "
               "trying the previous one")
        self._warn(msg)
        bad.append(step)
        continue
      state = type(state_template)(**tree["train"])
      average = tree.get("average") if want_average else None
      result = (step, state, average, host)
      break
    if bad:
      self._quarantine(bad)
    return result

  def _quarantine(self, steps: list[int]) -> None:
    """Moves unreadable checkpoints out of the manager's directory."""
    self.close()
    if jax.process_index() == 0:
      aside = self.directory.parent / f"{self.directory.name}_corrupt"
      aside.mkdir(parents=True, exist_ok=True)
      for step in steps:
        src = self.path(step)
        if src.exists():
          dst = aside / f"{step}-{int(time.time())}"
          shutil.move(str(src), str(dst))
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # noqa: PLC0415
      multihost_utils.sync_global_devices("bilevel_checkpoint_quarantine")


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return text.splitlines()[0][:200] if text else ""


def load_params(workdir: os.PathLike | str, step: Optional[int] = None,
                which: str = "params") -> PyTree:
  """Parameters (``which='params'``, ``'solver_params'`` or ``'average'``) of a
  run's checkpoint as numpy arrays, without the model (for analysis and tests)."""
  ocp = _ocp()
  directory = Path(workdir).absolute() / "checkpoints"
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
      create=False, enable_async_checkpointing=False))
  try:
    steps = sorted(manager.all_steps())
    if not steps:
      raise FileNotFoundError(f"no checkpoint under {directory}; run training first")
    step = steps[-1] if step is None else int(step)
    # Restore onto this process's first device, whatever topology saved it
    # (e.g. a multi-host run), from the shapes and dtypes in the metadata.
    meta = ocp.StandardCheckpointer().metadata(directory / str(step) / "state").item_metadata
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          meta)
    out = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))
  finally:
    manager.close()
  tree = out["state"]
  if which == "average":
    return jax.tree.map(np.asarray, tree.get("average", {}).get("params"))
  return jax.tree.map(np.asarray, tree["train"][which])


__all__ = ["Checkpointer", "load_params"]
