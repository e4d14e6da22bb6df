#!/usr/bin/env python
"""Speed of the conv / DEQ / INR problems on this machine: seconds per training
step and fixed-point iterations per solver, with and without Anderson, plus the
CPU loop effect that shapes the design (benchmarks/results/speed_cifar.md).

Part 1 (micro): one convolution layer, repeated N times in straight-line
jitted code vs inside a ``lax.fori_loop`` body (which is a while-loop), for
the forward convolution, its input VJP as emitted by jax's transpose rule
(kernel dims ``[0, 1, o, i]``), the same VJP written with an HWIO kernel
(``problems.layers.conv2d``'s custom rule), and that in chunks of 5 steps per
loop iteration (the engine's ``steps_per_check``).

Part 2 (solvers): the quick presets of ``cifar10_ff``, ``cifar10_deq`` and
``inr`` (real data: CIFAR-10 from $BILEVEL_DATA_DIR, the INR image from
scikit-image), one jitted training step per solver; median wall time over
``--steps`` steps after a compile step, mean fixed-point iterations.

    BILEVEL_DATA_DIR=DIR python -m benchmarks.speed_cifar
    python -m benchmarks.speed_cifar --part micro     # no data needed
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import problems

from benchmarks import common
from bilevel.train import data_mesh, init_train_state, make_train_step
from launch import config as cfglib
from launch.optim import make_optimizer
from launch.records import atomic_write_text
from problems import cifar, inr, layers

DN = layers.DN


def _best_ms(fn, arg, repeats=3):
  jax.block_until_ready(fn(arg))
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(arg))
    best = min(best, time.perf_counter() - t0)
  return best * 1e3


def micro(batch: int, n: int) -> list[str]:
  """Part 1 rows (markdown)."""
  shapes = [  # (name, H, Cin, Cout, kernel, stride, padding)
      ("FF quick conv 16->32, 5x5/2, 15x15", 15, 16, 32, 5, 2, 1),
      ("FF paper conv 96->128, 5x5/2, 15x15", 15, 96, 128, 5, 2, 1),
      ("DEQ quick conv 16->32, 3x3/1, 32x32", 32, 16, 32, 3, 1, 1),
  ]
  rows = ["| layer (batch %d, %d applications) | op | straight-line ms | in while-loop ms "
          "| loop / straight | loop, 5 per iteration ms |" % (batch, n),
          "|---|---|---:|---:|---:|---:|"]
  for name, h, ci, co, k, s, p in shapes:
    key = jax.random.key(0)
    w = 0.05 * jax.random.normal(key, (k, k, ci, co))
    x = jax.random.normal(key, (batch, h, h, ci))
    h_out = (h + 2 * p - k) // s + 1
    g = jax.random.normal(key, (batch, h_out, h_out, co))
    conv = lambda z, impl="xla": jax.vmap(lambda zi: layers.conv2d(zi, w, s, p, impl))(z)

    def fwd(z):  # keeps the carry's shape: conv, then a cheap map back
      return z + 1e-3 * jnp.mean(jnp.tanh(conv(z)))

    def vjp(impl):
      def step(z):  # the cotangent depends on the carry, so nothing is loop-invariant
        _, pull = jax.vjp(lambda zz: conv(zz, impl), z)
        return jnp.tanh(pull(g * z[:, :h_out, :h_out, :1])[0])
      return step

    ops = [("forward conv", fwd), ("input VJP, jax rule (o,i kernel)", vjp("xla")),
           ("input VJP, HWIO custom rule", vjp("loop"))]
    for op_name, step in ops:
      def straight(z, step=step):
        for _ in range(n):
          z = step(z)
        return z

      def looped(z, step=step, chunk=1):
        def body(_, z):
          for _ in range(chunk):
            z = step(z)
          return z
        return lax.fori_loop(0, n // chunk, body, z)

      t_s = _best_ms(jax.jit(straight), x)
      t_l = _best_ms(jax.jit(looped), x)
      t_c = _best_ms(jax.jit(lambda z: looped(z, chunk=5)), x)
      rows.append(f"| {name} | {op_name} | {t_s:.1f} | {t_l:.1f} | {t_l / t_s:.1f}x | {t_c:.1f} |")
      print(rows[-1], flush=True)
  return rows


# ----------------------------------------------------------------- part 2

CASES = {
    "cifar10_ff": [("bp", {}), ("rbp", {}), ("lcp_di", {}), ("lcp_kp", {}),
                   ("lcp_di", {"solvers.lcp_di.controlled.steps_per_check": 1}),
                   ("rbp", {"problem_options.conv_impl": "xla"}),
                   ("lcp_di", {"problem_options.conv_impl": "xla"})],
    "cifar10_deq": [("rbp", {}), ("lcp_di", {}),
                    ("rbp", {"problem_options.conv_impl": "xla"}),
                    ("lcp_di", {"problem_options.conv_impl": "xla"})],
    "inr": [("rbp", {}), ("lcp_di", {})],
}


def _set(config, dotted: str, value) -> None:
  node = config
  *parents, leaf = dotted.split(".")
  for part in parents:
    node = node[part]
  node[leaf] = value


def use_synthetic_data(n_train: int) -> None:
  """TIMING ONLY: replaces the CIFAR-10 files and the INR image by random
  arrays of the same shapes (for a machine without the data). Never used for
  accuracy numbers; the rows say so."""
  rng = np.random.default_rng(0)

  def load_split(config, split):
    n = n_train if split == "train" else max(n_train // 5, 100)
    return (rng.standard_normal((n, 32, 32, 3)).astype(np.float32),
            rng.integers(0, 10, n).astype(np.int32), "SYNTHETIC random inputs (timing only)")

  cifar.load_split = load_split
  inr.load_image = lambda name, size: rng.random((size, size, 3)).astype(np.float32)


def solver_rows(names: list[str], steps: int, anderson: bool, preset: str = "quick",
                variants: bool = True) -> list[str]:

  rows = []
  presets = [preset] + ([f"{preset}+anderson" if preset else "anderson"] if anderson else [])
  for name in names:
    for variant_preset in presets:
      spec = f"{name}:{variant_preset}" if variant_preset else name
      base = cfglib.load(spec)
      task = problems.make_task(base)
      for solver_name, overrides in CASES[name]:
        if overrides and not variants:
          continue
        if variant_preset != preset and (overrides or solver_name == "bp"):
          continue  # Anderson rows: the default variant of each iterative solver only
        config = cfglib.load(spec)
        config.solver = solver_name
        for k, v in overrides.items():
          _set(config, k, v)
        if "problem_options.conv_impl" in overrides:
          task_c = problems.make_task(config)
        else:
          task_c = task
        solver = cfglib.build_solver(config)
        opt = make_optimizer(cfglib.optimizer_config(config), 1000, task_c.steps_per_epoch)
        state = init_train_state(task_c.problem, solver, opt, jax.random.key(0),
                                 task_c.example)
        step = make_train_step(task_c.problem, solver, opt, mesh=data_mesh(1))
        batches = [jax.tree.map(jnp.asarray, task_c.train_batch(i)) for i in range(steps + 2)]
        t0 = time.perf_counter()
        for b in batches[:2]:  # the second call recompiles: the state comes back sharded
          state, m = step(state, b)
          jax.block_until_ready(m)
        compile_s = time.perf_counter() - t0
        times, iters = [], {}
        for b in batches[2:]:
          t0 = time.perf_counter()
          state, m = step(state, b)
          m = jax.device_get(m)
          times.append(time.perf_counter() - t0)
          for k, v in m.items():
            if k.endswith("/iterations"):
              iters.setdefault(k.split("/")[0], []).append(float(v))
        it = ", ".join(f"{k} {np.mean(v):.1f}" for k, v in sorted(iters.items()))
        variant = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in overrides.items()) or "default"
        strategy = "anderson" if "anderson" in variant_preset else "euler"
        if name == "inr" and solver_name == "lcp_di":
          strategy += " (controlled: anderson)"
        rows.append(f"| {name} | {solver_name} | {variant} | {strategy} | "
                    f"{statistics.median(times):.3f} | {compile_s:.0f} | {it} |")
        print(rows[-1], flush=True)
  return rows


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--part", choices=("all", "micro", "solvers"), default="all")
  p.add_argument("--problems", default="cifar10_ff,cifar10_deq,inr")
  p.add_argument("--steps", type=int, default=4, help="timed steps per solver")
  p.add_argument("--no_anderson", action="store_true")
  p.add_argument("--preset", default="quick", help="config preset ('' = paper scale)")
  p.add_argument("--no_variants", action="store_true",
                 help="skip the conv_impl / steps_per_check variant rows")
  p.add_argument("--synthetic", type=int, default=0, metavar="N",
                 help="TIMING ONLY: random inputs (N training images) instead of the data")
  p.add_argument("--micro_batch", type=int, default=16)
  p.add_argument("--micro_n", type=int, default=20)
  p.add_argument("--out", default=str(ROOT / "benchmarks/results/speed_cifar.md"))
  args = p.parse_args(argv)
  command = "python -m benchmarks.speed_cifar " + " ".join(argv or sys.argv[1:])
  header = [f"Machine: {common.machine_with_load()}.", ""]
  out = []
  if args.part in ("all", "micro"):
    out += ["## 1. Convolutions inside loop bodies (CPU)", ""] + micro(args.micro_batch, args.micro_n)
    out.append("")
  if args.part in ("all", "solvers"):
    if args.synthetic:
      use_synthetic_data(args.synthetic)
    scale = f"preset '{args.preset}'" if args.preset else "paper-scale defaults"
    data = ("SYNTHETIC random inputs, timing only" if args.synthetic else
            "real data: CIFAR-10 via $BILEVEL_DATA_DIR, INR image from the config")
    out += [f"## 2. Seconds per training step and fixed-point iterations ({scale}; {data})", "",
            "| config | solver | variant | strategy | s/step (median) | compile + 2 steps s | "
            "mean iterations per example |", "|---|---|---|---|---:|---:|---|"]
    out += solver_rows(args.problems.split(","), args.steps, not args.no_anderson,
                       args.preset, not args.no_variants)
  footer = ["", f"Load average at the end: {os.getloadavg()[0]:.1f}."]
  title = ["# Speed of the conv / DEQ / INR problems: convolutions in loops, s/step, iterations",
           ""]
  text = "\n".join(title + [f"Command: `{command.strip()}`", ""] + header + out + footer) + "\n"
  atomic_write_text(args.out, text)
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
