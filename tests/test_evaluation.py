"""The shared evaluator (problems/evaluation.py) on the toy problem: batched,
padded and split over 2 devices, it gives the plain per-example answer."""

import jax
import numpy as np
import pytest

import solvers
from problems import toy
from problems.evaluation import Evaluator


def _setup(n=21):
  opts = dict(toy._DEFAULTS, n_test=n)
  problem = toy.make_problem(opts)
  test = toy.make_data(opts)["test"]
  params = problem.init_params(jax.random.key(0), problem.example)
  return problem, test, params, solvers.get_solver("rbp")


@pytest.mark.parametrize("num_devices", [1, 2])
def test_batched_padded_means_equal_one_plain_pass(num_devices):
  assert len(jax.devices()) >= 2, "tests/conftest.py forces 2 host devices"
  problem, test, params, solver = _setup()
  ev = Evaluator(problem, residual=True, num_devices=num_devices)
  assert ev.batch_size(4, 21) % num_devices == 0
  per = ev.per_example(params, solver, test, batch_size=4)  # 21 = 5 x 4 + 1 (padded)
  free = jax.jit(solver.free_equilibrium, static_argnums=0)(problem, params, test)
  outs = jax.vmap(problem.output)(free.value)
  want = {"loss": jax.vmap(problem.loss)(outs, test),
          "mse": jax.vmap(problem.metrics)(outs, test)["mse"],
          "free/iterations": free.iterations, "free/converged_fraction": free.converged,
          "free/residual": free.residual}
  assert set(per) == set(want)
  for k, v in want.items():
    assert per[k].shape == (21,)
    np.testing.assert_allclose(per[k], np.asarray(v, np.float32), rtol=1e-5, atol=1e-7)
  means = ev.mean(params, solver, test, batch_size=4)
  for k, v in per.items():
    assert means[k] == pytest.approx(float(np.mean(v.astype(np.float64))), rel=1e-6)
  evaluate = Evaluator(problem, loss=False).make_evaluate({"test/": test}, 8)
  assert set(evaluate(params, solver)) == {"test/mse", "test/free/iterations",
                                           "test/free/converged_fraction"}
