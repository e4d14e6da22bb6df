"""Equilibrium networks on MNIST (section 3.1, eq. 11): feedforward and recurrent (haiku).

The free dynamics of every unit is eq. 11, ``dphi/dt = -phi + W sigma(phi) + U x``,
with a tanh ``sigma``. The state (one example) is a dict

* ``"hidden"``: a tuple of hidden layers (each ``[width]``),
* ``"out"``: the ``[10]`` output units, linear (nothing reads ``sigma(out)``),
  on which the cross-entropy is measured.

Two shapes of ``W`` (biases on every weighted input, PyTorch default
initialisation ``U(+-1/sqrt(fan_in))`` as in the paper authors' code):

* ``shape="ff"`` (config ``mnist_ff``): eq. 11 with a block-structured ``W`` -- two
  hidden layers, ``h1 = U x + b1``, ``h2 = W2 sigma(h1) + b2``,
  ``out = D sigma(h2) + b3``. Three Euler steps of size 1 from any state give
  the exact feedforward pass.
* ``shape="rnn"`` (config ``mnist_rnn``): one fully connected recurrent layer,
  ``h = W sigma(h) + U x + b``, ``out = D sigma(h) + b3``.

Loss convention (``loss_scale``; the builder :mod:`problems.mnist` sets it to
``1 / batch_size`` unless ``problem_options.batch_mean_loss=False``): the loss of
one example is its share ``CE / batch_size`` of the batch-mean cross-entropy,
which is what the output controller of the paper authors' code integrates
(``u' = -grad_y mean_batch(CE) - alpha u``). With it the LCP hyperparameters of
their commands (alpha = 0.1, k_i = 1, EBD beta = 1/alpha) mean the same thing
here. Every gradient is then 1/batch_size of theirs (invisible to Adam; their
gradient-norm clip 10 becomes ``10 / batch_size``).
The problem's ``metrics`` report the unscaled ``cross_entropy`` and ``accuracy``.

The problem also exposes the network structure the linear-feedback circuit
(``solvers/lcp_lf.py``) needs: ``feedback_units`` (the hidden units Q projects
onto) and ``feedback_modulation`` (``sigma'(phi)``, 1 on linear units).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import haiku as hk
import jax
import jax.numpy as jnp

from bilevel.problem import BilevelProblem
from problems.losses import accuracy, cross_entropy

PyTree = Any
NUM_CLASSES = 10
INPUT_DIM = 784
ACTIVATIONS = {"tanh": (jnp.tanh, lambda v: 1.0 - jnp.tanh(v) ** 2)}
SHAPES = ("ff", "rnn")


@dataclasses.dataclass(frozen=True, eq=False)
class EquilibriumNetProblem(BilevelProblem):
  """A :class:`BilevelProblem` that also exposes its neural structure.

  feedback_units: ``state -> pytree``, the (hidden) units a direct linear
    feedback ``Q`` projects onto; a linear selection of the state.
  feedback_modulation: ``state -> pytree like state``, ``sigma'(phi)`` on
    units read through ``sigma`` and 1 on linear units: the factor of the
    modified linear-feedback update ``dW = sigma'(phi) Q u sigma(phi)^T``.
  """
  feedback_units: Optional[Callable[[PyTree], PyTree]] = None
  feedback_modulation: Optional[Callable[[PyTree], PyTree]] = None


def _torch_linear(out: int, fan_in: int, name: str) -> hk.Linear:
  bound = 1.0 / math.sqrt(fan_in)
  return hk.Linear(out, name=name,
                   w_init=hk.initializers.RandomUniform(-bound, bound),
                   b_init=hk.initializers.RandomUniform(-bound, bound))


class EquilibriumNet(hk.Module):
  """The vector field of eq. 11 for one example; ``__call__(state, x) -> dstate``."""

  def __init__(self, shape: str, width: int, activation: str = "tanh",
               input_dim: int = INPUT_DIM, name: Optional[str] = None):
    super().__init__(name=name)
    self.shape, self.width, self.input_dim = shape, width, input_dim
    self.sigma = ACTIVATIONS[activation][0]

  def __call__(self, state: PyTree, x: jax.Array) -> PyTree:
    w = self.width
    drive = _torch_linear(w, self.input_dim, "input")(x)  # U x + b
    readout = _torch_linear(NUM_CLASSES, w, "readout")
    if self.shape == "ff":
      h1, h2 = state["hidden"]
      hidden = (-h1 + drive, -h2 + _torch_linear(w, w, "hidden")(self.sigma(h1)))
      top = h2
    else:
      (h,) = state["hidden"]
      hidden = (-h + _torch_linear(w, w, "recurrent")(self.sigma(h)) + drive,)
      top = h
    return {"hidden": hidden, "out": -state["out"] + readout(self.sigma(top))}


def zero_state(shape: str, width: int, dtype=jnp.float32) -> PyTree:
  layers = 2 if shape == "ff" else 1
  return {"hidden": tuple(jnp.zeros(width, dtype) for _ in range(layers)),
          "out": jnp.zeros(NUM_CLASSES, dtype)}


def make_problem(shape: str, width: int = 256, *, activation: str = "tanh",
                 loss_scale: float = 1.0, input_dim: int = INPUT_DIM) -> EquilibriumNetProblem:
  """The equilibrium network of eq. 11 with a cross-entropy loss on ``out``.

  One example is ``{"x": [input_dim] float, "label": int}``. ``loss_scale``
  multiplies the per-example cross-entropy (see the module docstring). Params
  take the dtype of the example's ``x`` given to ``init_params``.
  """
  if shape not in SHAPES:
    raise ValueError(f"network shape must be one of {SHAPES}, got {shape!r}")
  if activation not in ACTIVATIONS:
    raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
  net = hk.without_apply_rng(hk.transform(
      lambda state, x: EquilibriumNet(shape, width, activation, input_dim,
                                      name=f"mnist_{shape}")(state, x)))
  d_sigma = ACTIVATIONS[activation][1]

  def init_params(key, example):
    return net.init(key, zero_state(shape, width, example["x"].dtype), example["x"])

  def dynamics(params, state, example):
    return net.apply(params, state, example["x"])

  def loss(logits, example):
    return loss_scale * cross_entropy(logits, example["label"])

  def metrics(logits, example):
    return {"accuracy": accuracy(logits, example["label"]),
            "cross_entropy": cross_entropy(logits, example["label"])}

  def modulation(state):
    return {"hidden": tuple(d_sigma(h) for h in state["hidden"]),
            "out": jnp.ones_like(state["out"])}

  example = {"x": jnp.zeros(input_dim, jnp.float32), "label": jnp.zeros((), jnp.int32)}
  return EquilibriumNetProblem(
      dynamics=dynamics, loss=loss, output=lambda state: state["out"],
      init_state=lambda params, ex: zero_state(shape, width, ex["x"].dtype),
      init_params=init_params, metrics=metrics, name=f"mnist_{shape}", example=example,
      feedback_units=lambda state: state["hidden"], feedback_modulation=modulation)
