"""Failure policy of the training loop: when a step's metrics stop the run, and the
one-line message (what happened, where the last good checkpoint is, what to change).

Pure functions of host metrics, unit-tested without training.
"""

from __future__ import annotations

from typing import Optional

from launch.records import fmt

_PHASE_ORDER = {"free": 0, "controlled": 1, "adjoint": 2}  # upstream phases first


class TrainingFailure(RuntimeError):
  """The run stopped; the message says where and what to do. ``status`` (also in
  ``summary.json``) is 'failed' (non-finite values) or 'diverged' (non-convergence,
  loss growth, diverged examples with ``on_invalid_examples='stop'``)."""

  def __init__(self, message: str, status: str = "failed"):
    super().__init__(message)
    self.status = status


def failure_message(step: int, what: str, fix: str,
                    last_good: Optional[tuple[int, object]]) -> str:
  where = (f"last good checkpoint: {last_good[1]} (step {last_good[0]})" if last_good
           else "no checkpoint was saved before it")
  return f"step {step} (batch {step - 1}): {what}; {where}. {fix}"


def is_nonfinite(rec: dict) -> bool:
  """The step produced a non-finite loss, gradient or gradient norm."""
  loss = rec.get("loss", 0.0)
  norm = rec.get("grad_norm", 0.0)
  return bool(rec.get("nonfinite_update")) or loss != loss or abs(loss) == float("inf") \
      or norm != norm or abs(norm) == float("inf")


def diverged_phases(rec: dict) -> list[str]:
  """Phases whose relaxation ended with non-finite states, upstream first."""
  return sorted((k.split("/")[0] for k, v in rec.items()
                 if k.endswith("/nonfinite_fraction") and v > 0),
                key=lambda p: (_PHASE_ORDER.get(p, 9), p))


def nonfinite_failure(rec: dict, solver: str) -> tuple[str, str]:
  """``(what, fix)`` for a step with non-finite values (see :func:`is_nonfinite`)."""
  diverged = diverged_phases(rec)
  loss = rec.get("loss", 0.0)
  if diverged:
    phase = diverged[0]
    fix = (f"The {phase} relaxation diverged; damp it (e.g. "
           f"--config.solvers.{solver}.{phase}.strategy=anderson or a "
           f"smaller --config.solvers.{solver}.{phase}.strategy_options.dt),"
           " check that batch's data for NaN/inf, or pass "
           "--config.on_nonfinite=skip to skip such batches")
  else:
    fix = ("Lower --config.optimizer.learning_rate or set --config.optimizer.clip_norm, "
           "or pass --config.on_nonfinite=skip to skip such batches")
  if loss != loss or abs(loss) == float("inf"):
    return "the loss is not finite", fix
  what = (f"the gradients are not finite (loss={fmt(rec.get('loss'))}, "
          f"grad_norm={fmt(rec.get('grad_norm'))})")
  if diverged:
    what += (f"; non-finite states in the {' and '.join(diverged)} relaxation"
             + ("s" if len(diverged) > 1 else ""))
  return what, fix


def convergence_failure(window: dict, limit: float, steps: int,
                        solver: str) -> Optional[tuple[str, str]]:
  """``(what, fix)`` when a phase's non-converged fraction over a logging window of
  ``steps`` steps exceeds ``limit`` (``limit >= 1`` never stops)."""
  if limit >= 1.0:
    return None
  for k, frac in window.items():
    if k.endswith("/converged_fraction") and (1.0 - frac) > limit:
      phase = k.split("/")[0]
      return (f"{phase} fixed point did not converge for {100 * (1 - frac):.1f}% of "
              f"the examples over the last {steps} steps (limit "
              f"max_nonconverged_fraction={limit})",
              f"Raise --config.solvers.{solver}.{phase}.max_steps, loosen its "
              f"rtol, lower the learning rate, or raise --config.max_nonconverged_fraction")
  return None


def loss_growth_failure(window: dict, lowest: float,
                        limit: float) -> Optional[tuple[str, str]]:
  """``(what, fix)`` when the window's mean loss exceeds ``limit`` times the lowest
  loss of a step so far (``limit == 0`` or no loss: never)."""
  loss = window.get("loss")
  if not limit or loss is None or not lowest < float("inf") or lowest <= 0:
    return None
  if loss > limit * lowest:
    return (f"the training loss grew to {fmt(loss)}, {fmt(loss / lowest)} times its lowest "
            f"value so far {fmt(lowest)} (limit max_loss_growth={fmt(limit)})",
            "Lower --config.optimizer.learning_rate or set --config.optimizer.clip_norm "
            "(or raise --config.max_loss_growth, 0 = off)")
  return None


def invalid_examples_failure(rec: dict, solver: str) -> tuple[str, str]:
  """``(what, fix)`` for a step that dropped diverged examples under 'stop'."""
  return (f"{int(rec.get('dropped_examples', 0))} example(s) of the batch diverged "
          "(on_invalid_examples=stop)",
          f"Damp the relaxations of --config.solvers.{solver} (strategy=anderson, a smaller "
          "dt), or pass --config.on_invalid_examples=drop to leave them out of the update")


PARAMS_NOT_FINITE = ("the parameters are not finite",
                     "Lower --config.optimizer.learning_rate or set --config.optimizer.clip_norm")

__all__ = ["PARAMS_NOT_FINITE", "TrainingFailure", "convergence_failure", "diverged_phases",
           "failure_message", "invalid_examples_failure", "is_nonfinite",
           "loss_growth_failure", "nonfinite_failure"]
