"""The training loop (launch/loop.py) and checkpoints (launch/checkpoint.py) on the toy config.

Fast tier: one short run shared by a few tests (the loop's policies are unit-tested
without training in tests/test_loop.py); the other end-to-end runs are in the slow tier.

Includes the fault test: a run killed with SIGKILL mid-way and resumed ends with
exactly the parameters of an uninterrupted run.
"""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from launch import config as cfglib
from launch import loop
from launch import records as recordslib
from launch.checkpoint import load_params

ROOT = Path(__file__).resolve().parent.parent
RUN = [sys.executable, str(ROOT / "launch" / "run.py")]


_CACHE_FLAGS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
                "jax_persistent_cache_min_entry_size_bytes")


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
  """A persistent compilation cache for the in-process runs of this module: the
  many short runs below compile the same step, so only the first one pays for XLA
  compilation. Only for these sequential runs: jax writes cache entries
  non-atomically, so concurrent or killed processes must not share a cache."""
  path = tmp_path_factory.getbasetemp() / "jax_cache"
  old = {k: getattr(jax.config, k) for k in _CACHE_FLAGS}
  for k, v in zip(_CACHE_FLAGS, (str(path), 0, 0)):
    jax.config.update(k, v)
  yield path
  for k, v in old.items():
    jax.config.update(k, v)
  try:  # let later modules start without the cache (private API; best effort)
    from jax._src import compilation_cache
    compilation_cache.reset_cache()
  except Exception:  # noqa: BLE001
    pass


def toy(*pairs, spec="toy:quick"):
  return cfglib.load(spec, list(pairs))


def quiet(_msg):
  pass


def run(config, workdir, log=quiet):
  return loop.run(config, workdir, config_name="toy_quick", progress=False, log=log)


def assert_same_params(a_dir, b_dir, which=("params", "solver_params")):
  for w in which:
    a, b = load_params(a_dir, which=w), load_params(b_dir, which=w)
    flat_a, flat_b = (sorted(_flatten(t).items()) for t in (a, b))
    assert [k for k, _ in flat_a] == [k for k, _ in flat_b]
    for (k, x), (_, y) in zip(flat_a, flat_b):
      np.testing.assert_array_equal(x, y, err_msg=f"{w}/{k}")


def _flatten(tree, prefix=""):
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, f"{prefix}/{k}"))
    return out
  if isinstance(tree, (list, tuple)):
    out = {}
    for i, v in enumerate(tree):
      out.update(_flatten(v, f"{prefix}/{i}"))
    return out
  return {prefix: np.asarray(tree)}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """One short completed run (8 steps, 2 devices from conftest), shared by tests."""
  wd = tmp_path_factory.mktemp("run")
  summary = run(toy(("num_steps", "8"), ("checkpoint_every_steps", "4"),
                    ("eval_every_epochs", "0")), wd)
  return wd, summary


def test_workdir_contents(finished):
  wd, summary = finished
  for name in ("config.json", "metrics.jsonl", "summary.json", "curves.png"):
    assert (wd / name).is_file(), name
  assert sorted(int(p.name) for p in (wd / "checkpoints").iterdir()) == [4, 8]
  config = json.loads((wd / "config.json").read_text())["config"]
  assert config["solver"] == "lcp_di" and config["num_steps"] == 8
  records = recordslib.read_jsonl(wd / "metrics.jsonl")
  train = [r for r in records if r["split"] == "train"]
  evals = [r for r in records if r["split"] == "eval"]
  assert [r["step"] for r in train] == [4, 8]
  for key in ("loss", "H", "psi_norm", "free/iterations", "controlled/iterations",
              "free/residual", "free/converged_fraction", "mse", "grad_norm"):
    assert key in train[-1], key
  assert [r["step"] for r in evals] == [8] and "loss" in evals[0]
  on_disk = json.loads((wd / "summary.json").read_text())
  assert on_disk["status"] == "completed" and on_disk["steps"] == 8
  for key in ("train", "eval", "wall_time_s", "seconds_per_step", "config", "solver", "seed"):
    assert key in on_disk, key
  assert on_disk["eval"]["loss"] == evals[0]["loss"]
  assert summary["solver"] == "lcp_di" and summary["seed"] == 0
  table = recordslib.summary_table(on_disk)
  assert "eval loss" in table and "s/step" in table


def test_rerun_of_a_finished_run_is_a_no_op(finished):
  wd, summary = finished
  lines = (wd / "metrics.jsonl").read_text()
  messages = []
  again = run(toy(("num_steps", "8"), ("checkpoint_every_steps", "4"),
                  ("eval_every_epochs", "0")), wd, log=messages.append)
  assert again["steps"] == 8 and (wd / "metrics.jsonl").read_text() == lines
  assert any("already complete" in m for m in messages)


def test_changed_config_in_same_workdir_is_refused(finished):
  wd, _ = finished
  with pytest.raises(cfglib.ConfigError, match="holds a run with a different config"):
    run(toy(("num_steps", "8"), ("optimizer.learning_rate", "0.5")), wd)


@pytest.mark.slow  # trains the toy in-process
def test_resume_extends_and_matches_uninterrupted(tmp_path, finished):
  """8 steps + resume to 16 == 16 straight (params, solver params, average)."""
  pairs = [("checkpoint_every_steps", "4"), ("eval_every_epochs", "0"),
           ("solver", "lcp_kp"), ("optimizer.polyak_start_epoch", "0"),
           ("optimizer.polyak_decay", "0.5")]
  a, b = tmp_path / "a", tmp_path / "b"
  run(toy(("num_steps", "8"), *pairs), a)
  messages = []
  s = run(toy(("num_steps", "16"), *pairs), a, log=messages.append)
  assert s["resumed_from"] == 8 and any("resuming from" in m for m in messages)
  run(toy(("num_steps", "16"), *pairs), b)
  assert_same_params(a, b, which=("params", "solver_params", "average"))
  steps = [r["step"] for r in recordslib.read_jsonl(a / "metrics.jsonl") if r["split"] == "train"]
  assert steps == sorted(set(steps))  # no duplicated lines after the resume


@pytest.mark.slow  # trains the toy in-process
def test_corrupt_latest_checkpoint_is_skipped(tmp_path):
  pairs = [("num_steps", "8"), ("checkpoint_every_steps", "4"), ("eval_every_epochs", "0")]
  a, b = tmp_path / "a", tmp_path / "b"
  run(toy(*pairs), a)
  run(toy(*pairs), b)
  for f in (b / "checkpoints" / "8").rglob("*"):  # corrupt every file of the latest
    if f.is_file():
      f.write_bytes(b"\x00garbage")
  messages = []
  s = run(toy(*pairs), b, log=messages.append)
  warning = [m for m in messages if m.startswith("warning:")]
  assert warning and "checkpoints/8 is corrupt" in warning[0] and "previous" in warning[0]
  assert s["resumed_from"] == 4 and s["steps"] == 8
  assert list((b / "checkpoints_corrupt").iterdir())  # moved aside, not deleted
  assert_same_params(a, b)


@pytest.mark.slow  # trains the toy in-process
def test_partial_checkpoint_directory_is_ignored(tmp_path):
  """An unfinished (temporary) save left by a kill does not count as a checkpoint."""
  pairs = [("num_steps", "4"), ("checkpoint_every_steps", "4"), ("eval_every_epochs", "0")]
  a = tmp_path / "a"
  run(toy(*pairs), a)
  tmp = a / "checkpoints" / "8.orbax-checkpoint-tmp-123"
  (tmp / "state").mkdir(parents=True)
  (tmp / "state" / "half_written").write_bytes(b"\x00")
  s = run(toy(("num_steps", "8"), *pairs[1:]), a)
  assert s["resumed_from"] == 4 and s["status"] == "completed"


@pytest.mark.slow  # trains the toy in-process
def test_nonfinite_stops_naming_step_and_checkpoint(tmp_path):
  cfg = toy(("num_steps", "12"), ("checkpoint_every_steps", "4"),
            ("problem_options.nan_batch_steps", "(9,)"))
  with pytest.raises(loop.TrainingFailure) as info:
    run(cfg, tmp_path)
  msg = str(info.value)
  # Every example of that batch is NaN: none is left to average (loss and gradients).
  assert msg.startswith("step 10 (batch 9): the ") and " is not finite" in msg.split(";")[0]
  assert f"last good checkpoint: {tmp_path}/checkpoints/8 (step 8)" in msg
  assert "on_nonfinite=skip" in msg
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["status"] == "failed" and summary["steps"] == 8
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [4, 8]
  # The fix (skip bad batches) resumes from the last good checkpoint.
  cfg.on_nonfinite = "skip"
  s = run(cfg, tmp_path)
  assert s["status"] == "completed" and s["resumed_from"] == 8 and s["skipped_batches"] == 1


@pytest.mark.slow  # trains the toy in-process
def test_nonfinite_skip_leaves_params_unchanged(tmp_path):
  s = run(toy(("num_steps", "4"), ("on_nonfinite", "skip"), ("log_every_steps", "1"),
              ("problem_options.nan_batch_steps", "(1, 2)")), tmp_path)
  assert s["status"] == "completed" and s["skipped_batches"] == 2
  train = [r for r in recordslib.read_jsonl(tmp_path / "metrics.jsonl") if r["split"] == "train"]
  assert [r["nonfinite_updates"] for r in train] == [0, 1, 1, 0]
  assert [r["skipped_total"] for r in train] == [0, 1, 2, 2]
  params = load_params(tmp_path)
  assert all(np.isfinite(v).all() for v in params.values())


@pytest.mark.slow  # trains the toy in-process
def test_nonconvergence_stops(tmp_path):
  cfg = toy(("num_steps", "8"), ("max_nonconverged_fraction", "0.1"),
            ("solvers.lcp_di.controlled.max_steps", "2"))
  with pytest.raises(loop.TrainingFailure, match=(
      r"step 4 \(batch 3\): controlled fixed point did not converge for 100.0% .*"
      r"no checkpoint was saved before it\. Raise --config.solvers.lcp_di.controlled.max_steps")):
    run(cfg, tmp_path)


def test_plot_and_jsonl_helpers(tmp_path):
  path = tmp_path / "m.jsonl"
  recordslib.append_jsonl(path, {"step": 1, "split": "train", "loss": 1.0})
  recordslib.append_jsonl(path, {"step": 2, "split": "train", "loss": 0.5})
  with open(path, "a") as f:
    f.write('{"step": 3, "spl')  # a torn line, as a kill could leave
  assert [r["step"] for r in recordslib.read_jsonl(path)] == [1, 2]
  recordslib.truncate_metrics(path, 1)
  assert [r["step"] for r in recordslib.read_jsonl(path)] == [1]
  assert recordslib.plot_curves(path, tmp_path / "c.png").is_file()


def _wait_for_checkpoint(workdir: Path, proc, at_least: int, timeout: float = 240):
  deadline = time.time() + timeout
  while time.time() < deadline:
    d = workdir / "checkpoints"
    steps = [int(p.name) for p in d.iterdir() if p.name.isdigit()] if d.exists() else []
    if any(s >= at_least for s in steps):
      return steps
    if proc.poll() is not None:
      return None
    time.sleep(0.005)
  return None


@pytest.mark.slow
def test_sigkill_and_resume_gives_identical_params(tmp_path):
  """Kill -9 mid-run, re-run the same command: same final params as an uninterrupted run."""
  cmd = RUN + ["--config", "toy:long", "--no_progress", "--config.num_steps=40",
               "--config.solver=lcp_kp", "--config.optimizer.polyak_start_epoch=0"]
  killed, clean = tmp_path / "killed", tmp_path / "clean"
  reference = subprocess.Popen(cmd + ["--workdir", str(clean)], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  proc = subprocess.Popen(cmd + ["--workdir", str(killed)], cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    steps = _wait_for_checkpoint(killed, proc, at_least=10)
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  assert steps is not None, "the run ended before it could be killed"
  assert not (killed / "summary.json").exists()
  assert max(steps) < 40
  out = subprocess.run(cmd + ["--workdir", str(killed)], cwd=ROOT, capture_output=True,
                       text=True)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "resuming from" in out.stdout
  assert json.loads((killed / "summary.json").read_text())["resumed_from"] >= 10
  _, err = reference.communicate(timeout=300)
  assert reference.returncode == 0, err[-2000:]
  assert_same_params(killed, clean, which=("params", "solver_params", "average"))
  records = recordslib.read_jsonl(killed / "metrics.jsonl")  # complete lines only
  assert records[-1]["split"] == "eval" and records[-1]["step"] == 40


@pytest.mark.slow
def test_cli_failure_exit_code_and_message(tmp_path):
  out = subprocess.run(RUN + ["--config", "toy:quick", "--workdir", str(tmp_path / "f"),
                              "--no_progress", "--config.num_steps=6",
                              "--config.problem_options.nan_batch_steps=(2,)"],
                       cwd=ROOT, capture_output=True, text=True)
  assert out.returncode == 1
  err = out.stderr.strip().splitlines()
  i = next(i for i, line in enumerate(err) if line.startswith("error:"))
  assert err[i].startswith("error: training failed at step 3 (batch 2)")
  assert "--workdir" in err[i + 1] and "Traceback" not in out.stderr


@pytest.mark.slow  # trains the toy in-process
def test_progress_bar_and_tensorboard_writer(tmp_path, capsys, monkeypatch):
  """The bar shows ETA and live metrics; scalars go to a TensorBoard writer when one
  is installed (a stand-in tensorboardX here)."""
  import types
  written = []

  class Writer:
    def __init__(self, logdir):
      written.append(("init", logdir))

    def add_scalar(self, tag, value, step):
      written.append((tag, value, step))

    def flush(self):
      pass

    def close(self):
      pass

  monkeypatch.setitem(sys.modules, "tensorboardX", types.SimpleNamespace(SummaryWriter=Writer))
  loop.run(toy(("num_steps", "4"), ("log_every_steps", "2"), ("eval_every_epochs", "0")),
             tmp_path, progress=True, log=quiet)
  err = capsys.readouterr().err
  assert "4/4" in err and "<" in err  # tqdm's [elapsed<remaining] ETA
  for key in ("loss=", "it_free=", "it_ctl=", "|psi|="):
    assert key in err, key
  tags = {w[0] for w in written}
  assert ("init", str(tmp_path / "tensorboard")) in written
  assert {"train/loss", "train/psi_norm", "eval/loss"} <= tags
  assert sorted({w[2] for w in written if w[0] == "train/loss"}) == [2, 4]


# ----- issue 12 -----------------------------------------------------------------------------

@pytest.mark.slow  # trains the toy in-process
def test_blow_up_without_nan_ends_diverged(tmp_path):
  """Item 8: loss 1e13 with finite numbers is no longer 'completed'."""
  cfg = toy(("num_steps", "8"), ("optimizer.learning_rate", "1e6"),
            ("max_nonconverged_fraction", "1"), ("checkpoint_every_steps", "0"))
  with pytest.raises(loop.TrainingFailure, match="the training loss grew to") as info:
    run(cfg, tmp_path)
  assert info.value.status == "diverged"
  assert json.loads((tmp_path / "summary.json").read_text())["status"] == "diverged"
  cfg = toy(("num_steps", "8"), ("solvers.lcp_di.controlled.max_steps", "1"))
  with pytest.raises(loop.TrainingFailure, match="controlled fixed point did not converge"):
    run(cfg, tmp_path / "b")


@pytest.mark.slow  # trains the toy in-process
def test_structure_change_after_a_failed_run_is_refused_not_quarantined(tmp_path):
  """Item 9: a failed run, then a config that changes the model: a config change
  (refused, one line), not a corruption (nothing moved aside)."""
  with pytest.raises(loop.TrainingFailure):
    run(toy(("num_steps", "12"), ("checkpoint_every_steps", "4"),
            ("problem_options.nan_batch_steps", "(9,)")), tmp_path)
  config_json = (tmp_path / "config.json").read_text()
  with pytest.raises(cfglib.ConfigError, match=r"checkpoints/8 holds a different model .*"
                     r"train/params/.*: shape \(16, .*\) there, \(32, .*\) now"):
    run(toy(("num_steps", "12"), ("problem_options.n_hidden", "32")), tmp_path)
  assert not (tmp_path / "checkpoints_corrupt").exists()
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [4, 8]
  assert (tmp_path / "config.json").read_text() == config_json  # nothing rewritten


@pytest.mark.slow  # trains the toy in-process
def test_truncated_checkpoint_data_warning_names_the_read_error(tmp_path):
  """Item 9: an unreadable data file is a corruption, and the warning says why
  (not a 'Structure mismatch' of another template)."""
  pairs = [("num_steps", "8"), ("checkpoint_every_steps", "4"), ("eval_every_epochs", "0")]
  run(toy(*pairs), tmp_path)
  data = [f for f in (tmp_path / "checkpoints" / "8" / "state").rglob("*")
          if f.is_file() and "metadata" not in f.name.lower() and f.stat().st_size > 64]
  for f in data:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
  messages = []
  s = run(toy(*pairs), tmp_path, log=messages.append)
  warning = [m for m in messages if m.startswith("warning:")]
  assert warning and "checkpoints/8 is corrupt" in warning[0]
  assert "Structure mismatch" not in warning[0] and "not found" not in warning[0]
  assert s["resumed_from"] == 4


@pytest.mark.slow  # trains the toy in-process
def test_checkpoint_on_wall_time(tmp_path):
  """Item 10: checkpoint_every_steps=0 still checkpoints on wall time (at log steps)."""
  run(toy(("num_steps", "6"), ("checkpoint_every_steps", "0"), ("log_every_steps", "2"),
          ("checkpoint_every_minutes", "1e-9"), ("eval_every_epochs", "0")), tmp_path)
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [2, 4, 6]


def _start(cmd, workdir):
  return subprocess.Popen(cmd + ["--workdir", str(workdir)], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_second_process_on_a_workdir_is_refused_naming_the_holder(tmp_path):
  """Item 6: two launch/run.py on one work directory: the second ends in one line."""
  cmd = RUN + ["--config", "toy:long", "--no_progress", "--config.num_steps=400"]
  first = _start(cmd, tmp_path)
  try:
    assert _wait_for_checkpoint(tmp_path, first, at_least=10) is not None
    out = subprocess.run(cmd + ["--workdir", str(tmp_path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
  finally:
    first.send_signal(signal.SIGKILL)
    first.wait()
  assert out.returncode == 2
  err = out.stderr.strip().splitlines()
  assert len(err) == 1 and f"is in use by process {first.pid}" in err[0]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_ctrl_c_save_quietly_and_resume(tmp_path, sig):
  """Item 12: SIGTERM (preemption) or Ctrl-C, even during a save (a checkpoint every
  step here), stops with exit 130 and no traceback, and the same command resumes."""
  cmd = RUN + ["--config", "toy:long", "--no_progress", "--config.num_steps=60",
               "--config.checkpoint_every_steps=1", "--config.log_every_steps=1"]
  proc = _start(cmd, tmp_path)
  assert _wait_for_checkpoint(tmp_path, proc, at_least=5) is not None
  proc.send_signal(sig)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 130, err[-3000:]
  assert "Traceback" not in err and "Event loop is closed" not in err, err[-3000:]
  again = subprocess.run(cmd + ["--workdir", str(tmp_path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-2000:]
  assert "resuming from" in again.stdout
  assert json.loads((tmp_path / "summary.json").read_text())["resumed_from"] >= 5
