"""The Table 2 report (benchmarks/table2_cifar_inr.py) from fake summaries: no training."""

import importlib.util
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _load(name):
  spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


LOSSY = ("CIFAR-10 LOSSY JPEG (q75) copy: pixels differ from the original; not comparable "
         "with published CIFAR-10 numbers | subset: 10000 train / 2000 test examples")


def _fake_run(sweepdir: Path, solver: str, seed: int, accuracy: float) -> None:
  workdir = sweepdir / "runs" / solver / "default" / f"seed{seed}"
  workdir.mkdir(parents=True)
  (workdir / "summary.json").write_text(json.dumps({
      "config": "cifar10_ff_quick", "problem": "cifar10_ff", "solver": solver, "seed": seed,
      "status": "completed", "reason": "", "steps": 312, "total_steps": 312, "epochs": 1.0,
      "seconds_per_step": 0.5, "wall_time_s": 200.0, "workdir": str(workdir),
      "train": {"loss": 1.0}, "notes": LOSSY,
      "eval": {"accuracy": accuracy, "loss": 1.2, "free/converged_fraction": 1.0}}))


def test_table2_report_from_fake_summaries(tmp_path, monkeypatch):
  monkeypatch.delenv("BILEVEL_DATA_DIR", raising=False)
  t2 = _load("table2_cifar_inr")
  ff = t2.PROBLEMS[0]
  _fake_run(t2.sweepdir(tmp_path, ff, "quick"), "bp", 0, 0.50)
  _fake_run(t2.sweepdir(tmp_path, ff, "quick"), "bp", 1, 0.60)
  chosen = t2.selection("ff,deq,inr", "")
  text = t2.report(tmp_path, "quick", "0,1", chosen, [], [], ["python launch/sweep.py ..."],
                   "python -m benchmarks.table2_cifar_inr", machine="test machine")
  rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines()
          if line.startswith("| ") and " / " in line}
  # mean 55.00, std over the 2 seeds (ddof 1) = 7.07; marked as made on the lossy copy
  assert f"| 77.58 / 55.00 ± {100 * math.sqrt(0.005):.2f} (2 seeds) †" in rows["BP / RBP"]
  assert "80.14 / --" in rows["BP / RBP"] and "25.47 / --" in rows["BP / RBP"]
  assert rows["LCP - DI"].count("--") == 3
  assert rows["LCP - DI (KP)"].endswith("| 77.16 / -- | n/a | n/a |")
  # mandatory labels
  assert "CPU smoke-scale run (preset `quick`), NOT the paper's protocol" in text
  assert "conv 16/32/64 + dense 256; 10000 training / 2000 test images" in text
  assert "LOSSY JPEG (q75) copy of CIFAR-10" in text and LOSSY in text
  assert "ONE image, `astronaut`" in text
  # runs table and what did not complete
  assert "| C10 FF | BP / RBP | bp | 1 | completed | 312/312 | 60.00 |" in text
  assert "C10 FF / lcp_di / seed 0" in text and "INR PSNR / rbp / seed 1" in text
  assert "C10 FF / bp / seed" not in text
  assert "- machine: test machine" in text
  # an override only INR accepts does not move the CIFAR sweeps elsewhere
  image = [("problem_options.image", "grace_hopper")]
  assert t2.sweepdir(tmp_path, ff, "quick", image) == tmp_path / "cifar10_ff_quick"
  assert t2.sweepdir(tmp_path, t2.PROBLEMS[2], "quick", image).name.startswith("inr_quick_")


def test_format_mean_std():
  common = _load("common")
  assert common.format_mean_std([]) == "--"
  assert common.format_mean_std([1.0]) == "1.00"
  assert common.format_mean_std([1.0, 3.0]) == "2.00 ± 1.41"


def _fake_omniglot_run(sweepdir: Path, solver: str, cell: str, seed: int, accuracy: float,
                       train: dict) -> None:
  workdir = sweepdir / "runs" / solver / cell / f"seed{seed}"
  workdir.mkdir(parents=True)
  (workdir / "summary.json").write_text(json.dumps({
      "solver": solver, "seed": seed, "status": "completed", "seconds_per_step": 2.0,
      "wall_time_s": 600.0, "workdir": str(workdir), "train": train,
      "eval": {"test_accuracy": accuracy, "test_accuracy_ci95": 0.01,
               "test_free_residual": 0.3, "test_free_residual_max": 1.2}}))
  curve = [{"split": "train", "step": s, "loss": loss, "accuracy": acc}
           for s, loss, acc in ((10, 1.5, accuracy / 2), (100, 1.0, accuracy))]
  (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in curve))


def test_table3_report_from_fake_summaries(tmp_path):
  """Same-protocol rows with per-phase convergence, variant rows per grid cell, and the
  paper's numbers split by where they come from."""
  t3 = _load("table3_omniglot")
  main, alpha = tmp_path / "main", tmp_path / "alpha"
  phases = {"free/converged_fraction": 0.5, "free/residual_reduction": 1e-3,
            "controlled/converged_fraction": 0.25, "controlled/residual_reduction": 2e-2}
  _fake_omniglot_run(main, "lcp", "default", 0, 0.60, phases)
  _fake_omniglot_run(main, "lcp", "default", 1, 0.70, phases)
  _fake_omniglot_run(alpha, "lcp", "solvers.lcp.alpha=1", 0, 0.40, phases)
  _fake_omniglot_run(alpha, "lcp", "solvers.lcp.alpha=0.01", 0, 0.30, phases)
  out = tmp_path / "t3.md"
  assert t3.main(["--config", "omniglot:cpu", "--seeds", "0,1", "--solvers", "lcp,cml",
                  "--sweepdir", str(main), "--variant", f"alpha sweep={alpha}",
                  "--report_only", "--no_init_row", "--out", str(out)]) == 0
  text = out.read_text()
  std = 100 * math.sqrt(0.005)
  assert (f"| LCP (`lcp`) | 65.00 ± 1.00 | {std:.2f} | 2 | 2.00 | 10.0 | "
          "free 0.50 / 1e-03; controlled 0.25 / 2e-02 | 0.30 / 1.20 |") in text
  assert "| CML (`cml`) | (no completed run)" in text
  # Training curves: first -> last window, mean over the two seeds; no H logged.
  assert "| `lcp` | 2 | 1.5 → 1 | 0.325 → 0.65 | - | - |" in text
  assert "| alpha sweep: `lcp` solvers.lcp.alpha=0.01 | 30.00 ± 1.00 | - | 1 |" in text
  assert "| alpha sweep: `lcp` solvers.lcp.alpha=1 | 40.00 ± 1.00 | - | 1 |" in text
  assert "unrotated" in text and "5-way 1-shot" in text  # the data protocol is stated
  assert "| iMAML | 94.46 ± 0.42 | quoted:" in text
  assert "| LCP | 91.00 ± 0.24 | run by the paper" in text


def test_exported_summaries_carry_no_paths_of_this_machine(tmp_path):
  common = _load("common")
  sweep = tmp_path / "sweep"
  _fake_omniglot_run(sweep, "cml", "default", 2, 0.5, {})
  (written,) = common.export_summaries(sweep, tmp_path / "committed")
  assert written == tmp_path / "committed/runs/cml/default/seed2/summary.json"
  assert written.with_name("metrics.jsonl").read_text() == (
      sweep / "runs/cml/default/seed2/metrics.jsonl").read_text()
  summary = json.loads(written.read_text())
  assert summary["workdir"] == "runs/cml/default/seed2" and summary["eval"]["test_accuracy"] == 0.5
  assert str(tmp_path) not in written.read_text()


def test_table3_rows_are_remade_from_the_committed_summaries(tmp_path):
  """The committed table's measured rows (same protocol, training curves) come from
  the summaries committed beside it: re-made here, they are the same lines."""
  t3 = _load("table3_omniglot")
  committed = ROOT / "benchmarks/results/table3_omniglot_cpu/main"
  table = (ROOT / "benchmarks/results/table3_omniglot.md").read_text()
  out = tmp_path / "t3.md"
  assert t3.main(["--config", "omniglot:cpu", "--seeds", "0,1,2", "--sweepdir", str(committed),
                  "--report_only", "--no_init_row", "--out", str(out)]) == 0
  rows = [line for line in out.read_text().splitlines()
          if line.startswith("| `") or (line.startswith("| ") and "(`" in line)]
  assert len(rows) == 2 * len(t3.ORDER), rows  # a same-protocol row and a curve row each
  for line in rows:
    assert line in table, line
