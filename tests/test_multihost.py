"""Multi-host training: 2 processes joined by ``jax.distributed.initialize`` on
localhost (CPU collectives, one device each) train exactly like one process with
2 devices.

Each process runs ``launch/run.py --coordinator localhost:PORT --num_processes 2
--process_id I``; the training loop builds a global 2-device mesh, each process feeds
only its own half of every batch (batches are pure functions of (seed, step)),
gradients are averaged across processes by the same ``pmean`` as across local
devices, orbax writes one checkpoint collectively, and process 0 writes the
metrics and summary.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from launch.checkpoint import load_params

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
RUN = [sys.executable, str(ROOT / "launch" / "run.py")]
ARGS = ["--config", "toy:quick", "--no_progress", "--config.num_steps=6",
        "--config.checkpoint_every_steps=0", "--config.eval_every_epochs=0",
        "--config.solver=lcp_kp", "--config.optimizer.polyak_start_epoch=0"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  e = dict(os.environ)
  e.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  e.pop("JAX_ENABLE_X64", None)
  return e


def _launch_pair(workdir: Path) -> tuple[list[int], list[str]]:
  port = _free_port()
  procs = [subprocess.Popen(RUN + ARGS + ["--workdir", str(workdir), "--coordinator",
                                          f"localhost:{port}", "--num_processes", "2",
                                          "--process_id", str(i)],
                            cwd=ROOT, env=_env(1), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outs = []
  for p in procs:
    try:
      outs.append(p.communicate(timeout=300)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      outs.append("(hung)\n" + (p.communicate()[0] or ""))
  return [p.returncode for p in procs], outs


def test_two_processes_match_one_process_with_two_devices(tmp_path):
  multi, single = tmp_path / "multi", tmp_path / "single"
  ref = subprocess.Popen(RUN + ARGS + ["--workdir", str(single)], cwd=ROOT, env=_env(2),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  rcs, outs = _launch_pair(multi)
  if any(rcs):  # e.g. the free port was taken meanwhile: one retry on a fresh port
    first = outs
    rcs, outs = _launch_pair(tmp_path / "multi_retry")
    multi = tmp_path / "multi_retry"
    assert not any(rcs), ("first try:\n" + "\n".join(o[-2000:] for o in first)
                          + "\nretry:\n" + "\n".join(o[-2000:] for o in outs))
  ref_out = ref.communicate(timeout=300)[0]
  assert ref.returncode == 0, ref_out[-3000:]

  s_multi = json.loads((multi / "summary.json").read_text())
  s_single = json.loads((single / "summary.json").read_text())
  assert s_multi["process_count"] == 2 and s_multi["num_devices"] == 2
  assert s_single["process_count"] == 1 and s_single["num_devices"] == 2
  assert "results:" in outs[0] and "results:" not in outs[1]  # process 0 reports
  for which in ("params", "solver_params", "average"):
    a, b = load_params(multi, which=which), load_params(single, which=which)
    for k in a:
      # Same mesh, same per-device shards, same pmean: equal up to the order of
      # the cross-device sum (identical in practice).
      np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7, err_msg=f"{which}/{k}")
  assert s_multi["train"]["loss"] == pytest.approx(s_single["train"]["loss"], rel=1e-6)
