#!/usr/bin/env python
"""Train one config: ``python launch/run.py --config NAME[:preset] [--config.key=value ...]``.

Examples::

    python launch/run.py --config toy:quick
    python launch/run.py --config mnist_rnn:quick --config.solver=rbp --config.seed=3
    python launch/run.py --config toy --workdir runs/mine     # re-run the same line to resume

Flags (``--help`` lists them): ``--workdir``, ``--num_cpu_devices``, ``--no_progress``,
``--print_config``, ``--coordinator/--num_processes/--process_id``. The command
line is parsed by :mod:`launch.cli` (absl flags and ``ml_collections.config_flags``).
Exit status: 0 done, 1 failed, 2 bad config, arguments or work directory, 3 diverged,
130 interrupted (a checkpoint was saved; re-run to resume).
"""

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
# Run from a checkout without `pip install -e .`: the repository root, not launch/, on the path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from launch import cli  # noqa: E402

if __name__ == "__main__":
  sys.exit(cli.main())
