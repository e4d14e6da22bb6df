#!/usr/bin/env python
"""Sweep a grid: ``python launch/sweep.py --config NAME[:preset] --solvers a,b --seeds 0,1,2
--grid KEY=V1,V2 [--workers N] [--backend local|ray] [--config.KEY=VALUE ...]``.

Runs each grid point as a ``launch/run.py`` process (parallel, resumable: re-run the
same command to finish or extend a sweep) and writes results.csv, results.md (mean ±
std over seeds) and comparison.png into the sweep directory. See bilevel/sweep.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
  sys.path.insert(0, str(_ROOT))

from bilevel import sweep  # noqa: E402

if __name__ == "__main__":
  sys.exit(sweep.main())
