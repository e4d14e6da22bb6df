"""Small pytree arithmetic used by the engine and the solvers.

Everything here works on arbitrary pytrees of arrays so that states (neural
activities, fast weights, joint controller states) never need to be flattened by
the user.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def tree_add(a: PyTree, b: PyTree) -> PyTree:
  return jax.tree.map(jnp.add, a, b)


def tree_sub(a: PyTree, b: PyTree) -> PyTree:
  return jax.tree.map(jnp.subtract, a, b)


def tree_scale(s, a: PyTree) -> PyTree:
  return jax.tree.map(lambda x: s * x, a)


def tree_axpy(s, x: PyTree, y: PyTree) -> PyTree:
  """Returns s * x + y."""
  return jax.tree.map(lambda xi, yi: s * xi + yi, x, y)


def tree_vdot(a: PyTree, b: PyTree) -> jax.Array:
  leaves = jax.tree.leaves(jax.tree.map(lambda x, y: jnp.vdot(x, y), a, b))
  return sum(leaves, jnp.zeros((), jnp.result_type(*leaves) if leaves else jnp.float32))


def tree_norm(a: PyTree) -> jax.Array:
  """Euclidean norm of all leaves together."""
  return jnp.sqrt(tree_vdot(a, a))


def tree_zeros_like(a: PyTree) -> PyTree:
  return jax.tree.map(jnp.zeros_like, a)


def tree_all_finite(a: PyTree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(a)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def tree_mean_over_batch(a: PyTree) -> PyTree:
  return jax.tree.map(lambda x: jnp.mean(x, axis=0), a)


def same_structure(a: PyTree, b: PyTree) -> tuple[bool, str]:
  """Whether two (possibly abstract) pytrees share structure, shapes and dtypes.

  Returns (ok, reason) so callers can raise an error that names the mismatch.
  """
  sa, sb = jax.tree.structure(a), jax.tree.structure(b)
  if sa != sb:
    return False, f"tree structure {sb} differs from {sa}"
  for path_leaf_a, leaf_b in zip(jax.tree_util.tree_leaves_with_path(a),
                                 jax.tree.leaves(b)):
    path, leaf_a = path_leaf_a
    if jnp.shape(leaf_a) != jnp.shape(leaf_b):
      return False, (f"leaf {jax.tree_util.keystr(path)} has shape "
                     f"{jnp.shape(leaf_b)}, expected {jnp.shape(leaf_a)}")
  return True, ""
