"""The training loop behind ``launch/run.py``: config -> trained run in a work directory.

``run(config, workdir)`` builds the Task (``problems.make_task``), the solver
(``solvers.get_solver``), the optimizer (:mod:`bilevel.optim`) and a data mesh
over ``config.num_devices`` devices, then initialises -- or resumes from the
newest readable checkpoint in ``workdir`` -- and trains for
``num_steps`` (or ``num_epochs * steps_per_epoch``) steps. Batches are pure
functions of ``(seed, step)``, so a resumed run sees exactly the data the
uninterrupted run would have seen and ends with identical parameters.

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
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import numpy as np

from bilevel import config as cfglib
from bilevel import optim
from bilevel import tree as tu

PyTree = Any

# Keys shown in the progress bar and the summary table, in order (those present).
KEY_METRICS = ("loss", "accuracy", "mse", "free/residual", "free/iterations",
               "controlled/iterations", "adjoint/iterations", "psi_norm")
_SHORT = {"loss": "loss", "accuracy": "acc", "mse": "mse", "free/residual": "res",
          "free/iterations": "it_free", "controlled/iterations": "it_ctl",
          "adjoint/iterations": "it_adj", "psi_norm": "|psi|"}
# Config keys that may differ when resuming in an existing work directory.
RESUMABLE_CHANGES = {"num_steps", "num_epochs", "log_every_steps", "eval_every_epochs",
                     "checkpoint_every_steps", "keep_checkpoints", "on_nonfinite",
                     "max_nonconverged_fraction", "data_dir"}


class TrainingFailure(RuntimeError):
  """The run stopped (non-finite values, non-convergence); the message says where
  and what to do. ``summary.json`` holds ``status: 'failed'`` and the reason."""


# ----- small file utilities ------------------------------------------------------

def is_primary() -> bool:
  return jax.process_index() == 0


def atomic_write_text(path: os.PathLike | str, text: str) -> None:
  """Writes ``text`` to ``path`` via a temporary file + fsync + rename."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise


def atomic_savefig(fig, path: os.PathLike | str, dpi: int = 90) -> Path:
  """Saves a matplotlib figure via a temporary file + rename, then closes it."""
  import matplotlib.pyplot as plt  # noqa: PLC0415
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
  fig.savefig(tmp, dpi=dpi)
  plt.close(fig)
  os.replace(tmp, path)
  return path


def append_jsonl(path: os.PathLike | str, record: dict) -> None:
  """Appends one complete line (single write on an O_APPEND fd, then fsync)."""
  line = (json.dumps(record, sort_keys=True, default=_json_default) + "\n").encode()
  fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
  try:
    os.write(fd, line)
    os.fsync(fd)
  finally:
    os.close(fd)


def read_jsonl(path: os.PathLike | str) -> list[dict]:
  """Complete, parseable lines of a JSON-lines file (a torn last line is ignored)."""
  path = Path(path)
  if not path.exists():
    return []
  out = []
  for line in path.read_text().splitlines():
    line = line.strip()
    if not line:
      continue
    try:
      out.append(json.loads(line))
    except json.JSONDecodeError:
      continue
  return out


def truncate_metrics(path: os.PathLike | str, last_step: int) -> None:
  """Keeps only records with ``step <= last_step`` (for a resumed run), atomically."""
  path = Path(path)
  if not path.exists():
    return
  keep = [r for r in read_jsonl(path) if int(r.get("step", 0)) <= last_step]
  atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in keep))


def _json_default(x):
  if isinstance(x, (np.generic,)):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  return repr(x)


def _finite_or_none(v: float) -> Any:
  return v if math.isfinite(v) else repr(v)


# ----- device/host plumbing ---------------------------------------------------------

def to_host(tree: PyTree) -> PyTree:
  """numpy copy of a (possibly multi-process, replicated) pytree of arrays."""
  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(x.addressable_data(0))
    return np.asarray(x)
  return jax.tree.map(one, tree)


def _global_array(mesh, spec, x: np.ndarray) -> jax.Array:
  from jax.sharding import NamedSharding  # noqa: PLC0415
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda i: x[i])


def place_batch(batch: PyTree, mesh) -> PyTree:
  """Single process: the numpy batch as is. Multi-process: a global array sharded
  over the mesh, each process supplying only its own devices' rows (every process
  computes the same batch from (seed, step))."""
  if jax.process_count() == 1:
    return batch
  from jax.sharding import PartitionSpec as P  # noqa: PLC0415
  from bilevel.train import BATCH_AXIS  # noqa: PLC0415
  return jax.tree.map(lambda a: _global_array(mesh, P(BATCH_AXIS), a), batch)


def replicate(tree: PyTree, mesh) -> PyTree:
  """Places ``tree`` replicated on every device of the mesh (any process count)."""
  from jax.sharding import PartitionSpec as P  # noqa: PLC0415
  if jax.process_count() == 1:
    from bilevel.train import replicate_on  # noqa: PLC0415
    return replicate_on(mesh, tree)
  return jax.tree.map(lambda a: _global_array(mesh, P(), to_host(a)), tree)


# ----- optional TensorBoard ------------------------------------------------------

class _TensorBoard:
  """Writes scalars when tensorboardX or torch's writer is importable; else no-op."""

  def __init__(self, logdir: Path, enabled: bool):
    self.writer = None
    if not enabled:
      return
    for mod in ("tensorboardX", "torch.utils.tensorboard"):
      try:
        module = __import__(mod, fromlist=["SummaryWriter"])
        self.writer = module.SummaryWriter(str(logdir))
        break
      except Exception:  # noqa: BLE001 -- optional dependency
        continue

  def scalars(self, split: str, step: int, metrics: dict) -> None:
    if self.writer is None:
      return
    for k, v in metrics.items():
      if isinstance(v, (int, float)) and math.isfinite(v):
        self.writer.add_scalar(f"{split}/{k}", v, step)
    self.writer.flush()

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()


# ----- the run ------------------------------------------------------------------------

def _mean_records(records: list[dict]) -> dict:
  keys = sorted({k for r in records for k in r})
  out = {}
  for k in keys:
    vals = [r[k] for r in records if k in r]
    if k.endswith("_max"):
      out[k] = float(max(vals))
    elif k == "nonfinite_update":
      out["nonfinite_updates"] = int(sum(bool(v) for v in vals))
    else:
      out[k] = float(np.mean(vals))
  return out


def _fmt(v: Any) -> str:
  if isinstance(v, float):
    if v != 0 and (abs(v) >= 1e4 or abs(v) < 1e-3):
      return f"{v:.3e}"
    return f"{v:.4g}"
  return str(v)


def summary_table(summary: dict) -> str:
  """A short plain-text table of the key results."""
  rows = [("config", summary.get("config")), ("solver", summary.get("solver")),
          ("seed", summary.get("seed")), ("status", summary.get("status")),
          ("steps", f"{summary.get('steps')}/{summary.get('total_steps')}"),
          ("wall time", f"{summary.get('wall_time_s', 0):.1f} s"),
          ("s/step (median)", _fmt(summary.get("seconds_per_step") or float("nan")))]
  for split in ("train", "eval"):
    metrics = summary.get(split) or {}
    keys = [k for k in KEY_METRICS + ("grad_norm",) if k in metrics]
    keys += sorted(k for k in metrics if k not in keys and
                   any(w in k for w in ("accuracy", "loss")) and "ci95" not in k
                   and "controlled_loss" not in k)
    for k in keys:
      if isinstance(metrics[k], (int, float)):
        rows.append((f"{split} {k}", _fmt(metrics[k])))
  if summary.get("skipped_batches"):
    rows.append(("skipped batches", summary["skipped_batches"]))
  width = max(len(r[0]) for r in rows)
  return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def plot_curves(metrics_path: os.PathLike | str, out_path: os.PathLike | str,
                title: str = "") -> Optional[Path]:
  """PNG of the training curves in ``metrics.jsonl`` (train and eval)."""
  records = read_jsonl(metrics_path)
  if not records:
    return None
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  train = [r for r in records if r.get("split") == "train"]
  evals = [r for r in records if r.get("split") == "eval"]
  panels = [k for k in ("loss", "accuracy", "mse", "free/iterations",
                        "controlled/iterations", "adjoint/iterations", "free/residual",
                        "psi_norm", "grad_norm")
            if any(k in r for r in records)][:6]
  if not panels:
    return None
  cols = min(3, len(panels))
  rows = math.ceil(len(panels) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
  fig.subplots_adjust(left=0.08, right=0.98, bottom=0.1, top=0.86, wspace=0.3, hspace=0.5)
  for ax, key in zip(axes.flat, panels):
    for recs, label, style in ((train, "train", "-"), (evals, "eval", "o-")):
      pts = [(r["step"], r[key]) for r in recs
             if key in r and isinstance(r[key], (int, float)) and math.isfinite(r[key])]
      if pts:
        xs, ys = zip(*pts)
        ax.plot(xs, ys, style, label=label, markersize=3)
    ax.set_title(key, fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=7)
    if key in ("loss", "free/residual", "mse", "grad_norm"):
      vals = [r[key] for r in records if isinstance(r.get(key), (int, float))
              and math.isfinite(r[key])]
      if vals and min(vals) > 0:
        ax.set_yscale("log")
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7)
  for ax in list(axes.flat)[len(panels):]:
    ax.axis("off")
  if title:
    fig.suptitle(title)
  return atomic_savefig(fig, out_path)


def _flatten(d: Any, prefix: str = "") -> dict:
  if not isinstance(d, dict):
    return {prefix: d}
  out = {}
  for k, v in d.items():
    out.update(_flatten(v, f"{prefix}.{k}" if prefix else k))
  return out


def _check_config_compatible(workdir: Path, config_dict: dict,
                             log: Callable[[str], None]) -> None:
  """Refuses to resume a different config, except harmless keys, or anything after
  a failed run (so that the fix can resume from the last good checkpoint)."""
  old_path = workdir / "config.json"
  if not old_path.exists():
    return
  try:
    old = _flatten(json.loads(old_path.read_text()).get("config", {}))
  except (json.JSONDecodeError, OSError):
    return
  new = _flatten(json.loads(json.dumps(config_dict, default=repr)))
  diffs = [k for k in sorted(set(old) | set(new))
           if old.get(k) != new.get(k) and k.split(".")[0] not in RESUMABLE_CHANGES]
  if not diffs:
    return
  changes = ", ".join(f"config.{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diffs)
  try:
    previous = json.loads((workdir / "summary.json").read_text()).get("status")
  except (OSError, json.JSONDecodeError):
    previous = None
  if previous == "failed":
    log(f"note: resuming a failed run with a changed config ({changes})")
    return
  k = diffs[0]
  raise cfglib.ConfigError(
      f"work directory {workdir} holds a run with a different config "
      f"(config.{k}: {old.get(k)!r} there, {new.get(k)!r} now); pass another "
      "--workdir, or delete that directory to start over")


def resolve_total_steps(config: Any, steps_per_epoch: int) -> int:
  if config.num_steps:
    return int(config.num_steps)
  return int(config.num_epochs) * int(steps_per_epoch)


def run(config: Any, workdir: os.PathLike | str, *, config_name: str = "",
        command: str = "", progress: Optional[bool] = None,
        log: Callable[[str], None] = print) -> dict:
  """Trains (or resumes) the run described by ``config`` in ``workdir``.

  Returns the summary dict (also written to ``workdir/summary.json``). Raises
  :class:`bilevel.config.ConfigError` for a config that cannot run (before
  compiling) and :class:`TrainingFailure` when a failure check stops the run.
  """
  import problems  # noqa: PLC0415
  from bilevel.checkpoint import Checkpointer  # noqa: PLC0415
  from bilevel.train import data_mesh, init_train_state, make_train_step  # noqa: PLC0415

  t_session = time.time()
  cfglib.validate(config)
  workdir = Path(workdir).absolute()
  primary = is_primary()
  config_dict = cfglib.to_dict(config)
  if (workdir / "checkpoints").exists():
    _check_config_compatible(workdir, config_dict, log)
  metrics_path = workdir / "metrics.jsonl"

  # --- build everything (errors here are config errors, raised before compiling)
  try:
    task = problems.make_task(config)
  except (ValueError, KeyError, FileNotFoundError) as e:
    msg = e.args[0] if e.args else str(e)
    raise cfglib.ConfigError(f"problem {config.problem!r}: {msg}") from e
  solver = cfglib.build_solver(config)
  spe = int(task.steps_per_epoch)
  total = resolve_total_steps(config, spe)
  if total <= 0:
    raise cfglib.ConfigError("the run has 0 steps; set --config.num_epochs or "
                             "--config.num_steps to a positive number")
  opt_cfg = cfglib.optimizer_config(config)
  optimizer = optim.make_optimizer(opt_cfg, total, spe)
  n_avail = len(jax.devices())
  n_dev = int(config.num_devices) or n_avail
  if n_dev > n_avail:
    raise cfglib.ConfigError(
        f"config.num_devices={n_dev} but only {n_avail} device(s) exist; lower it (0 = "
        "all), or on CPU pass --num_cpu_devices N to launch/run.py")
  if config.batch_size % n_dev:
    raise cfglib.ConfigError(
        f"batch_size {config.batch_size} is not divisible by the {n_dev} devices; set "
        f"--config.batch_size to a multiple of {n_dev} or --config.num_devices")
  mesh = data_mesh(n_dev)
  if primary:  # the config is runnable: record it
    workdir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(workdir / "config.json", json.dumps(
        {"config_name": config_name, "command": command, "config": config_dict},
        indent=2, sort_keys=True, default=repr) + "\n")
  skip = config.on_nonfinite == "skip"
  polyak_start = (int(opt_cfg["polyak_start_epoch"]) * spe
                  if int(opt_cfg["polyak_start_epoch"]) >= 0 else -1)
  averaging = polyak_start >= 0
  avg_update = optim.make_average_update(polyak_start, opt_cfg["polyak_decay"])

  state = init_train_state(task.problem, solver, optimizer, jax.random.key(config.seed),
                           task.example)
  state = replicate(state, mesh)
  average_from = lambda params: replicate(optim.init_average(params), mesh)
  average = average_from(state.params) if averaging else None

  ckpt = Checkpointer(workdir / "checkpoints", keep=config.keep_checkpoints,
                      warn=lambda m: log(f"warning: {m}"))
  elapsed_before, resumed_from = 0.0, None
  restored = ckpt.restore(state, average)
  if restored is not None:
    resumed_from, state, restored_avg, host = restored
    if averaging:
      average = (optim.Averaged(restored_avg["params"], restored_avg["count"])
                 if restored_avg is not None else average_from(state.params))
    elapsed_before = float(host.get("elapsed_s", 0.0))
    if primary:
      truncate_metrics(metrics_path, resumed_from)
      log(f"resuming from {ckpt.path(resumed_from)} (step {resumed_from}/{total})")
  elif primary and metrics_path.exists():
    metrics_path.unlink()  # a run that never checkpointed restarts from scratch
  start = int(to_host(state.step)) if restored is not None else 0
  last_good = (resumed_from, ckpt.path(resumed_from)) if restored is not None else None

  step_fn = make_train_step(task.problem, solver, optimizer, mesh=mesh, skip_nonfinite=skip)
  params_finite = jax.jit(tu.tree_all_finite)
  tb = _TensorBoard(workdir / "tensorboard", enabled=primary)
  eval_every = int(config.eval_every_epochs) * spe
  ckpt_every = int(config.checkpoint_every_steps)
  log_every = int(config.log_every_steps)
  label = config_name or config.problem

  if progress is None:
    progress = sys.stderr.isatty()
  from tqdm.auto import tqdm  # noqa: PLC0415
  bar = tqdm(total=total, initial=start, disable=not (progress and primary),
             dynamic_ncols=True, unit="step", desc=f"{label}/{config.solver}")
  say = (lambda s: bar.write(s)) if (progress and primary) else log

  pending_dev: list[tuple[int, dict]] = []
  pending_host: list[dict] = []
  last_train: dict = {}
  last_eval: dict = {}
  window_times: list[float] = []
  t_window, steps_in_window = time.time(), 0
  status, reason = "completed", ""
  evaluated_at = -1

  def host_state(step: int) -> dict:
    return {"seed": int(config.seed), "data_step": int(step),
            "elapsed_s": elapsed_before + (time.time() - t_session),
            "skipped": int(to_host(state.skipped))}

  def save(step: int) -> None:
    nonlocal last_good
    path = ckpt.save(step, state, average, host_state(step))
    last_good = (step, path)

  def fail(step: int, what: str, fix: str) -> None:
    where = (f"last good checkpoint: {last_good[1]} (step {last_good[0]})" if last_good
             else "no checkpoint was saved before it")
    raise TrainingFailure(f"step {step} (batch {step - 1}): {what}; {where}. {fix}")

  def evaluate(step: int) -> dict:
    nonlocal evaluated_at
    if task.evaluate is None:
      evaluated_at = step
      return {}
    params = average.params if averaging else state.params
    out = {k: float(v) for k, v in task.evaluate(to_host(params), solver).items()}
    # Only after the result exists: an interrupted evaluation must not count as done.
    evaluated_at = step
    if primary:
      append_jsonl(metrics_path, {"step": step, "split": "eval", "epoch": step / spe,
                                  **{k: _finite_or_none(v) for k, v in out.items()}})
      tb.scalars("eval", step, out)
    return out

  def flush(step: int, do_log: bool) -> None:
    """Fetches pending metrics, runs the failure checks, logs a line if ``do_log``."""
    nonlocal pending_dev, pending_host, t_window, steps_in_window
    fetched = to_host([m for _, m in pending_dev])
    for (s, _), m in zip(pending_dev, fetched):
      rec = {k: (bool(v) if np.asarray(v).dtype == np.bool_ else float(v))
             for k, v in m.items()}
      loss_bad = not math.isfinite(rec.get("loss", 0.0))
      # A finite gradient whose norm overflows means a diverged relaxation too.
      norm_bad = not math.isfinite(rec.get("grad_norm", 0.0))
      if (rec.get("nonfinite_update") or loss_bad or norm_bad) and not skip:
        pending_host.append(rec)
        _log_window(s)
        order = {"free": 0, "controlled": 1, "adjoint": 2}  # upstream phases first
        diverged = sorted((k.split("/")[0] for k, v in rec.items()
                           if k.endswith("/nonfinite_fraction") and v > 0),
                          key=lambda p: (order.get(p, 9), p))
        if diverged:
          phase = diverged[0]
          fix = (f"The {phase} relaxation diverged; damp it (e.g. "
                 f"--config.solvers.{config.solver}.{phase}.strategy=anderson or a "
                 f"smaller --config.solvers.{config.solver}.{phase}.strategy_options.dt),"
                 " check that batch's data for NaN/inf, or pass "
                 "--config.on_nonfinite=skip to skip such batches")
        else:
          fix = ("Lower --config.optimizer.learning_rate or set "
                 "--config.optimizer.clip_norm, or pass --config.on_nonfinite=skip to "
                 "skip such batches")
        fail(s, "the loss is not finite" if loss_bad else
             f"the gradients are not finite (loss={_fmt(rec.get('loss'))}, "
             f"grad_norm={_fmt(rec.get('grad_norm'))})" + (
                 f"; non-finite states in the {' and '.join(diverged)} relaxation"
                 + ("s" if len(diverged) > 1 else "")
                 if diverged else ""), fix)
      pending_host.append(rec)
    pending_dev = []
    if not bool(to_host(params_finite(state.params))):  # skipping cannot fix this
      fail(step, "the parameters are not finite",
           "Lower --config.optimizer.learning_rate or set --config.optimizer.clip_norm")
    jax.block_until_ready(state.params)
    if steps_in_window:
      window_times.append((time.time() - t_window) / steps_in_window)
    t_window, steps_in_window = time.time(), 0
    if do_log:
      _log_window(step)

  def _log_window(step: int) -> None:
    nonlocal pending_host, last_train
    if not pending_host:
      return
    rec = _mean_records(pending_host)
    n = len(pending_host)
    pending_host = []
    rec["skipped_total"] = int(to_host(state.skipped))
    last_train = rec
    if primary:
      append_jsonl(metrics_path, {"step": step, "split": "train", "epoch": step / spe,
                                  "time": time.time(), "window_steps": n,
                                  **{k: _finite_or_none(v) if isinstance(v, float) else v
                                     for k, v in rec.items()}})
      tb.scalars("train", step, rec)
    if progress and primary:
      bar.set_postfix({_SHORT[k]: _fmt(rec[k]) for k in KEY_METRICS if k in rec},
                      refresh=False)
    fracs = {k: v for k, v in rec.items() if k.endswith("/converged_fraction")}
    limit = float(config.max_nonconverged_fraction)
    for k, frac in fracs.items():
      if limit < 1.0 and (1.0 - frac) > limit:
        phase = k.split("/")[0]
        fail(step, f"{phase} fixed point did not converge for {100 * (1 - frac):.1f}% of "
             f"the examples over the last {n} steps (limit "
             f"max_nonconverged_fraction={limit})",
             f"Raise --config.solvers.{config.solver}.{phase}.max_steps, loosen its "
             f"rtol, lower the learning rate, or raise --config.max_nonconverged_fraction")

  def one_step(state, average, batch, step):
    new_state, metrics = step_fn(state, batch)
    if averaging:
      average = avg_update(average, new_state.params, np.int32(step))
    return new_state, metrics, average

  if start >= total:
    done = _read_summary(workdir)
    if done.get("status") == "completed" and done.get("steps") == start:
      bar.close()
      ckpt.close()
      log(f"{workdir}: already complete at step {start}; nothing to train "
          "(delete the directory or pass another --workdir to train again)")
      return done
    evals = [r for r in read_jsonl(metrics_path)
             if r.get("split") == "eval" and r.get("step") == start]
    if evals:  # trained and evaluated, but stopped before the summary was written
      evaluated_at = start
      last_eval = {k: v for k, v in evals[-1].items() if k not in ("step", "split", "epoch")}
  try:
    for step in range(start, total):
      batch = place_batch(task.train_batch(step), mesh)
      # One assignment, so an interrupt never leaves state and average out of step.
      state, metrics, average = one_step(state, average, batch, step)
      pending_dev.append((step + 1, metrics))
      if step == start:  # exclude compilation from the timings
        jax.block_until_ready(state.params)
        t_window, steps_in_window = time.time(), 0
      else:
        steps_in_window += 1
      s = step + 1
      do_log = s % log_every == 0 or s == total
      do_eval = eval_every > 0 and s % eval_every == 0 and s != total
      do_ckpt = (ckpt_every > 0 and s % ckpt_every == 0) or s == total
      if do_log or do_eval or do_ckpt:
        flush(s, do_log)
      if do_eval:
        last_eval = evaluate(s)
        say(f"eval @ step {s} (epoch {s / spe:g}): "
            + ", ".join(f"{k}={_fmt(v)}" for k, v in last_eval.items()))
      if do_ckpt:
        save(s)
      if do_log or do_eval or do_ckpt:
        t_window = time.time()  # time training steps only, not evals and saves
      bar.update(1)
    if evaluated_at != total:
      last_eval = evaluate(total)
    if not last_train:
      last_train = _last_logged(metrics_path, "train")
  except TrainingFailure as e:
    status, reason = "failed", str(e)
  except KeyboardInterrupt:
    status, reason = "interrupted", "interrupted (Ctrl-C or SIGTERM)"
    if evaluated_at == total and int(to_host(state.step)) == total:
      status, reason = "completed", ""  # only the bookkeeping was left
      last_train = last_train or _last_logged(metrics_path, "train")
    # Keep the work done since the last checkpoint, if it is sound.
    done = int(to_host(state.step))
    if done > (last_good[0] if last_good else 0) and bool(
        to_host(params_finite(state.params))):
      with contextlib.suppress(Exception):
        save(done)
        log(f"saved checkpoint {ckpt.path(done)} before stopping")
  finally:
    bar.close()
    tb.close()
    ckpt.close()

  final_step = int(to_host(state.step))
  summary = {
      "config": label, "problem": config.problem, "solver": config.solver,
      "seed": int(config.seed), "status": status, "reason": reason,
      "steps": (final_step if status in ("completed", "interrupted")
                else (last_good[0] if last_good else 0)),
      "total_steps": total, "steps_per_epoch": spe, "epochs": total / spe,
      "wall_time_s": elapsed_before + (time.time() - t_session),
      "session_time_s": time.time() - t_session,
      "seconds_per_step": (statistics.median(window_times) if window_times else None),
      "train": last_train, "eval": last_eval if status == "completed" else {},
      "skipped_batches": int(to_host(state.skipped)) if status == "completed" else None,
      "resumed_from": resumed_from, "num_devices": n_dev,
      "process_count": jax.process_count(), "workdir": str(workdir),
      "checkpoint": str(last_good[1]) if last_good else None,
      "polyak": averaging, "notes": task.notes, "finished_at": time.time(),
  }
  if primary:
    atomic_write_text(workdir / "summary.json",
                      json.dumps(summary, indent=2, sort_keys=True, default=_json_default)
                      + "\n")
    try:
      plot_curves(metrics_path, workdir / "curves.png",
                  title=f"{label} / {config.solver} / seed {config.seed}")
    except Exception as e:  # noqa: BLE001 -- a plot must never lose a run
      log(f"warning: could not plot the curves ({type(e).__name__}: {e})")
  if status == "failed":
    raise TrainingFailure(reason)
  if status == "interrupted":
    raise KeyboardInterrupt
  return summary


def _read_summary(workdir: Path) -> dict:
  try:
    return json.loads((workdir / "summary.json").read_text())
  except (OSError, json.JSONDecodeError):
    return {}


def _last_logged(path: Path, split: str) -> dict:
  recs = [r for r in read_jsonl(path) if r.get("split") == split]
  if not recs:
    return {}
  return {k: v for k, v in recs[-1].items() if k not in ("step", "split", "epoch", "time")}


__all__ = ["TrainingFailure", "append_jsonl", "atomic_write_text", "plot_curves",
           "read_jsonl", "run", "summary_table", "to_host"]


# ----- command line (launch/run.py) ----------------------------------------------------

def default_workdir(spec: str, config: Any, pairs: list[tuple[str, str]]) -> Path:
  """``runs/<config>[_<preset>]/<solver>_seed<seed>[_<hash of the other overrides>]``:
  the same command always maps to the same directory, so re-running it resumes."""
  tag = cfglib.fingerprint(pairs, exclude=("solver", "seed"))
  name = f"{config.solver}_seed{config.seed}" + (f"_{tag}" if tag else "")
  return Path("runs") / cfglib.config_label(spec) / name


def cli_main(args: Any, pairs: list[tuple[str, str]], argv: list[str]) -> int:
  """Body of ``launch/run.py`` once flags are parsed (and jax may be imported)."""
  import shlex  # noqa: PLC0415
  try:
    config = cfglib.load(args.config, pairs)
  except cfglib.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.print_config:
    print(config)
    return 0
  workdir = Path(args.workdir) if args.workdir else default_workdir(args.config, config, pairs)
  progress = True if args.progress else (False if args.no_progress else None)
  import signal  # noqa: PLC0415

  def _on_sigterm(signum, frame):  # preemption: stop like Ctrl-C, saving a checkpoint
    raise KeyboardInterrupt
  with contextlib.suppress(ValueError):  # not in the main thread
    signal.signal(signal.SIGTERM, _on_sigterm)
  command = "python launch/run.py " + " ".join(shlex.quote(a) for a in argv)
  log = print if is_primary() else (lambda s: None)
  log(f"run: {cfglib.config_label(args.config)} / {config.solver} / seed {config.seed} "
      f"-> {workdir}")
  try:
    summary = run(config, workdir, config_name=cfglib.config_label(args.config),
                  command=command, progress=progress, log=log)
  except cfglib.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except TrainingFailure as e:
    print(f"error: training stopped at {e}", file=sys.stderr)
    print(f"  results so far: {Path(workdir).absolute()}/summary.json and metrics.jsonl; "
          f"after fixing the config, re-run with --workdir {workdir} to resume from the "
          "last good checkpoint (or another --workdir to start over)", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print(f"\ninterrupted; re-run the same command to resume from the last checkpoint in "
          f"{workdir}", file=sys.stderr)
    return 130
  if is_primary():
    print(summary_table(summary))
    wd = Path(summary["workdir"])
    print(f"results: {wd}/summary.json  metrics: {wd}/metrics.jsonl  "
          f"curves: {wd}/curves.png  checkpoints: {wd}/checkpoints/")
  return 0
