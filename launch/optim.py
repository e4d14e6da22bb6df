"""The outer optimizer from ``config.optimizer``, and Polyak/EMA parameter averaging.

``make_optimizer`` builds ``clip -> (L2 weight decay) -> optax.<name>(lr schedule)``:

* schedules: ``constant``; ``cosine`` -- cosine decay from ``learning_rate`` to
  ``final_lr_fraction * learning_rate`` over the run; ``step`` -- multiply by
  ``decay_factor`` every ``decay_every_epochs`` epochs.
* ``clip_norm > 0`` clips the global gradient norm first.
* ``weight_decay > 0`` is passed to the optax constructor when it takes one
  (decoupled, e.g. ``adamw``), otherwise added to the gradient (L2).

Averaging (``polyak_start_epoch >= 0``): from that epoch on, a separate pytree
holds the running average of the parameters -- the uniform Polyak mean if
``polyak_decay == 0``, else an exponential moving average with that decay. The
training loop (launch/loop.py) checkpoints it with the train state and evaluates with it.
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax

PyTree = Any


def learning_rate_schedule(cfg: Mapping[str, Any], total_steps: int,
                           steps_per_epoch: int) -> optax.Schedule:
  """The schedule named by ``cfg['schedule']`` (step count -> learning rate)."""
  lr = float(cfg["learning_rate"])
  kind = cfg.get("schedule", "constant")
  if kind == "constant":
    return optax.constant_schedule(lr)
  if kind == "cosine":
    return optax.cosine_decay_schedule(lr, decay_steps=max(int(total_steps), 1),
                                       alpha=float(cfg.get("final_lr_fraction", 0.0)))
  if kind == "step":
    every = int(cfg.get("decay_every_epochs", 1)) * max(int(steps_per_epoch), 1)
    return optax.exponential_decay(lr, transition_steps=max(every, 1),
                                   decay_rate=float(cfg.get("decay_factor", 0.1)),
                                   staircase=True)
  raise ValueError(f"unknown learning-rate schedule {kind!r}; use 'constant', 'cosine' "
                   "or 'step'")


def make_optimizer(cfg: Mapping[str, Any], total_steps: int,
                   steps_per_epoch: int) -> optax.GradientTransformation:
  """optax transformation from the ``config.optimizer`` dict (defaults filled in)."""
  name = cfg.get("name", "adam")
  ctor = getattr(optax, name, None)
  if ctor is None or not callable(ctor):
    raise ValueError(f"optimizer.name={name!r} is not an optax optimizer; use e.g. 'adam'")
  schedule = learning_rate_schedule(cfg, total_steps, steps_per_epoch)
  try:
    accepted = set(inspect.signature(ctor).parameters)
  except (TypeError, ValueError):
    accepted = set()
  kwargs: dict[str, Any] = dict(cfg.get("options") or {})
  for key in ("momentum", "nesterov"):
    if cfg.get(key) not in (None, False) and key in accepted:
      kwargs[key] = cfg[key]
  wd = float(cfg.get("weight_decay", 0.0))
  chain = []
  if float(cfg.get("clip_norm", 0.0)) > 0:
    clip = optax.clip_by_global_norm(float(cfg["clip_norm"]))
    chain.append(clip_each_group(clip) if cfg.get("clip_groups", "joint") == "separate"
                 else clip)
  if wd > 0:
    if "weight_decay" in accepted:
      kwargs["weight_decay"] = wd
    else:
      chain.append(optax.add_decayed_weights(wd))
  try:
    chain.append(ctor(learning_rate=schedule, **kwargs))
  except TypeError as e:
    raise ValueError(f"optax.{name} rejected its options {sorted(kwargs)}: {e}; fix "
                     "config.optimizer") from e
  return optax.chain(*chain) if len(chain) > 1 else chain[0]


def clip_each_group(clip: optax.GradientTransformation) -> optax.GradientTransformation:
  """``clip`` applied on its own to each element of the (params, solver_params)
  tuple the train step optimises (stateless clips only)."""

  def update(updates, state, params=None):
    return tuple(clip.update(g, optax.EmptyState())[0] for g in updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


class Averaged(NamedTuple):
  """Running parameter average: ``params`` (like the model params) and ``count``
  (number of averaged steps, int32)."""
  params: PyTree
  count: jax.Array


def init_average(params: PyTree) -> Averaged:
  return Averaged(jax.tree.map(jnp.asarray, params), jnp.zeros((), jnp.int32))


def make_average_update(start_step: int, decay: float):
  """``update(avg, params, step) -> avg`` after the optimizer step ``step`` (0-based).

  Before ``start_step`` the average tracks the params; from then on it is the
  uniform mean of the iterates (``decay == 0``) or an EMA with ``decay``.
  ``start_step < 0`` disables averaging (the average is the params).
  """
  decay = float(decay)

  def update(avg: Averaged, params: PyTree, step: jax.Array) -> Averaged:
    if start_step < 0:
      return Averaged(params, avg.count)
    active = step >= start_step
    n = avg.count.astype(jnp.float32)
    if decay > 0:
      w = jnp.where(avg.count == 0, 1.0, 1.0 - decay)
    else:
      w = 1.0 / (n + 1.0)

    def mix(a, p):
      new = a + (w * (p - a)).astype(a.dtype)
      return jnp.where(active, new, p)

    new_params = jax.tree.map(mix, avg.params, params)
    return Averaged(new_params, avg.count + active.astype(jnp.int32))

  return jax.jit(update)


__all__ = ["Averaged", "init_average", "learning_rate_schedule", "make_average_update",
           "make_optimizer"]
