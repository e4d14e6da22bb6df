"""Per-example classification loss and score, shared by every classifier problem."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def cross_entropy(logits: jax.Array, label: jax.Array) -> jax.Array:
  """Softmax cross-entropy of one example's ``logits [K]`` and int ``label``."""
  return -jax.nn.log_softmax(logits)[label]


def accuracy(logits: jax.Array, label: jax.Array) -> jax.Array:
  """1.0 if the arg-max of ``logits [K]`` is ``label``, else 0.0 (float32)."""
  return (jnp.argmax(logits) == label).astype(jnp.float32)


def classification_loss(logits: jax.Array, example: PyTree) -> jax.Array:
  """``BilevelProblem.loss`` for examples ``{"label": int, ...}``: the cross-entropy."""
  return cross_entropy(logits, example["label"])


def classification_metrics(logits: jax.Array, example: PyTree) -> dict:
  """``BilevelProblem.metrics`` for examples ``{"label": int, ...}``: the accuracy."""
  return {"accuracy": accuracy(logits, example["label"])}
