"""Iterations and update bias of a relaxation quorum on mnist_rnn:paper (docs/design.md).

    python -m benchmarks.quorum_mnist 100     # train 100 LCP-DI steps, then compare

Prints, over 12 batches of 64 at the trained weights: iterations per step (while-loop
trip counts, max over the batch, summed over phases), the fraction of examples a
quorum drops and the update's cosine with LCP-DI's full-batch update, for rbp,
lcp_di and lcp_di with a controlled-phase quorum of 0.98 and 0.95. Wall times are
printed too but only mean something on a quiet machine.
"""
import sys, time, jax, numpy as np
import problems
from bilevel.train import data_mesh, init_train_state, make_train_step
from launch import config as cfglib, optim, schema
from jax.flatten_util import ravel_pytree
warm = int(sys.argv[1])
def build(solver, extra=()):
  c = cfglib.load("mnist_rnn:paper", [("solver", solver), ("problem_options.eval_train_examples", "0"), *extra])
  return c, schema.build_solver(c)
c, lcp = build("lcp_di")
task = problems.make_task(c)
opt = optim.make_optimizer(schema.optimizer_config(c), c.num_epochs * task.steps_per_epoch, task.steps_per_epoch)
state = init_train_state(task.problem, lcp, opt, jax.random.key(0), task.example)
step = make_train_step(task.problem, lcp, opt, mesh=data_mesh(1))
t=time.time()
for i in range(warm):
  state, m = step(state, task.train_batch(i))
print("warm", warm, "steps", round(time.time()-t,1), "s", flush=True)
variants = {"rbp": build("rbp")[1], "lcp_di": lcp}
for q in (0.98, 0.95):
  variants[f"lcp_di quorum {q}"] = build("lcp_di", [("solvers.lcp_di.controlled.quorum", str(q))])[1]
p, sp = state.params, state.solver_params
ref = {}
for name, s in variants.items():
  f = jax.jit(lambda p, sp, b, s=s: s(task.problem, p, sp, b, jax.random.key(0)))
  its, drop, cos, times = [], [], [], []
  for j in range(12):
    b = task.train_batch(warm + j)
    est = f(p, sp, b); jax.block_until_ready(est.grads)
    t = time.perf_counter(); est = f(p, sp, b); jax.block_until_ready(est.grads); times.append(time.perf_counter()-t)
    its.append(sum(float(v.max()) for k, v in est.stats.items() if k.endswith("/iterations")))
    drop.append(float(1 - est.valid.mean()))
    g = np.asarray(ravel_pytree(est.grads)[0])
    if name == "lcp_di": ref[j] = g
    if j in ref: cos.append(float(g @ ref[j] / np.linalg.norm(g) / np.linalg.norm(ref[j])))
  print(f"{name}: iterations/step mean {np.mean(its):.0f} (min {min(its):.0f}, max {max(its):.0f}); dropped {100*np.mean(drop):.2f}%; cos with lcp_di {np.mean(cos) if cos else float('nan'):.5f} (min {min(cos) if cos else float('nan'):.5f}); median call {1e3*np.median(times):.0f} ms (loaded machine)", flush=True)
