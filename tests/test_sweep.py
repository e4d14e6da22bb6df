"""Sweeps (launch/sweeping.py, launch/sweep.py): grid expansion, aggregation, parallel
resumable runs on the local pool, and the optional Ray backend."""

import csv
import importlib.util
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch import config as cfglib
from launch import sweeping as sweep

ROOT = Path(__file__).resolve().parent.parent
SWEEP = [sys.executable, str(ROOT / "launch" / "sweep.py")]
FAST = ["--config.num_steps=2", "--config.checkpoint_every_steps=0",
        "--config.eval_every_epochs=0", "--config.log_every_steps=1"]


def test_parse_grid_and_expand(tmp_path):
  assert sweep.parse_grid_arg("optimizer.learning_rate=1e-3, 1e-2") == (
      "optimizer.learning_rate", ["1e-3", "1e-2"])
  assert sweep.parse_grid_arg("config.problem_options.nan_batch_steps=[(1,), (2, 3)]") == (
      "problem_options.nan_batch_steps", ["(1,)", "(2, 3)"])
  with pytest.raises(cfglib.ConfigError, match="use --solvers/--seeds"):
    sweep.parse_grid_arg("seed=1,2")
  grid = [("optimizer.learning_rate", ["1e-3", "1e-2"]), ("batch_size", ["8", "16", "32"])]
  runs = sweep.expand(["lcp_di", "rbp"], [0, 1], grid, tmp_path)
  assert len(runs) == 2 * 2 * 3 * 2
  assert len({r.workdir for r in runs}) == len(runs)
  assert len({r.cell for r in runs}) == 12
  r = runs[0]
  assert r.overrides([("num_steps", "5")]) == [
      ("num_steps", "5"), ("solver", "lcp_di"), ("seed", "0"),
      ("optimizer.learning_rate", "1e-3"), ("batch_size", "8")]


def test_validation_names_the_bad_cell(tmp_path):
  runs = sweep.expand(["lcp_di", "nosuch"], [0], [], tmp_path)
  with pytest.raises(cfglib.ConfigError, match=r"sweep cell \(solver=nosuch\): unknown solver"):
    sweep.validate_runs("toy:quick", runs, [])


def _fake_summary(workdir: Path, loss: float, status="completed"):
  workdir.mkdir(parents=True)
  (workdir / "summary.json").write_text(json.dumps(
      {"status": status, "train": {"loss": loss + 1}, "eval": {"loss": loss},
       "wall_time_s": 1.0, "seconds_per_step": 0.1, "steps": 2}))


def test_aggregation_mean_std_table_csv_plot(tmp_path):
  grid = [("optimizer.learning_rate", ["0.1", "0.2"])]
  runs = sweep.expand(["a", "b"], [0, 1, 2], grid, tmp_path)
  for i, run in enumerate(runs):
    if run.solver == "b" and run.seed == 2:
      _fake_summary(run.workdir, 0.0, status="failed")
    else:
      _fake_summary(run.workdir, float(run.seed) + (10 if run.solver == "b" else 0))
  report = sweep.write_reports(tmp_path, runs, [k for k, _ in grid])
  assert report["metric"] == "eval/loss"
  cell = next(c for c in report["cells"] if c["solver"] == "a")
  assert cell["n"] == 3 and cell["eval/loss"] == pytest.approx((1.0, 1.0))  # mean, std
  cell_b = next(c for c in report["cells"] if c["solver"] == "b")
  assert cell_b["n"] == 2 and cell_b["eval/loss"] == pytest.approx((10.5, 0.7071067811865476))
  md = (tmp_path / "results.md").read_text()
  assert "| solver | optimizer.learning_rate | eval/loss |" in md
  assert "| a | 0.1 | 1 ± 1 |" in md and "2/3" in md and "Not completed:" in md
  rows = list(csv.DictReader(open(tmp_path / "results.csv")))
  assert len(rows) == 12 and {r["status"] for r in rows} == {"completed", "failed"}
  assert (tmp_path / "comparison.png").is_file()


@pytest.mark.slow
def test_local_sweep_runs_in_parallel_and_resumes(tmp_path):
  d = tmp_path / "sw"
  cmd = SWEEP + ["--config", "toy:quick", "--solvers", "lcp_di,rbp", "--seeds", "0",
                 "--workers", "2", "--sweepdir", str(d), *FAST]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
  assert "0 already done, 2 to run" in out.stdout
  for solver in ("lcp_di", "rbp"):
    summary = json.loads((d / "runs" / solver / "default" / "seed0" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["solver"] == solver
  md = (d / "results.md").read_text()
  assert "| lcp_di |" in md and "| rbp |" in md and "±" in md
  assert (d / "results.csv").is_file() and (d / "comparison.png").is_file()
  # Same command again: everything is skipped; an unfinished run is run again.
  again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
  assert again.returncode == 0 and "2 already done, 0 to run" in again.stdout
  (d / "runs" / "rbp" / "default" / "seed0" / "summary.json").unlink()
  dry = subprocess.run(cmd + ["--dry_run"], cwd=ROOT, capture_output=True, text=True)
  assert dry.returncode == 0 and "1 already done, 1 to run" in dry.stdout
  assert "--config.solver=rbp" in dry.stdout and "--config.solver=lcp_di" not in dry.stdout


@pytest.mark.slow
def test_bad_sweep_exits_2_with_one_line(tmp_path):
  out = subprocess.run(SWEEP + ["--config", "toy:quick", "--grid", "optimizer.lr=1,2",
                                "--sweepdir", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True)
  assert out.returncode == 2
  assert out.stderr.strip().startswith("error: sweep cell (solver=lcp_di, optimizer.lr=1): "
                                       "unknown config key 'config.optimizer.lr'")
  assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                    reason="Ray is an optional extra (pip install -e '.[ray]'); not installed")
@pytest.mark.slow
def test_ray_backend_local_cluster(tmp_path):
  d = tmp_path / "ray"
  out = subprocess.run(SWEEP + ["--config", "toy:quick", "--solvers", "rbp", "--seeds", "0",
                                "--workers", "1", "--backend", "ray", "--sweepdir", str(d),
                                *FAST],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
  summary = json.loads((d / "runs" / "rbp" / "default" / "seed0" / "summary.json").read_text())
  assert summary["status"] == "completed"
  assert "| rbp |" in (d / "results.md").read_text()


def _alive(pid: int) -> bool:
  try:
    state = Path(f"/proc/{pid}/status").read_text()
  except OSError:
    return False
  return "\nState:\tZ" not in state  # a zombie has exited


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux")
def test_children_die_with_a_killed_sweep(tmp_path):
  """Issue 12 item 7: kill -9 of the sweep stops its runs (they save and exit)."""
  d = tmp_path / "sweep"
  proc = subprocess.Popen(SWEEP + ["--config", "toy:long", "--solvers", "lcp_di", "--seeds",
                                   "0", "--workers", "1", "--sweepdir", str(d),
                                   "--config.num_steps=400"], cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  run_dir = d / "runs" / "lcp_di" / "default" / "seed0"
  deadline, child = time.time() + 240, None
  try:
    while time.time() < deadline and child is None:
      ckpts = list((run_dir / "checkpoints").glob("[0-9]*"))
      text = (run_dir / ".lock").read_text().strip() if (run_dir / ".lock").exists() else ""
      child = int(text) if text.isdigit() and ckpts else None
      time.sleep(0.2)
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  assert child is not None, "the run never started"
  deadline = time.time() + 120
  while _alive(child) and time.time() < deadline:
    time.sleep(0.2)
  assert not _alive(child), "the run outlived its sweep"
  assert json.loads((run_dir / "summary.json").read_text())["status"] == "interrupted"
