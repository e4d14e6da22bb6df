"""Command line of ``launch/run.py`` (absl flags + ``ml_collections.config_flags``).

``main(argv)`` parses the flags, sets up devices (``--num_cpu_devices``,
multi-host), loads and validates the config, and calls :func:`launch.loop.run`.
Exit status: 0 done, 1 training failed (non-finite values), 2 bad config or
arguments (nothing trained), 3 training diverged (non-convergence, loss growth),
130 interrupted (Ctrl-C or SIGTERM; a checkpoint was saved).
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Optional, Sequence

import jax
from absl import flags

from launch import config as cfglib
from launch import loop, signals
from launch.devices import is_primary
from launch.records import read_summary, summary_table
from launch.workdir import default_workdir

USAGE = """Train one config: python launch/run.py --config NAME[:preset] [--config.KEY=VALUE ...]

Examples:
    python launch/run.py --config toy:quick
    python launch/run.py --config mnist_rnn:quick --config.solver=rbp --config.seed=3
    python launch/run.py --config toy --workdir runs/mine     # re-run the same line to resume
"""


def define_flags(fv: flags.FlagValues) -> None:
  """The run flags besides ``--config`` and its overrides."""
  flags.DEFINE_string("workdir", None, "work directory (default runs/<config>[_<preset>]/"
                      "<solver>_seed<seed>[_<hash of overrides>])", flag_values=fv)
  flags.DEFINE_integer("num_cpu_devices", None, "force N host (CPU) devices (sets "
                       "XLA_FLAGS before jax starts)", flag_values=fv)
  flags.DEFINE_boolean("no_progress", False, "no progress bar", flag_values=fv)
  flags.DEFINE_boolean("progress", False, "progress bar even without a tty", flag_values=fv)
  flags.DEFINE_boolean("print_config", False, "print the resolved config and exit",
                       flag_values=fv)
  flags.DEFINE_string("coordinator", None, "HOST:PORT of process 0 (multi-host)",
                      flag_values=fv)
  flags.DEFINE_integer("num_processes", None, "number of processes (multi-host)",
                       flag_values=fv)
  flags.DEFINE_integer("process_id", None, "this process's index (multi-host)",
                       flag_values=fv)


def help_text(fv: flags.FlagValues) -> str:
  return (USAGE + "\nFlags:\n" + fv.get_help() + "\n\nOverride any config field with "
          "--config.KEY=VALUE; configs: " + ", ".join(cfglib.available_configs()))


def setup_devices(fv: flags.FlagValues) -> None:
  """``--num_cpu_devices`` (before jax starts) and ``jax.distributed`` (multi-host)."""
  if fv.num_cpu_devices:
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split()
            if not f.startswith("--xla_force_host_platform_device_count")]
    os.environ["XLA_FLAGS"] = " ".join(
        kept + [f"--xla_force_host_platform_device_count={fv.num_cpu_devices}"])
    if not os.environ.get("JAX_PLATFORMS"):  # jax is imported but has no backend yet
      jax.config.update("jax_platforms", "cpu")
  if fv.coordinator:
    if fv.num_processes is None or fv.process_id is None:
      raise cfglib.ConfigError("--coordinator needs --num_processes N and --process_id I")
    jax.distributed.initialize(coordinator_address=fv.coordinator,
                               num_processes=fv.num_processes, process_id=fv.process_id)


EXIT_STATUS = {"failed": 1, "diverged": 3}


def train(fv: flags.FlagValues, config, argv: Sequence[str]) -> int:
  """Runs the loop; maps its outcome to an exit status and a message."""
  spec = fv["config"].config_filename
  pairs = cfglib.override_pairs(cfglib.normalize_argv(argv))
  workdir = Path(fv.workdir) if fv.workdir else default_workdir(spec, config, pairs)
  progress = True if fv.progress else (False if fv.no_progress else None)
  signals.install()  # SIGTERM (preemption) and Ctrl-C: save a checkpoint and stop
  log = print if is_primary() else (lambda s: None)
  label = cfglib.config_label(spec)
  log(f"run: {label} / {config.solver} / seed {config.seed} -> {workdir}")
  try:
    summary = loop.run(config, workdir, config_name=label, progress=progress, log=log,
                       command="python launch/run.py " + shlex.join(argv))
  except loop.TrainingFailure as e:
    if is_primary() and read_summary(workdir):
      print(summary_table(read_summary(workdir)))
    print(f"error: training {e.status} at {e}", file=sys.stderr)
    print(f"  results so far: {Path(workdir).absolute()}/summary.json and metrics.jsonl; "
          f"after fixing the config, re-run with --workdir {workdir} to resume from the "
          "last good checkpoint (or another --workdir to start over)", file=sys.stderr)
    return EXIT_STATUS.get(e.status, 1)
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


def main(argv: Optional[Sequence[str]] = None) -> int:
  """``launch/run.py``: returns the exit status."""
  argv = list(sys.argv[1:] if argv is None else argv)
  signals.die_with_parent()
  fv = flags.FlagValues()
  define_flags(fv)
  if {"-h", "--help", "--helpfull"} & set(argv):
    print(help_text(fv))
    return 0
  try:
    config = cfglib.parse_flags(argv, fv)[0]
    setup_devices(fv)
    cfglib.validate(config)
    if fv.print_config:
      print(config)
      return 0
    return train(fv, config, argv)
  except cfglib.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


__all__ = ["main"]
