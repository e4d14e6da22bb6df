"""The solver contract, for every registered solver on every zoo problem it applies to.

A solver added to ``solvers.REGISTRY`` is tested here the moment it is
registered: its gradients have the params' (and solver params') structure,
shapes and dtypes and are finite, its phase stats are typed
(:class:`bilevel.solver.PhaseStats`) with a leading batch axis, and where the
zoo has an exact reference (eq. 5 for the implicit solvers) it matches it.
A solver declares that it does not apply to a problem by raising ValueError
in ``init`` (e.g. ``needs_energy``, missing hooks); that case is skipped with
the reason.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import pytest

import solvers
import zoo
from bilevel.solver import GradientEstimate, PhaseStats

# Exact references: solver -> (options tight enough to meet them, tolerance).
IMPLICIT_REFERENCE = {
    "rbp": {"free": zoo.TIGHT_FREE, "adjoint": {"rtol": 1e-12, "max_steps": 5000,
                                                "strategy": "anderson",
                                                "strategy_options": {"dt": 0.3}}},
    "imaml": {"free": zoo.TIGHT_FREE, "adjoint": {"rtol": 1e-13, "max_steps": 200}},
}
# Small budgets where they cost compile time; a free phase that converges on
# every zoo problem (the default Euler dt = 1 diverges on the synapses).
FAST = {"lcp_lf": {"noise_steps": 8}, "bp": {"num_steps": 20}}
STABLE_FREE = {"free": zoo.TIGHT_FREE}


@functools.lru_cache(maxsize=None)
def _instance(name):
  return zoo.CONTRACT_ZOO[name]()


def _applies(solver, instance):
  """solver_params, or pytest.skip with the solver's own reason."""
  problem, params, _ = instance
  try:
    return solver.init(problem, params, jax.random.key(0))
  except ValueError as e:
    pytest.skip(f"{solver.name} does not apply to {problem.name}: {e}")


@pytest.mark.parametrize("problem_name", sorted(zoo.CONTRACT_ZOO))
@pytest.mark.parametrize("solver_name", sorted(solvers.REGISTRY))
def test_solver_contract(solver_name, problem_name):
  instance = _instance(problem_name)
  problem, params, batch = instance
  options = IMPLICIT_REFERENCE.get(solver_name, {**STABLE_FREE, **FAST.get(solver_name, {})})
  solver = solvers.get_solver(solver_name, **options)
  solver_params = _applies(solver, instance)
  call = lambda p, sp, b, k: solver(problem, p, sp, b, k)
  est = jax.jit(call)(params, solver_params, batch, jax.random.key(3))
  assert isinstance(est, GradientEstimate)
  chex.assert_trees_all_equal_shapes_and_dtypes(est.grads, params)
  chex.assert_trees_all_equal_shapes_and_dtypes(est.solver_grads, solver_params)
  chex.assert_tree_all_finite((est.grads, est.solver_grads, est.loss))
  size = jax.tree.leaves(batch)[0].shape[0]
  chex.assert_shape(est.loss, ())
  chex.assert_shape(est.valid, (size,))
  assert "free" in est.phases
  for phase in est.phases.values():
    assert isinstance(phase, PhaseStats)
    chex.assert_tree_shape_prefix(phase, (size,))
    assert phase.converged.dtype == jnp.bool_ and phase.status.dtype == jnp.int32
  chex.assert_tree_shape_prefix(est.extras, (size,))
  if solver_name in IMPLICIT_REFERENCE:
    exact = zoo.exact_implicit_gradient(problem, params, batch)
    err = zoo.rel_err(zoo.flat(est.grads), zoo.flat(exact))
    assert err < 1e-7, f"{solver_name} on {problem_name}: max relative error {err:.2e}"


def test_contract_covers_every_registered_solver():
  """The parametrisation above is the registry itself, not a copied list."""
  assert set(solvers.REGISTRY) >= {"bp", "rbp", "imaml", "lcp_di", "lcp_kp", "lcp_ebd",
                                   "lcp_direct", "lcp_lf", "cml", "fomaml", "reptile",
                                   "t1t2"}
