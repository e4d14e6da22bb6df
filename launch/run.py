#!/usr/bin/env python
"""Train one config: ``python launch/run.py --config NAME[:preset] [--config.key=value ...]``.

Examples::

    python launch/run.py --config toy:quick
    python launch/run.py --config mnist_rnn:quick --config.solver=rbp --config.seed=3
    python launch/run.py --config toy --workdir runs/mine     # re-run the same line to resume

Options (everything else is ``--config.KEY=VALUE``):
  --workdir DIR          where config, metrics, checkpoints and plots go
                         (default runs/<config>[_<preset>]/<solver>_seed<seed>[_<hash of overrides>])
  --num_cpu_devices N    force N host (CPU) devices, e.g. to test data parallelism
  --no_progress          no progress bar (default: shown on a terminal)
  --print_config         print the resolved, validated config and exit
  --coordinator HOST:PORT --num_processes N --process_id I
                         multi-host training via jax.distributed.initialize
Exit status: 0 done, 1 training stopped (see the message), 2 bad config or arguments.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
  sys.path.insert(0, str(_ROOT))


def _parser() -> argparse.ArgumentParser:
  from bilevel import config as cfglib  # light: no jax import

  p = argparse.ArgumentParser(
      prog="launch/run.py", description=__doc__,
      epilog="Override any config field with --config.KEY=VALUE "
             "(e.g. --config.optimizer.learning_rate=1e-3).",
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", required=True, metavar="NAME[:preset]",
                 help="config name in configs/ (or a path to a .py file), optional "
                      f"preset; available: {', '.join(cfglib.available_configs())}")
  p.add_argument("--workdir", default=None, help="work directory (default under runs/)")
  p.add_argument("--num_cpu_devices", type=int, default=None,
                 help="force N host devices (sets XLA_FLAGS before jax starts)")
  p.add_argument("--no_progress", action="store_true", help="no progress bar")
  p.add_argument("--progress", action="store_true", help="progress bar even without a tty")
  p.add_argument("--print_config", action="store_true",
                 help="print the resolved config and exit")
  p.add_argument("--coordinator", default=None, help="HOST:PORT of process 0 (multi-host)")
  p.add_argument("--num_processes", type=int, default=None)
  p.add_argument("--process_id", type=int, default=None)
  return p


def main(argv: list[str] | None = None) -> int:
  from bilevel import config as cfglib  # light: no jax import

  argv = sys.argv[1:] if argv is None else list(argv)
  try:
    pairs, rest = cfglib.parse_override_args(argv)
  except cfglib.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  args = _parser().parse_args(rest)  # exits 2 with usage on bad flags

  if args.num_cpu_devices:
    flags = os.environ.get("XLA_FLAGS", "")
    flags = " ".join(f for f in flags.split()
                     if not f.startswith("--xla_force_host_platform_device_count"))
    os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count="
                               f"{args.num_cpu_devices}").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  if args.coordinator:
    if args.num_processes is None or args.process_id is None:
      print("error: --coordinator needs --num_processes N and --process_id I",
            file=sys.stderr)
      return 2
    import jax
    jax.distributed.initialize(coordinator_address=args.coordinator,
                               num_processes=args.num_processes,
                               process_id=args.process_id)

  from bilevel import runner
  return runner.cli_main(args, pairs, argv)


if __name__ == "__main__":
  sys.exit(main())
