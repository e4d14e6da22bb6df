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
kept. :meth:`Checkpointer.restore` tries the newest checkpoint first; an
unreadable one is moved aside to ``<workdir>/checkpoints_corrupt/`` with a
warning and the previous one is used; a readable one of another structure (a
changed config) raises :class:`CheckpointMismatch`.
"""

from __future__ import annotations

import collections
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


def _item_metadata(path: Path) -> PyTree:
  """The saved tree's array metadata (closing orbax's checkpointer and its threads:
  one left open prints 'Event loop is closed' tracebacks at exit)."""
  checkpointer = _ocp().StandardCheckpointer()
  try:
    return checkpointer.metadata(path).item_metadata
  finally:
    checkpointer.close()


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

  def _metadata(self, step: int) -> dict:
    """``{path: shape}`` of the saved state (raises if the checkpoint is unreadable)."""
    return shapes(_item_metadata(self.path(step) / "state"))

  def restore(self, state_template: Any, average_template: Optional[Any],
              mismatch_is_corrupt: bool = False
              ) -> Optional[tuple[int, Any, Optional[dict], dict]]:
    """Newest readable checkpoint as ``(step, state, average, host)``; None if none.

    ``state_template`` gives structure, shapes, dtypes and shardings (e.g. a
    freshly initialised state); ``average_template`` likewise for the averaged
    parameters (None when averaging is off). ``average`` is returned as a dict
    ``{"params", "count"}``, or None if the checkpoint has none (averaging was
    turned on later).

    A checkpoint whose files cannot be read is corrupt: it is moved to
    ``checkpoints_corrupt/`` with a warning naming the error, and the previous one
    is tried. A readable checkpoint that holds a different structure (the config
    changed the model, the solver state, ...) raises :class:`CheckpointMismatch`:
    it is not corrupt, and nothing is moved -- unless ``mismatch_is_corrupt`` (the
    config did not change, so the files must be damaged).
    """
    want_average = average_template is not None
    if not want_average:  # the checkpoint may still hold one: allow both
      average_template = {"params": state_template.params,
                          "count": np.zeros((), np.int32)}
    variants = [_pack(state_template, average_template), _pack(state_template, None)]
    bad: list[int] = []
    result = None
    for step in reversed(self.steps()):
      try:
        saved = self._metadata(step)
        tree, host = _restore_matching(lambda t, s=step: self._restore_step(s, t), saved,
                                  variants, self.path(step))
      except CheckpointMismatch as error:
        if not mismatch_is_corrupt:
          raise
        self._warn(f"checkpoint {self.path(step)} is corrupt: it cannot be read as this "
                   f"(unchanged) config's state ({_first_line(error)}); moving it to "
                   f"{self.directory.name}_corrupt/ and trying the previous one")
        bad.append(step)
        continue
      except Exception as error:  # noqa: BLE001 -- unreadable: try the previous one
        self._warn(f"checkpoint {self.path(step)} is corrupt or incomplete "
                   f"({type(error).__name__}: {_first_line(error)}); moving it to "
                   f"{self.directory.name}_corrupt/ and trying the previous one")
        bad.append(step)
        continue
      average = tree.get("average") if want_average else None
      result = (step, type(state_template)(**tree["train"]), average, host)
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


class CheckpointMismatch(RuntimeError):
  """A readable checkpoint holds a different structure than the run expects: the
  config changed in a way the checkpoint cannot continue (not a corruption)."""


def _key_name(k: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def shapes(tree: PyTree) -> dict:
  """``{'a/b/0': shape}`` of a pytree of arrays or array metadata; a typed PRNG key
  has the shape of its key data (as orbax saves it)."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    dtype = getattr(leaf, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
      leaf = jax.eval_shape(jax.random.key_data, leaf)
    out["/".join(_key_name(k) for k in path)] = tuple(getattr(leaf, "shape", None) or ())
  return out


def _signature(shape_map: dict) -> collections.Counter:
  """The multiset of shapes (paths differ between orbax's metadata and the template)."""
  return collections.Counter(shape_map.values())


def _mismatch(saved: dict, variants: list, where: Path) -> CheckpointMismatch:
  """The error for a readable checkpoint that fits no template variant."""
  want = shapes(variants[0])
  params = [f"{k}: shape {saved[k]} there, {want[k]} now" for k in sorted(set(saved) & set(want))
            if k.startswith("train/params/") and None not in (saved[k], want[k])
            and saved[k] != want[k]]
  params += [f"{k}: not in this config's model" for k in sorted(saved)
             if k.startswith("train/params/") and k not in want]
  detail = params[0] if params else (f"{len(saved)} arrays there, {len(want)} now: the "
                                     "optimizer or solver state differs")
  return CheckpointMismatch(
      f"checkpoint {where} holds a different model or training state than this config "
      f"builds ({detail}): the config changed in a way the run cannot resume")


def _restore_matching(restore: Callable, saved: dict, variants: list, where: Path):
  """Restores with the template variant whose shapes match the saved metadata (an
  error then means unreadable files); CheckpointMismatch when none matches -- no
  restore is tried (a failed orbax restore leaves threads that print tracebacks)."""
  for variant in variants:
    if _signature(shapes(variant)) == _signature(saved):
      return restore(variant)
  raise _mismatch(saved, variants, where)


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
    meta = _item_metadata(directory / str(step) / "state")
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


__all__ = ["CheckpointMismatch", "Checkpointer", "load_params", "shapes"]
