"""What a run is made of: the config -> task, solver, optimizer, mesh and step function
(:func:`build`, errors are ConfigErrors raised before compiling), and the two state
objects the training loop (:mod:`launch.loop`) works on: the fixed :class:`Setup`
and the mutable :class:`LoopState`."""

from __future__ import annotations

import dataclasses
import pickle
import time
import zipfile
from pathlib import Path
from typing import Any, Callable, Optional

import jax

import problems
from bilevel import tree as tu
from bilevel.train import data_mesh, init_train_state, make_train_step
from launch import optim
from launch.config import ConfigError, build_solver, optimizer_config
from launch.devices import is_primary, replicate, to_host


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
  lock_fd: Optional[int] = None

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
  t_saved: float = dataclasses.field(default_factory=time.time)
  lowest_loss: float = float("inf")

  def step(self) -> int:
    return int(to_host(self.state.step))


def resolve_total_steps(config: Any, steps_per_epoch: int) -> int:
  if config.num_steps:
    return int(config.num_steps)
  return int(config.num_epochs) * int(steps_per_epoch)


# ----- building --------------------------------------------------------------------------

_UNREADABLE = (zipfile.BadZipFile, EOFError, pickle.UnpicklingError)


def _file_in_traceback(e: BaseException) -> Optional[str]:
  """The file a loader was reading when ``e`` was raised (innermost frame first)."""
  tb, names = e.__traceback__, []
  while tb is not None:
    names.append(tb.tb_frame.f_locals)
    tb = tb.tb_next
  for local in reversed(names):
    for key in ("file", "filename", "path", "fname"):
      value = local.get(key)
      if isinstance(value, (str, Path)) and Path(value).is_file():
        return str(value)
  return None


def make_task(config: Any):
  """``problems.make_task(config)``; a problem's complaint, or an unreadable data
  file, is a ConfigError (one line naming the file and the fix)."""
  try:
    return problems.make_task(config)
  except _UNREADABLE as e:
    where = _file_in_traceback(e) or "a data file"
    raise ConfigError(f"problem {config.problem!r}: cannot read {where} "
                      f"({type(e).__name__}: {e}); it is truncated or corrupt: delete it "
                      "and copy or download it again (README, 'Data')") from e
  except (ValueError, KeyError, FileNotFoundError) as e:
    msg = e.args[0] if e.args else str(e)
    where = _file_in_traceback(e)
    if isinstance(e, ValueError) and where and where.endswith((".npz", ".npy", ".pkl")):
      msg = f"cannot read {where} ({msg}); it is truncated or corrupt: delete it and copy " \
            "or download it again (README, 'Data')"
    raise ConfigError(f"problem {config.problem!r}: {msg}") from e


def train_step_options(config: Any) -> dict:
  """Keyword arguments of ``make_train_step`` from the config ('stop' drops the
  invalid examples from the update and stops in :func:`launch.loop.flush`)."""
  return {"skip_nonfinite": config.on_nonfinite == "skip",
          "invalid_examples": "keep" if config.on_invalid_examples == "keep" else "drop"}


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
                                  **train_step_options(config))
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


__all__ = ["LoopState", "Setup", "build", "device_count", "initial_state", "make_task",
           "resolve_total_steps", "train_step_options"]
