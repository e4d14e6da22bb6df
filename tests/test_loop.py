"""The training loop's policies as plain functions (launch/loop.py, build.py, policy.py,
records.py, workdir.py, signals.py): no training, no subprocess -- fake metrics, states and checkpointers."""

import json
import os
import signal
import time
import types
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from launch import build as buildlib
from launch import loop, policy, records, signals, workdir
from launch.config import ConfigError


def config(**kw):
  c = ml_collections.ConfigDict(dict(
      solver="lcp_di", problem="toy", seed=0, on_nonfinite="stop",
      max_nonconverged_fraction=1.0, log_every_steps=2, eval_every_epochs=0,
      checkpoint_every_steps=4, num_steps=0, num_epochs=1, checkpoint_every_minutes=0.0,
      max_loss_growth=0.0, on_invalid_examples="drop"))
  c.update(kw)
  return c


class FakeCheckpointer:
  directory = Path("/ckpt")

  def __init__(self, restored=None):
    self.saved, self.restored = [], restored

  def save(self, step, state, average, host):
    self.saved.append((step, host))
    return Path(f"/ckpt/{step}")

  def path(self, step):
    return Path(f"/ckpt/{step}")

  def restore(self, state, average, mismatch_is_corrupt=False):
    return self.restored


def fake_state(step=0, finite=True):
  value = 1.0 if finite else float("nan")
  return types.SimpleNamespace(step=np.int32(step), skipped=np.int32(0),
                               params={"w": np.full(3, value)})


def make(tmp_path, cfg=None, evaluate=None, total=8):
  cfg = cfg or config()
  task = types.SimpleNamespace(evaluate=evaluate, notes="", train_batch=lambda s: s)
  setup = loop.Setup(config=cfg, workdir=tmp_path, label="toy", task=task, solver=None,
                     total=total, spe=4, n_dev=1, mesh=None, optimizer=None,
                     polyak_start=-1, avg_update=None,
                     params_finite=lambda p: np.all(np.isfinite(p["w"])),
                     log=lambda s: None, say=lambda s: None,
                     tb=records.TensorBoard(tmp_path, enabled=False))
  state = loop.LoopState(state=fake_state(), average=None, t_session=0.0)
  return setup, state


# ----- policy --------------------------------------------------------------------------

def test_nonfinite_policy_names_the_diverged_phase_and_the_fix():
  rec = {"loss": 1.0, "grad_norm": float("inf"), "adjoint/nonfinite_fraction": 0.5,
         "free/nonfinite_fraction": 0.25}
  assert policy.is_nonfinite(rec) and not policy.is_nonfinite({"loss": 1.0})
  assert policy.diverged_phases(rec) == ["free", "adjoint"]
  what, fix = policy.nonfinite_failure(rec, "rbp")
  assert what.startswith("the gradients are not finite") and "free and adjoint" in what
  assert "--config.solvers.rbp.free.strategy=anderson" in fix
  assert policy.nonfinite_failure({"loss": float("nan")}, "rbp")[0] == "the loss is not finite"
  msg = policy.failure_message(5, "x", "Fix it.", (4, "/c/4"))
  assert msg == "step 5 (batch 4): x; last good checkpoint: /c/4 (step 4). Fix it."
  assert "no checkpoint was saved" in policy.failure_message(5, "x", "y", None)


def test_convergence_policy_uses_the_limit():
  window = {"free/converged_fraction": 1.0, "controlled/converged_fraction": 0.5}
  assert policy.convergence_failure(window, 1.0, 4, "lcp_di") is None
  assert policy.convergence_failure(window, 0.6, 4, "lcp_di") is None
  what, fix = policy.convergence_failure(window, 0.1, 4, "lcp_di")
  assert what.startswith("controlled fixed point did not converge for 50.0%")
  assert "--config.solvers.lcp_di.controlled.max_steps" in fix


# ----- records ---------------------------------------------------------------------------

def test_records_helpers():
  assert records.fmt(1e-5) == "1.000e-05" and records.fmt(0.5) == "0.5" and records.fmt(3) == "3"
  assert records.mean_std([1.0, 3.0]) == (2.0, pytest.approx(2 ** 0.5))
  assert np.isnan(records.mean_std([1.0])[1]) and records.mean_std([1.0], 0.0)[1] == 0.0
  window = records.mean_records([{"loss": 1.0, "r_max": 1.0, "nonfinite_update": False},
                                 {"loss": 3.0, "r_max": 5.0, "nonfinite_update": True}])
  assert window == {"loss": 2.0, "r_max": 5.0, "nonfinite_updates": 1}
  table = records.summary_table({"train": {"loss": 0.1, "free/converged_fraction": 0.5},
                                 "wall_time_s": 1.0})
  assert "train free/converged_fraction" in table and "train loss" in table


def test_read_summary_tolerates_missing_and_torn_files(tmp_path):
  assert records.read_summary(tmp_path) == {}
  (tmp_path / "summary.json").write_text('{"status": "compl')
  assert records.read_summary(tmp_path) == {}
  records.atomic_write_json(tmp_path / "summary.json", {"status": "completed"})
  assert records.read_summary(tmp_path) == {"status": "completed"}


# ----- work directory ------------------------------------------------------------------------

def test_config_changes_and_resume_refusal(tmp_path):
  old = {"seed": 0, "num_steps": 8, "optimizer": {"learning_rate": 0.1}}
  new = {"seed": 0, "num_steps": 16, "optimizer": {"learning_rate": 0.2}}
  assert workdir.config_changes(old, new) == [("optimizer.learning_rate", 0.1, 0.2)]
  workdir.write_config(tmp_path, "toy", "cmd", old)
  with pytest.raises(ConfigError, match="holds a run with a different config"):
    workdir.check_config_compatible(tmp_path, new, print)
  (tmp_path / "summary.json").write_text(json.dumps({"status": "failed"}))
  notes = []
  workdir.check_config_compatible(tmp_path, new, notes.append)
  assert notes and notes[0].startswith("note: resuming a failed run with a changed config")


def test_default_workdir_is_a_function_of_the_command():
  c = config(solver="rbp", seed=3)
  a = workdir.default_workdir("toy:quick", c, [("solver", "rbp"), ("num_steps", "5")])
  b = workdir.default_workdir("toy:quick", c, [("num_steps", "5"), ("solver", "rbp")])
  assert a == b and str(a).startswith("runs/toy_quick/rbp_seed3_")
  assert workdir.default_workdir("toy", c, []) == Path("runs/toy/rbp_seed3")


# ----- loop functions ------------------------------------------------------------------------

def test_flush_logs_a_window_and_stops_on_nonfinite(tmp_path):
  setup, state = make(tmp_path)
  state.pending_dev = [(1, {"loss": np.float32(1.0), "nonfinite_update": np.bool_(False)}),
                       (2, {"loss": np.float32(3.0), "nonfinite_update": np.bool_(False)})]
  loop.flush(setup, state, 2, do_log=True)
  lines = records.read_jsonl(setup.metrics_path)
  assert [(r["step"], r["loss"], r["window_steps"]) for r in lines] == [(2, 2.0, 2)]
  assert state.pending_dev == [] and state.last_train["loss"] == 2.0
  state.last_good = (2, Path("/ckpt/2"))
  state.pending_dev = [(3, {"loss": np.float32("nan")})]
  with pytest.raises(policy.TrainingFailure, match=r"step 3 \(batch 2\): the loss is not "
                     r"finite; last good checkpoint: /ckpt/2 \(step 2\)"):
    loop.flush(setup, state, 3, do_log=False)
  assert records.read_jsonl(setup.metrics_path)[-1]["step"] == 3  # logged before stopping


def test_flush_skip_policy_and_nonfinite_params(tmp_path):
  setup, state = make(tmp_path, config(on_nonfinite="skip"))
  state.pending_dev = [(1, {"loss": np.float32("nan")})]
  loop.flush(setup, state, 1, do_log=False)  # skipped batches do not stop the run
  state.state = fake_state(1, finite=False)
  with pytest.raises(policy.TrainingFailure, match="the parameters are not finite"):
    loop.flush(setup, state, 1, do_log=False)


def test_log_window_stops_on_nonconvergence(tmp_path):
  setup, state = make(tmp_path, config(max_nonconverged_fraction=0.1))
  state.pending_host = [{"loss": 1.0, "controlled/converged_fraction": 0.0}]
  with pytest.raises(policy.TrainingFailure, match="controlled fixed point did not converge"):
    loop.log_window(setup, state, 4)


def test_after_step_schedules_log_eval_and_checkpoint(tmp_path):
  setup, state = make(tmp_path, config(eval_every_epochs=1), total=12,
                      evaluate=lambda params, solver: {"acc": 0.5})
  ckpt = FakeCheckpointer()
  for s in range(1, 13):
    state.pending_dev.append((s, {"loss": np.float32(s)}))
    loop.after_step(setup, ckpt, state, s)
  assert [s for s, _ in ckpt.saved] == [4, 8, 12]
  assert state.last_good == (12, Path("/ckpt/12"))
  lines = records.read_jsonl(setup.metrics_path)
  assert [r["step"] for r in lines if r["split"] == "train"] == [2, 4, 6, 8, 10, 12]
  assert [r["step"] for r in lines if r["split"] == "eval"] == [4, 8]  # the last: by train()
  assert ckpt.saved[0][1]["data_step"] == 4 and ckpt.saved[0][1]["seed"] == 0


def test_resume_restores_state_and_truncates_metrics(tmp_path):
  setup, state = make(tmp_path)
  for s in (2, 4, 6):
    records.append_jsonl(setup.metrics_path, {"step": s, "split": "train"})
  ckpt = FakeCheckpointer(restored=(4, fake_state(4), None, {"elapsed_s": 7.0}))
  assert loop.resume(setup, ckpt, state) == 4
  assert state.resumed_from == 4 and state.elapsed_before == 7.0
  assert [r["step"] for r in records.read_jsonl(setup.metrics_path)] == [2, 4]
  setup, state = make(tmp_path)
  assert loop.resume(setup, FakeCheckpointer(), state) == 0
  assert not setup.metrics_path.exists()  # never checkpointed: restart from scratch


def test_interrupt_saves_the_work_since_the_last_checkpoint(tmp_path):
  setup, state = make(tmp_path)
  state.state, state.last_good = fake_state(6), (4, Path("/ckpt/4"))
  ckpt = FakeCheckpointer()
  loop.interrupted(setup, ckpt, state)
  assert state.status == "interrupted" and [s for s, _ in ckpt.saved] == [6]
  setup, state = make(tmp_path, total=8)
  state.state, state.evaluated_at = fake_state(8), 8
  loop.interrupted(setup, FakeCheckpointer(), state)
  assert state.status == "completed"  # only the bookkeeping was left


def test_finished_before_and_summary(tmp_path):
  setup, state = make(tmp_path, total=8)
  assert loop.finished_before(setup, state, 4) is None
  records.append_jsonl(setup.metrics_path, {"step": 8, "split": "eval", "acc": 0.9})
  assert loop.finished_before(setup, state, 8) is None and state.last_eval == {"acc": 0.9}
  records.atomic_write_json(tmp_path / "summary.json", {"status": "completed", "steps": 8})
  assert loop.finished_before(setup, state, 8)["status"] == "completed"
  state.state = fake_state(8)
  summary = loop.make_summary(setup, state)
  assert summary["status"] == "completed" and summary["steps"] == 8
  assert summary["eval"] == {"acc": 0.9} and summary["epochs"] == 2.0


def test_total_steps():
  assert buildlib.resolve_total_steps(config(num_steps=5), 100) == 5
  assert buildlib.resolve_total_steps(config(num_epochs=3), 10) == 30


# ----- issue 12: nothing fails silently -------------------------------------------------------

def test_loss_growth_and_invalid_examples_end_as_diverged(tmp_path):
  """Item 8: a blow-up without NaN stops with status 'diverged' and a fix."""
  assert policy.loss_growth_failure({"loss": 50.0}, 0.1, 1000.0) is None
  assert policy.loss_growth_failure({"loss": 500.0}, 0.1, 0.0) is None  # off
  setup, state = make(tmp_path, config(max_loss_growth=1000.0))
  state.pending_dev = [(1, {"loss": np.float32(0.5)}), (2, {"loss": np.float32(1e9)})]
  with pytest.raises(policy.TrainingFailure, match="the training loss grew to") as info:
    loop.flush(setup, state, 2, do_log=True)
  assert info.value.status == "diverged" and "learning_rate" in str(info.value)
  setup, state = make(tmp_path, config(on_invalid_examples="stop"))
  state.pending_dev = [(1, {"loss": np.float32(0.5), "dropped_examples": np.int32(2)})]
  with pytest.raises(policy.TrainingFailure, match="2 example.* diverged") as info:
    loop.flush(setup, state, 1, do_log=False)
  assert info.value.status == "diverged"


def test_train_step_gets_the_invalid_examples_policy():
  """Once bilevel.train offers invalid_examples=, 'keep' keeps and 'drop'/'stop' drop."""
  opts = buildlib.train_step_options(config(on_invalid_examples="keep", on_nonfinite="skip"))
  assert opts["skip_nonfinite"] is True
  assert opts.get("invalid_examples", "keep") == "keep"
  assert buildlib.train_step_options(config(on_invalid_examples="stop")).get(
      "invalid_examples", "drop") == "drop"


def test_checkpoint_on_wall_time_at_logging_steps(tmp_path, monkeypatch):
  """Item 10: besides every N steps, a checkpoint when M minutes passed (checked when
  a window is logged)."""
  setup, state = make(tmp_path, config(checkpoint_every_steps=0, checkpoint_every_minutes=2.0),
                      total=100)
  now = [1000.0]
  monkeypatch.setattr(loop.time, "time", lambda: now[0])
  state.t_saved = 1000.0
  assert not loop.checkpoint_due(setup, state, 2, logged=True)
  now[0] += 121.0
  assert not loop.checkpoint_due(setup, state, 3, logged=False)
  assert loop.checkpoint_due(setup, state, 4, logged=True)
  assert loop.checkpoint_due(setup, state, 100, logged=False)  # the end, always
  ckpt = FakeCheckpointer()
  loop.save(setup, ckpt, state, 4)
  assert state.t_saved == now[0] and not loop.checkpoint_due(setup, state, 6, logged=True)


def test_resume_without_checkpoint_says_so(tmp_path):
  """Item 10: a restart that finds no checkpoint says it starts from step 0."""
  setup, state = make(tmp_path)
  said = []
  setup.log = said.append
  assert loop.resume(setup, FakeCheckpointer(), state) == 0
  assert said == ["no checkpoint found in /ckpt, starting from step 0"]


def test_workdir_lock_names_the_holder(tmp_path):
  """Item 6: a second process (here: a second open file) cannot take the lock."""
  fd = workdir.lock(tmp_path / "w")
  try:
    with pytest.raises(ConfigError, match=f"in use by process {os.getpid()}"):
      workdir.lock(tmp_path / "w")
  finally:
    workdir.unlock(fd)
  workdir.unlock(workdir.lock(tmp_path / "w"))  # released: free again


def test_unusable_workdir_is_one_line(tmp_path, monkeypatch):
  """Item 12: a work directory that is a file, or that cannot be written."""
  (tmp_path / "f").write_text("")
  with pytest.raises(ConfigError, match="is a file; pass another --workdir"):
    workdir.lock(tmp_path / "f")
  with pytest.raises(ConfigError, match="cannot write to work directory"):
    workdir.lock(tmp_path / "f" / "sub")

  def refuse(*a, **k):
    raise PermissionError(13, "Permission denied")
  monkeypatch.setattr(Path, "write_text", refuse)
  with pytest.raises(ConfigError, match=r"cannot write to work directory .*\(Permission "
                     r"denied\); pass a writable --workdir"):
    workdir.lock(tmp_path / "ro")


def test_signal_during_a_save_waits_for_it():
  """Item 12: SIGTERM/Ctrl-C inside a checkpoint save is raised after the save."""
  old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
  signals.install()
  try:
    done = []
    with pytest.raises(KeyboardInterrupt):
      with signals.deferred():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        done.append("saved")
    assert done == ["saved"]
    with signals.deferred(raise_after=False):  # the final save of a stopping run
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.05)
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.05)
  finally:
    for s, h in old.items():
      signal.signal(s, h)


def test_unreadable_data_file_is_named(tmp_path, monkeypatch):
  """Item 12: a truncated data file ends in one line naming it and the fix."""
  bad = tmp_path / "data.npz"
  bad.write_bytes(b"PK\x03\x04 truncated")
  monkeypatch.setattr(buildlib.problems, "make_task", lambda config: np.load(str(bad)))
  with pytest.raises(ConfigError, match=f"cannot read {bad} .*truncated or corrupt: delete "
                     "it and copy or download it again"):
    buildlib.make_task(config())


def test_curves_show_the_evaluation_metric_of_each_panel(tmp_path):
  """curves.png: the accuracy panel carries test/train accuracy from eval records too."""
  path = tmp_path / "metrics.jsonl"
  for step in range(3):
    records.append_jsonl(path, {"split": "train", "step": step, "loss": 1.0 / (step + 1),
                                "accuracy": 0.5, "free/residual_reduction": 0.1})
  records.append_jsonl(path, {"split": "eval", "step": 2, "test/accuracy": 0.6,
                              "test_accuracy": 0.6})
  evals = records.read_jsonl(path)[-1:]
  assert records._eval_keys("accuracy", evals) == ["test/accuracy", "test_accuracy"]
  assert records._eval_keys("loss", evals) == []
  assert records.plot_curves(path, tmp_path / "curves.png").is_file()
