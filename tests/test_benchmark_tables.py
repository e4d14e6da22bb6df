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
