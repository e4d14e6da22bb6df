"""Problem construction: mistakes are caught before any tracing, with a message."""

import jax.numpy as jnp
import pytest

import solvers
from bilevel import BilevelProblem, ProblemError

EXAMPLE = {"x": jnp.ones(3), "target": jnp.zeros(2)}


def _params(key, ex):
  return {"W": jnp.zeros((4, 4)), "U": jnp.zeros((4, 3))}


def _loss(y, ex):
  return 0.5 * jnp.sum((y - ex["target"]) ** 2)


def test_dynamics_with_wrong_structure_is_rejected_at_construction():
  with pytest.raises(ProblemError, match="dynamics must return a pytree like the state"):
    BilevelProblem(dynamics=lambda p, s, ex: (s, s), loss=_loss,
                   output=lambda s: s[-2:], init_state=lambda p, ex: jnp.zeros(4),
                   init_params=_params, example=EXAMPLE)


def test_dynamics_with_wrong_shape_is_rejected():
  with pytest.raises(ProblemError, match=r"shape \(3,\), expected \(4,\)"):
    BilevelProblem(dynamics=lambda p, s, ex: p["U"] @ ex["x"] + s[:3].sum(), loss=_loss,
                   output=lambda s: s[-2:], init_state=lambda p, ex: jnp.zeros(4),
                   init_params=lambda k, ex: {"U": jnp.zeros((3, 3))}, example=EXAMPLE)


def test_needs_exactly_one_of_dynamics_or_energy():
  with pytest.raises(ProblemError, match="exactly one"):
    BilevelProblem(loss=_loss, init_state=lambda p, ex: jnp.zeros(4))
  with pytest.raises(ProblemError, match="exactly one"):
    BilevelProblem(loss=_loss, init_state=lambda p, ex: jnp.zeros(4),
                   dynamics=lambda p, s, ex: s, energy=lambda p, s, ex: jnp.sum(s))


def test_non_scalar_loss_is_rejected():
  with pytest.raises(ProblemError, match="scalar"):
    BilevelProblem(dynamics=lambda p, s, ex: -s + p["U"].sum(), loss=lambda y, ex: y,
                   init_state=lambda p, ex: jnp.zeros(4), init_params=_params,
                   example=EXAMPLE)


def test_energy_gives_negative_gradient_dynamics():
  problem = BilevelProblem(energy=lambda p, s, ex: 0.5 * jnp.sum((s - p) ** 2),
                           loss=lambda y, ex: jnp.sum(y), init_state=lambda p, ex: p)
  assert problem.has_energy
  out = problem.f(jnp.array([1.0, 2.0]), jnp.array([0.0, 0.0]), None)
  assert jnp.allclose(out, jnp.array([1.0, 2.0]))


def test_unknown_solver_lists_valid_names():
  with pytest.raises(ValueError, match="valid solvers are: .*lcp_di.*rbp"):
    solvers.get_solver("lcp_dii")


def test_unknown_solver_option_lists_valid_options():
  with pytest.raises(ValueError, match="no option.*'alpah'.*alpha"):
    solvers.get_solver("lcp_di", alpah=0.1)
  with pytest.raises(ValueError, match="unknown relaxation option"):
    solvers.get_solver("rbp", adjoint={"maxsteps": 3})


def test_out_of_range_solver_options_are_rejected():
  with pytest.raises(ValueError, match="alpha >= 0"):
    solvers.get_solver("lcp_di", alpha=-0.1)
  with pytest.raises(ValueError, match="max_steps >= 0"):
    solvers.get_solver("rbp", adjoint={"max_steps": -1})
