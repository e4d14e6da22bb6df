"""A new bilevel problem in a few lines, trained with two solvers (README example)."""
import jax, jax.numpy as jnp, optax
import solvers
from bilevel import BilevelProblem, train

# Inner equilibrium: a 2-layer net as a block-structured equilibrium (eq. 11),
# state phi = (hidden, output); its fixed point is the forward pass.
def dynamics(params, phi, example):
  hidden, out = phi
  return (-hidden + params["U"] @ example["x"],
          -out + params["V"] @ jnp.tanh(hidden))

def loss(out, example):  # outer loss on the output units
  return 0.5 * jnp.sum((out - example["target"]) ** 2)

def init_params(key, example):
  k1, k2 = jax.random.split(key)
  return {"U": jax.random.normal(k1, (32, 3)), "V": 0.1 * jax.random.normal(k2, (2, 32))}

kx, kt = jax.random.split(jax.random.key(0))
batch = {"x": jax.random.normal(kx, (16, 3)), "target": jnp.sin(jax.random.normal(kt, (16, 2)))}
problem = BilevelProblem(dynamics=dynamics, loss=loss, output=lambda phi: phi[1],
                         init_state=lambda params, ex: (jnp.zeros(32), jnp.zeros(2)),
                         init_params=init_params, example=jax.tree.map(lambda a: a[0], batch))

for name, options in [("rbp", {}), ("lcp_di", {"alpha": 1e-3})]:
  solver, optimizer = solvers.get_solver(name, **options), optax.adam(1e-2)
  state = train.init_train_state(problem, solver, optimizer, jax.random.key(1), problem.example)
  step = train.make_train_step(problem, solver, optimizer)
  for i in range(300):
    state, metrics = step(state, batch)
    if i == 0:
      first = float(metrics["loss"])
  print(f"{name}: loss {first:.3f} -> {float(metrics['loss']):.4f}, all equilibria converged: "
        f"{float(metrics['free/converged_fraction']) == 1.0}")
