"""The training loop behind ``launch/run.py``: config -> trained run in a work directory.

``run(config, workdir)`` builds the Task (``problems.make_task``), the solver,
the optimizer (:mod:`launch.optim`) and a data mesh over ``config.num_devices``
devices (:func:`build`), then initialises -- or resumes from the newest readable
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
import dataclasses
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import numpy as np
from tqdm.auto import tqdm

import problems
from bilevel import tree as tu
from bilevel.train import data_mesh, init_train_state, make_train_step
from launch import optim, policy, records
from launch.checkpoint import Checkpointer
from launch.config import ConfigError, build_solver, optimizer_config, to_dict, validate
from launch.devices import is_primary, place_batch, replicate, to_host
from launch.policy import TrainingFailure
from launch.workdir import check_config_compatible, write_config

PyTree = Any


@dataclasses.dataclass
class Setup:
  """What a run is made of; fixed once built."""
  config: Any
  workdir: Path
  label: str
  task: Any
  solver: Any
  total: int
  spe: int
  n_dev: int
  mesh: Any
  optimizer: Any
  polyak_start: int
  avg_update: Callable
  step_fn: Callable = None
  params_finite: Callable = None
  primary: bool = True
  log: Callable[[str], None] = print
  say: Callable[[str], None] = print
  bar: Any = None
  tb: Any = None

  @property
  def metrics_path(self) -> Path:
    return self.workdir / "metrics.jsonl"

  @property
  def averaging(self) -> bool:
    return self.polyak_start >= 0

  @property
  def skip(self) -> bool:
    return self.config.on_nonfinite == "skip"


@dataclasses.dataclass
class LoopState:
  """Everything the loop changes as it goes."""
  state: Any
  average: Any
  t_session: float
  elapsed_before: float = 0.0
  resumed_from: Optional[int] = None
  last_good: Optional[tuple[int, Path]] = None
  pending_dev: list = dataclasses.field(default_factory=list)
  pending_host: list = dataclasses.field(default_factory=list)
  last_train: dict = dataclasses.field(default_factory=dict)
  last_eval: dict = dataclasses.field(default_factory=dict)
  window_times: list = dataclasses.field(default_factory=list)
  t_window: float = 0.0
  steps_in_window: int = 0
  evaluated_at: int = -1
  status: str = "completed"
  reason: str = ""

  def step(self) -> int:
    return int(to_host(self.state.step))


def resolve_total_steps(config: Any, steps_per_epoch: int) -> int:
  if config.num_steps:
    return int(config.num_steps)
  return int(config.num_epochs) * int(steps_per_epoch)


# ----- building --------------------------------------------------------------------------

def make_task(config: Any):
  """``problems.make_task(config)``; a problem's complaint is a ConfigError."""
  try:
    return problems.make_task(config)
  except (ValueError, KeyError, FileNotFoundError) as e:
    msg = e.args[0] if e.args else str(e)
    raise ConfigError(f"problem {config.problem!r}: {msg}") from e


def device_count(config: Any) -> int:
  """Devices of the data mesh; ConfigError when the config asks for what cannot run."""
  n_avail = len(jax.devices())
  n_dev = int(config.num_devices) or n_avail
  if n_dev > n_avail:
    raise ConfigError(
        f"config.num_devices={n_dev} but only {n_avail} device(s) exist; lower it (0 = "
        "all), or on CPU pass --num_cpu_devices N to launch/run.py")
  if config.batch_size % n_dev:
    raise ConfigError(
        f"batch_size {config.batch_size} is not divisible by the {n_dev} devices; set "
        f"--config.batch_size to a multiple of {n_dev} or --config.num_devices")
  return n_dev


def build(config: Any, workdir: Path, label: str, log: Callable[[str], None]) -> Setup:
  """Task, solver, optimizer, mesh and step function (errors: ConfigError, before compiling)."""
  task = make_task(config)
  solver = build_solver(config)
  spe = int(task.steps_per_epoch)
  total = resolve_total_steps(config, spe)
  if total <= 0:
    raise ConfigError("the run has 0 steps; set --config.num_epochs or "
                      "--config.num_steps to a positive number")
  opt_cfg = optimizer_config(config)
  n_dev = device_count(config)
  polyak_epoch = int(opt_cfg["polyak_start_epoch"])
  polyak_start = polyak_epoch * spe if polyak_epoch >= 0 else -1
  setup = Setup(config=config, workdir=workdir, label=label, task=task, solver=solver,
                total=total, spe=spe, n_dev=n_dev, mesh=data_mesh(n_dev),
                optimizer=optim.make_optimizer(opt_cfg, total, spe),
                polyak_start=polyak_start,
                avg_update=optim.make_average_update(polyak_start, opt_cfg["polyak_decay"]),
                primary=is_primary(), log=log, say=log)
  setup.step_fn = make_train_step(task.problem, solver, setup.optimizer, mesh=setup.mesh,
                                  skip_nonfinite=setup.skip)
  setup.params_finite = jax.jit(tu.tree_all_finite)
  return setup


def initial_state(setup: Setup) -> tuple[Any, Any]:
  """Fresh (TrainState, average) replicated on the mesh."""
  state = init_train_state(setup.task.problem, setup.solver, setup.optimizer,
                           jax.random.key(setup.config.seed), setup.task.example)
  state = replicate(state, setup.mesh)
  average = (replicate(optim.init_average(state.params), setup.mesh)
             if setup.averaging else None)
  return state, average


# ----- resume and checkpoints --------------------------------------------------------------

def resume(setup: Setup, ckpt: Checkpointer, loop: LoopState) -> int:
  """Restores the newest readable checkpoint into ``loop``; returns the start step."""
  restored = ckpt.restore(loop.state, loop.average)
  if restored is None:
    if setup.primary and setup.metrics_path.exists():
      setup.metrics_path.unlink()  # a run that never checkpointed restarts from scratch
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
  return loop.step()


def host_state(setup: Setup, loop: LoopState, step: int) -> dict:
  """The JSON part of a checkpoint: data position, elapsed time, counters."""
  return {"seed": int(setup.config.seed), "data_step": int(step),
          "elapsed_s": loop.elapsed_before + (time.time() - loop.t_session),
          "skipped": int(to_host(loop.state.skipped))}


def save(setup: Setup, ckpt: Checkpointer, loop: LoopState, step: int) -> None:
  path = ckpt.save(step, loop.state, loop.average, host_state(setup, loop, step))
  loop.last_good = (step, path)


def fail(loop: LoopState, step: int, what: str, fix: str) -> None:
  raise TrainingFailure(policy.failure_message(step, what, fix, loop.last_good))


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
    if policy.is_nonfinite(rec) and not setup.skip:
      log_window(setup, loop, s)
      fail(loop, s, *policy.nonfinite_failure(rec, setup.config.solver))
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
  n = len(loop.pending_host)
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
  stop = policy.convergence_failure(rec, float(setup.config.max_nonconverged_fraction), n,
                                    setup.config.solver)
  if stop is not None:
    fail(loop, step, *stop)


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
  ckpt_every = int(config.checkpoint_every_steps)
  do_log = s % int(config.log_every_steps) == 0 or s == setup.total
  do_eval = eval_every > 0 and s % eval_every == 0 and s != setup.total
  do_ckpt = (ckpt_every > 0 and s % ckpt_every == 0) or s == setup.total
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
      save(setup, ckpt, loop, done)
      setup.log(f"saved checkpoint {ckpt.path(done)} before stopping")


def make_summary(setup: Setup, loop: LoopState) -> dict:
  config, status, last_good = setup.config, loop.status, loop.last_good
  now = time.time()
  return {
      "config": setup.label, "problem": config.problem, "solver": config.solver,
      "seed": int(config.seed), "status": status, "reason": loop.reason,
      "steps": (loop.step() if status in ("completed", "interrupted")
                else (last_good[0] if last_good else 0)),
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

def prepare(config: Any, workdir: Path, config_name: str, command: str,
            log: Callable[[str], None]) -> Setup:
  """Validates, checks the work directory, builds, and records ``config.json``."""
  validate(config)
  config_dict = to_dict(config)
  if (workdir / "checkpoints").exists():
    check_config_compatible(workdir, config_dict, log)
  setup = build(config, workdir, config_name or config.problem, log)
  if setup.primary:  # the config is runnable: record it
    workdir.mkdir(parents=True, exist_ok=True)
    write_config(workdir, config_name, command, config_dict)
  return setup


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
  compiling) and :class:`TrainingFailure` when a failure check stops the run.
  """
  t_session = time.time()
  setup = prepare(config, Path(workdir).absolute(), config_name, command, log)
  loop = LoopState(*initial_state(setup), t_session=t_session)
  ckpt = Checkpointer(setup.workdir / "checkpoints", keep=config.keep_checkpoints,
                      warn=lambda m: log(f"warning: {m}"))
  start = resume(setup, ckpt, loop)
  attach_outputs(setup, start, progress)
  try:
    done = finished_before(setup, loop, start)
    if done is not None:
      log(f"{setup.workdir}: already complete at step {start}; nothing to train "
          "(delete the directory or pass another --workdir to train again)")
      return done
    train(setup, ckpt, loop, start)
  except TrainingFailure as e:
    loop.status, loop.reason = "failed", str(e)
  except KeyboardInterrupt:
    interrupted(setup, ckpt, loop)
  finally:
    setup.bar.close()
    setup.tb.close()
    ckpt.close()
  summary = make_summary(setup, loop)
  write_results(setup, summary)
  if loop.status == "failed":
    raise TrainingFailure(loop.reason)
  if loop.status == "interrupted":
    raise KeyboardInterrupt
  return summary


__all__ = ["LoopState", "Setup", "TrainingFailure", "build", "evaluate", "flush",
           "log_window", "resume", "run", "save", "train"]
