"""The training loop behind ``launch/run.py``: config -> trained run in a work directory.

``run(config, workdir)`` builds the Task (``problems.make_task``), the solver,
the optimizer (:mod:`launch.optim`) and a data mesh over ``config.num_devices``
devices (:func:`launch.build.build`), then initialises -- or resumes from the newest readable
checkpoint in ``workdir`` (:func:`resume`) -- and trains for ``num_steps`` (or
``num_epochs * steps_per_epoch``) steps (:func:`train`). Batches are pure
functions of ``(seed, step)``, so a resumed run sees exactly the data the
uninterrupted run would have seen and ends with identical parameters.

Each policy is a small function over the fixed :class:`Setup` and the mutable
:class:`LoopState`: :func:`flush` (fetch metrics, failure policy of
:mod:`launch.policy`), :func:`log_window` (records), :func:`evaluate`,
:func:`save` (checkpoints), :func:`interrupted`, :func:`make_summary`.

Work directory::

    config.json     resolved config (plus the command that made it)
    metrics.jsonl   one JSON object per line: {"step", "split": "train"|"eval", ...}
    summary.json    final train/eval metrics, wall time, s/step, status
    curves.png      training curves
    checkpoints/    orbax checkpoints (last ``keep_checkpoints``)
    tensorboard/    event files, when tensorboardX (or torch) is installed

Failure handling: a non-finite loss, gradient or parameter stops the run
(``on_nonfinite='stop'``) naming the step and the last good checkpoint, or
skips that batch and counts it (``'skip'``); a fixed-point non-convergence
rate above ``max_nonconverged_fraction`` over a logging window stops the run.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import numpy as np
from tqdm.auto import tqdm

from launch import optim, policy, records, signals
from launch.build import LoopState, Setup, build, initial_state
from launch.checkpoint import CheckpointMismatch, Checkpointer
from launch.config import ConfigError, to_dict, validate
from launch.devices import agree, place_batch, replicate, to_host
from launch.policy import TrainingFailure
from launch.workdir import check_config_compatible, config_changed, lock, unlock, write_config

PyTree = Any


# ----- resume and checkpoints --------------------------------------------------------------

def resume(setup: Setup, ckpt: Checkpointer, loop: LoopState) -> int:
  """Restores the newest readable checkpoint into ``loop``; returns the start step."""
  changed = config_changed(setup.workdir, to_dict(setup.config))
  try:  # a checkpoint that fits no template is a config change only if the config changed
    restored = ckpt.restore(loop.state, loop.average, mismatch_is_corrupt=not changed)
  except CheckpointMismatch as e:
    raise ConfigError(f"{e}; pass another --workdir, or delete {setup.workdir} to start "
                      "over") from e
  if restored is None:
    if setup.primary and setup.metrics_path.exists():
      setup.metrics_path.unlink()  # a run that never checkpointed restarts from scratch
    setup.log(f"no checkpoint found in {ckpt.directory}, starting from step 0")
    return 0
  step, loop.state, restored_avg, host = restored
  if setup.averaging:
    loop.average = (optim.Averaged(restored_avg["params"], restored_avg["count"])
                    if restored_avg is not None
                    else replicate(optim.init_average(loop.state.params), setup.mesh))
  loop.elapsed_before = float(host.get("elapsed_s", 0.0))
  loop.resumed_from, loop.last_good = step, (step, ckpt.path(step))
  if setup.primary:
    records.truncate_metrics(setup.metrics_path, step)
    setup.log(f"resuming from {ckpt.path(step)} (step {step}/{setup.total})")
  losses = [r["loss"] for r in records.read_jsonl(setup.metrics_path)
            if r.get("split") == "train" and isinstance(r.get("loss"), float)]
  loop.lowest_loss = min(losses, default=float("inf"))
  return loop.step()


def host_state(setup: Setup, loop: LoopState, step: int) -> dict:
  """The JSON part of a checkpoint: data position, elapsed time, counters."""
  return {"seed": int(setup.config.seed), "data_step": int(step),
          "elapsed_s": loop.elapsed_before + (time.time() - loop.t_session),
          "skipped": int(to_host(loop.state.skipped))}


def save(setup: Setup, ckpt: Checkpointer, loop: LoopState, step: int,
         stopping: bool = False) -> None:
  """A checkpoint of step ``step``; Ctrl-C/SIGTERM wait until it is written."""
  with signals.deferred(raise_after=not stopping):
    path = ckpt.save(step, loop.state, loop.average, host_state(setup, loop, step))
    loop.last_good, loop.t_saved = (step, path), time.time()


def checkpoint_due(setup: Setup, loop: LoopState, s: int, logged: bool) -> bool:
  """By steps, at the end, or (at logging steps) when ``checkpoint_every_minutes``
  passed since the last save -- decided by process 0 for every process."""
  every = int(setup.config.checkpoint_every_steps)
  if (every > 0 and s % every == 0) or s == setup.total:
    return True
  minutes = float(setup.config.checkpoint_every_minutes)
  if not (logged and minutes > 0):
    return False
  return agree(time.time() - loop.t_saved >= 60.0 * minutes)


def fail(loop: LoopState, step: int, what: str, fix: str, status: str = "failed") -> None:
  raise TrainingFailure(policy.failure_message(step, what, fix, loop.last_good), status)


# ----- metrics, failure policy, records -----------------------------------------------------

def host_record(metrics: dict) -> dict:
  """A step's fetched metrics as Python bools and floats."""
  return {k: (bool(v) if np.asarray(v).dtype == np.bool_ else float(v))
          for k, v in metrics.items()}


def flush(setup: Setup, loop: LoopState, step: int, do_log: bool) -> None:
  """Fetches pending metrics, runs the failure checks, logs a line if ``do_log``."""
  fetched = to_host([m for _, m in loop.pending_dev])
  for (s, _), m in zip(loop.pending_dev, fetched):
    rec = host_record(m)
    loop.pending_host.append(rec)
    if rec.get("loss", float("inf")) < loop.lowest_loss:  # NaN compares False
      loop.lowest_loss = rec["loss"]
    if policy.is_nonfinite(rec) and not setup.skip:
      log_window(setup, loop, s)
      fail(loop, s, *policy.nonfinite_failure(rec, setup.config.solver))
    if setup.config.on_invalid_examples == "stop" and rec.get("dropped_examples", 0) > 0:
      log_window(setup, loop, s)
      fail(loop, s, *policy.invalid_examples_failure(rec, setup.config.solver), "diverged")
  loop.pending_dev = []
  if not bool(to_host(setup.params_finite(loop.state.params))):  # skipping cannot fix this
    fail(loop, step, *policy.PARAMS_NOT_FINITE)
  jax.block_until_ready(loop.state.params)
  if loop.steps_in_window:
    loop.window_times.append((time.time() - loop.t_window) / loop.steps_in_window)
  loop.t_window, loop.steps_in_window = time.time(), 0
  if do_log:
    log_window(setup, loop, step)


def log_window(setup: Setup, loop: LoopState, step: int) -> None:
  """Averages the pending records into one ``train`` line; stops on non-convergence."""
  if not loop.pending_host:
    return
  rec = records.mean_records(loop.pending_host)
  # Skipped non-finite batches have their own policy (on_nonfinite): they do not
  # count towards the non-convergence window.
  finite = [r for r in loop.pending_host if not policy.is_nonfinite(r)]
  conv = records.mean_records(finite) if finite else {}
  n = len(finite)
  loop.pending_host = []
  rec["skipped_total"] = int(to_host(loop.state.skipped))
  loop.last_train = rec
  if setup.primary:
    records.append_jsonl(setup.metrics_path, {
        "step": step, "split": "train", "epoch": step / setup.spe, "time": time.time(),
        "window_steps": n, **{k: records.finite_or_none(v) for k, v in rec.items()}})
    setup.tb.scalars("train", step, rec)
    if setup.bar is not None and not setup.bar.disable:
      setup.bar.set_postfix({records.SHORT_NAMES[k]: records.fmt(rec[k])
                             for k in records.KEY_METRICS if k in rec}, refresh=False)
  stop = (policy.convergence_failure(conv, float(setup.config.max_nonconverged_fraction), n,
                                     setup.config.solver)
          or policy.loss_growth_failure(rec, loop.lowest_loss,
                                        float(setup.config.max_loss_growth)))
  if stop is not None:
    fail(loop, step, *stop, "diverged")


def evaluate(setup: Setup, loop: LoopState, step: int) -> dict:
  """Evaluates the (averaged) parameters; records an ``eval`` line."""
  if setup.task.evaluate is None:
    loop.evaluated_at = step
    return {}
  params = loop.average.params if setup.averaging else loop.state.params
  out = {k: float(v) for k, v in setup.task.evaluate(to_host(params), setup.solver).items()}
  # Only after the result exists: an interrupted evaluation must not count as done.
  loop.evaluated_at = step
  if setup.primary:
    records.append_jsonl(setup.metrics_path, {
        "step": step, "split": "eval", "epoch": step / setup.spe,
        **{k: records.finite_or_none(v) for k, v in out.items()}})
    setup.tb.scalars("eval", step, out)
  return out


# ----- the loop ------------------------------------------------------------------------------

def one_step(setup: Setup, loop: LoopState, step: int) -> None:
  """One optimizer step on the batch of ``step`` (state and average in one assignment,
  so that an interrupt never leaves them out of step)."""
  batch = place_batch(setup.task.train_batch(step), setup.mesh)
  new_state, metrics = setup.step_fn(loop.state, batch)
  average = (setup.avg_update(loop.average, new_state.params, np.int32(step))
             if setup.averaging else loop.average)
  loop.state, loop.average = new_state, average
  loop.pending_dev.append((step + 1, metrics))


def after_step(setup: Setup, ckpt: Checkpointer, loop: LoopState, s: int) -> None:
  """Logging, evaluation and checkpoint due after step ``s`` (1-based)."""
  config = setup.config
  eval_every = int(config.eval_every_epochs) * setup.spe
  do_log = s % int(config.log_every_steps) == 0 or s == setup.total
  do_eval = eval_every > 0 and s % eval_every == 0 and s != setup.total
  do_ckpt = checkpoint_due(setup, loop, s, do_log)
  if do_log or do_eval or do_ckpt:
    flush(setup, loop, s, do_log)
  if do_eval:
    loop.last_eval = evaluate(setup, loop, s)
    setup.say(f"eval @ step {s} (epoch {s / setup.spe:g}): "
              + ", ".join(f"{k}={records.fmt(v)}" for k, v in loop.last_eval.items()))
  if do_ckpt:
    save(setup, ckpt, loop, s)
  if do_log or do_eval or do_ckpt:
    loop.t_window = time.time()  # time training steps only, not evals and saves


def train(setup: Setup, ckpt: Checkpointer, loop: LoopState, start: int) -> None:
  """Steps ``start .. total``, then the final evaluation."""
  for step in range(start, setup.total):
    one_step(setup, loop, step)
    if step == start:  # exclude compilation from the timings
      jax.block_until_ready(loop.state.params)
      loop.t_window, loop.steps_in_window = time.time(), 0
    else:
      loop.steps_in_window += 1
    after_step(setup, ckpt, loop, step + 1)
    if setup.bar is not None:
      setup.bar.update(1)
  if loop.evaluated_at != setup.total:
    loop.last_eval = evaluate(setup, loop, setup.total)
  if not loop.last_train:
    loop.last_train = records.last_logged(setup.metrics_path, "train")


def finished_before(setup: Setup, loop: LoopState, start: int) -> Optional[dict]:
  """The summary when a completed run is re-run (nothing to do); picks up a final
  evaluation that was recorded before the summary was written."""
  if start < setup.total:
    return None
  done = records.read_summary(setup.workdir)
  if done.get("status") == "completed" and done.get("steps") == start:
    return done
  evals = [r for r in records.read_jsonl(setup.metrics_path)
           if r.get("split") == "eval" and r.get("step") == start]
  if evals:  # trained and evaluated, but stopped before the summary was written
    loop.evaluated_at = start
    loop.last_eval = {k: v for k, v in evals[-1].items() if k not in ("step", "split", "epoch")}
  return None


def interrupted(setup: Setup, ckpt: Checkpointer, loop: LoopState) -> None:
  """Ctrl-C / SIGTERM: status, and a checkpoint of the work since the last one."""
  loop.status, loop.reason = "interrupted", "interrupted (Ctrl-C or SIGTERM)"
  done = loop.step()
  if loop.evaluated_at == setup.total and done == setup.total:
    loop.status, loop.reason = "completed", ""  # only the bookkeeping was left
    loop.last_train = loop.last_train or records.last_logged(setup.metrics_path, "train")
  if done > (loop.last_good[0] if loop.last_good else 0) and bool(
      to_host(setup.params_finite(loop.state.params))):
    with contextlib.suppress(Exception):
      save(setup, ckpt, loop, done, stopping=True)
      setup.log(f"saved checkpoint {ckpt.path(done)} before stopping")


def make_summary(setup: Setup, loop: LoopState) -> dict:
  config, status, last_good = setup.config, loop.status, loop.last_good
  kept = status in ("completed", "interrupted")
  now = time.time()
  return {
      "config": setup.label, "problem": config.problem, "solver": config.solver,
      "seed": int(config.seed), "status": status, "reason": loop.reason,
      "steps": loop.step() if kept else (last_good[0] if last_good else 0),
      "total_steps": setup.total, "steps_per_epoch": setup.spe,
      "epochs": setup.total / setup.spe,
      "wall_time_s": loop.elapsed_before + (now - loop.t_session),
      "session_time_s": now - loop.t_session,
      "seconds_per_step": (statistics.median(loop.window_times) if loop.window_times
                           else None),
      "train": loop.last_train, "eval": loop.last_eval if status == "completed" else {},
      "skipped_batches": (int(to_host(loop.state.skipped)) if status == "completed"
                          else None),
      "resumed_from": loop.resumed_from, "num_devices": setup.n_dev,
      "process_count": jax.process_count(), "workdir": str(setup.workdir),
      "checkpoint": str(last_good[1]) if last_good else None,
      "polyak": setup.averaging, "notes": setup.task.notes, "finished_at": now,
  }


def write_results(setup: Setup, summary: dict) -> None:
  """``summary.json`` and ``curves.png`` (process 0)."""
  if not setup.primary:
    return
  records.atomic_write_json(setup.workdir / "summary.json", summary)
  try:
    records.plot_curves(setup.metrics_path, setup.workdir / "curves.png",
                        title=f"{setup.label} / {setup.config.solver} / seed {setup.config.seed}")
  except Exception as e:  # noqa: BLE001 -- a plot must never lose a run
    setup.log(f"warning: could not plot the curves ({type(e).__name__}: {e})")


# ----- one call ------------------------------------------------------------------------------

def prepare(config: Any, workdir: Path, config_name: str,
            log: Callable[[str], None]) -> Setup:
  """Validates and builds (a ConfigError before anything is written), then takes the
  work directory's lock and checks that a new config may resume what is there."""
  validate(config)
  setup = build(config, workdir, config_name or config.problem, log)
  if setup.primary:
    setup.lock_fd = lock(workdir)
  try:
    if (workdir / "checkpoints").exists():
      check_config_compatible(workdir, to_dict(config), log)
  except BaseException:
    unlock(setup.lock_fd)
    raise
  return setup


def begin(setup: Setup, ckpt: Checkpointer, loop: LoopState, config_name: str,
          command: str) -> int:
  """Resumes (or not), then records ``config.json``; returns the first step."""
  try:
    first = resume(setup, ckpt, loop)
  except BaseException:
    ckpt.close()
    raise
  if setup.primary:  # the config can run in this work directory: record it
    write_config(setup.workdir, config_name, command, to_dict(setup.config))
  return first


def train_to_end(setup: Setup, ckpt: Checkpointer, loop: LoopState,
                 first: int) -> Optional[dict]:
  """Trains from ``first``, applying the failure and interrupt policies; returns the
  old summary when the run had already completed."""
  try:
    done = finished_before(setup, loop, first)
    if done is not None:
      setup.log(f"{setup.workdir}: already complete at step {first}; nothing to train "
                "(delete the directory or pass another --workdir to train again)")
      return done
    train(setup, ckpt, loop, first)
  except TrainingFailure as e:
    loop.status, loop.reason = e.status, str(e)
  except KeyboardInterrupt:
    interrupted(setup, ckpt, loop)
  finally:
    setup.bar.close()
    setup.tb.close()
    with signals.deferred(raise_after=False):
      ckpt.close()
  return None


def attach_outputs(setup: Setup, start: int, progress: Optional[bool]) -> None:
  """Progress bar (and the log function that writes above it) and TensorBoard."""
  if progress is None:
    progress = sys.stderr.isatty()
  shown = bool(progress and setup.primary)
  setup.bar = tqdm(total=setup.total, initial=start, disable=not shown, dynamic_ncols=True,
                   unit="step", desc=f"{setup.label}/{setup.config.solver}")
  setup.say = setup.bar.write if shown else setup.log
  setup.tb = records.TensorBoard(setup.workdir / "tensorboard", enabled=setup.primary)


def run(config: Any, workdir: Any, *, config_name: str = "", command: str = "",
        progress: Optional[bool] = None, log: Callable[[str], None] = print) -> dict:
  """Trains (or resumes) the run described by ``config`` in ``workdir``.

  Returns the summary dict (also written to ``workdir/summary.json``). Raises
  :class:`launch.config.ConfigError` for a config that cannot run (before
  compiling, nothing written), :class:`TrainingFailure` when a failure check stops
  the run (``.status``: 'failed' or 'diverged'), ``KeyboardInterrupt`` when
  interrupted (after saving a checkpoint).
  """
  t_session = time.time()
  setup = prepare(config, Path(workdir).absolute(), config_name, log)
  try:
    loop = LoopState(*initial_state(setup), t_session=t_session)
    ckpt = Checkpointer(setup.workdir / "checkpoints", keep=config.keep_checkpoints,
                        warn=lambda m: log(f"warning: {m}"))
    first = begin(setup, ckpt, loop, config_name, command)
    attach_outputs(setup, first, progress)
    done = train_to_end(setup, ckpt, loop, first)
    if done is not None:
      return done
    summary = make_summary(setup, loop)
    write_results(setup, summary)
  finally:
    unlock(setup.lock_fd)
  if loop.status in ("failed", "diverged"):
    raise TrainingFailure(loop.reason, loop.status)
  if loop.status == "interrupted":
    raise KeyboardInterrupt
  return summary


__all__ = ["LoopState", "Setup", "TrainingFailure", "build", "evaluate", "flush",
           "log_window", "resume", "run", "save", "train"]
