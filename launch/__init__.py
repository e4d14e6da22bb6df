"""launch: the experiment harness on top of ``bilevel``, ``solvers`` and ``problems``.

* :mod:`launch.config` -- ``--config NAME[:preset]`` and overrides (config_flags);
  :mod:`launch.schema` -- validation against ``configs/base.py``.
* :mod:`launch.loop` -- the training loop as small functions; :mod:`launch.policy`
  (failures), :mod:`launch.records` (files), :mod:`launch.checkpoint`,
  :mod:`launch.optim`, :mod:`launch.devices`, :mod:`launch.workdir`.
* :mod:`launch.cli` / ``launch/run.py`` and :mod:`launch.sweeping` / ``launch/sweep.py``.
"""
