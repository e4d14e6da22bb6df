#!/usr/bin/env python
"""Sweep a grid: ``python launch/sweep.py --config NAME[:preset] --solvers a,b --seeds 0,1,2
--grid KEY=V1,V2 [--workers N] [--backend local|ray] [--config.KEY=VALUE ...]``.

Runs each grid point as a ``launch/run.py`` process (parallel, resumable: re-run the
same command to finish or extend a sweep) and writes results.csv, results.md (mean ±
std over seeds) and comparison.png into the sweep directory. See launch/sweeping.py.
"""

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
# Run from a checkout without `pip install -e .`: the repository root, not launch/, on the path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from launch import sweeping  # noqa: E402

if __name__ == "__main__":
  sys.exit(sweeping.main())
