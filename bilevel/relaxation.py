"""How an equilibrium is relaxed: strategy, tolerance and budget in one object.

Solvers hold one :class:`Relaxation` per phase (free equilibrium, controlled
equilibrium, adjoint) so that each phase's integrator and stopping rule are
options, configurable by name from a config dict.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

import jax

from bilevel import fixed_point as fp

# The name of the per-example vmap axis in the solvers: a relaxation's quorum is
# counted over it.
BATCH_AXIS = "examples"

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Relaxation:
  """Strategy + stopping rule for :func:`bilevel.fixed_point.solve_fixed_point`.

  Converged iff every block b of the state (top-level field) meets
  ``||F_b|| <= atol + rtol * max(||z_b||, block_floor ||z||)``.
  """
  strategy: fp.Strategy = fp.Euler(1.0)
  rtol: float = 1e-6
  atol: float = 0.0
  max_steps: int = 800
  steps_per_check: int = 1
  block_floor: float = fp.BLOCK_FLOOR
  # < 1: a vmapped batch stops once this fraction of its examples has finished;
  # the others are reported unconverged and left out of the batch mean
  # (BatchMask.refine). Acts in solve_batch (a vmap over BATCH_AXIS).
  quorum: float = 1.0
  # > 0: solve_batch shrinks the vmapped batch to the examples still running, in
  # up to this many halvings (fixed_point.solve_compacted); 0: plain vmap.
  compaction: int = 0

  def __post_init__(self):
    if self.rtol < 0 or self.atol < 0:
      raise ValueError(f"relaxation tolerances must be >= 0, got rtol={self.rtol}, "
                       f"atol={self.atol}")
    if self.max_steps < 0 or self.steps_per_check < 1:
      raise ValueError(f"relaxation needs max_steps >= 0 and steps_per_check >= 1, got "
                       f"{self.max_steps} and {self.steps_per_check}")
    if not 0 < self.quorum <= 1:
      raise ValueError(f"relaxation quorum must be in (0, 1], got {self.quorum}")
    if self.compaction < 0:
      raise ValueError(f"relaxation compaction (halvings of the batch) must be >= 0, got "
                       f"{self.compaction}")
    if self.compaction and self.quorum < 1:
      raise ValueError("relaxation quorum and compaction are alternatives (both cut the "
                       "cost of slow examples): set one of them")
    if not 0 <= self.block_floor <= 1:
      raise ValueError(f"relaxation block_floor must be in [0, 1], got {self.block_floor}")

  def solve(self, field: fp.Field, z0: PyTree,
            axis_name: Optional[str] = None) -> fp.FixedPointResult:
    """``axis_name``: the vmapped batch axis the quorum is counted over."""
    return fp.solve_fixed_point(field, z0, self.strategy, rtol=self.rtol,
                                atol=self.atol, max_steps=self.max_steps,
                                steps_per_check=self.steps_per_check,
                                block_floor=self.block_floor, quorum=self.quorum,
                                axis_name=axis_name)

  def solve_batch(self, make_field: Callable[[PyTree], fp.Field], inputs: PyTree,
                  z0: PyTree) -> fp.FixedPointResult:
    """Per-example solves of a batch: ``make_field(inputs_i)`` is example i's field;
    ``inputs`` and ``z0`` carry the batch on their leading axis. ``jax.vmap`` of
    :meth:`solve` over :data:`BATCH_AXIS`, or the compacting loop."""
    if self.compaction:
      return fp.solve_compacted(make_field, inputs, z0, self.strategy, stages=self.compaction,
                                rtol=self.rtol, atol=self.atol, max_steps=self.max_steps,
                                steps_per_check=self.steps_per_check,
                                block_floor=self.block_floor)
    return jax.vmap(lambda i, z: self.solve(make_field(i), z, BATCH_AXIS),
                    axis_name=BATCH_AXIS)(inputs, z0)

  def unrolled(self, field: fp.Field, z0: PyTree, num_steps: int | None = None,
               remat: bool = False) -> fp.FixedPointResult:
    return fp.unrolled_fixed_point(field, z0, self.strategy,
                                   num_steps=num_steps or self.max_steps,
                                   rtol=self.rtol, atol=self.atol,
                                   unroll=self.steps_per_check,
                                   block_floor=self.block_floor, remat=remat)


def relaxation_from_config(cfg: Mapping[str, Any] | Relaxation | None,
                           default: Relaxation = Relaxation()) -> Relaxation:
  """Builds a Relaxation from ``{strategy: name, strategy_options: {...}, rtol,
  atol, max_steps, steps_per_check, block_floor, quorum, compaction}``; missing keys
  keep ``default``'s values."""
  if cfg is None:
    return default
  if isinstance(cfg, Relaxation):
    return cfg
  cfg = dict(cfg)
  allowed = {"strategy", "strategy_options", "rtol", "atol", "max_steps", "steps_per_check",
             "block_floor", "quorum", "compaction"}
  unknown = set(cfg) - allowed
  if unknown:
    raise ValueError(f"unknown relaxation option(s) {sorted(unknown)}; "
                     f"valid options are {sorted(allowed)}")
  strategy = default.strategy
  if "strategy" in cfg:
    strategy = fp.make_strategy(cfg.pop("strategy"), **dict(cfg.pop("strategy_options", {})))
  elif "strategy_options" in cfg:
    strategy = dataclasses.replace(default.strategy, **dict(cfg.pop("strategy_options")))
  return dataclasses.replace(default, strategy=strategy, **cfg)
