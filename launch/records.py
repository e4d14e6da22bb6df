"""What a run leaves on disk: atomic files, ``metrics.jsonl``, ``summary.json``, curves.

Every write is atomic (temporary file + fsync + rename, or one ``O_APPEND``
write per JSON line), so a run killed at any moment leaves readable files.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np

# Keys shown in the progress bar and the summary table, in order (those present).
KEY_METRICS = ("loss", "accuracy", "mse", "free/residual", "free/iterations",
               "controlled/iterations", "adjoint/iterations", "psi_norm")
SHORT_NAMES = {"loss": "loss", "accuracy": "acc", "mse": "mse", "free/residual": "res",
               "free/iterations": "it_free", "controlled/iterations": "it_ctl",
               "adjoint/iterations": "it_adj", "psi_norm": "|psi|"}
_PLOT_PANELS = ("loss", "accuracy", "mse", "free/residual_reduction",
                "controlled/residual_reduction", "free/iterations", "controlled/iterations",
                "adjoint/iterations", "free/residual", "psi_norm", "grad_norm")
_LOG_PANELS = ("loss", "mse", "grad_norm", "free/residual", "free/residual_reduction",
               "controlled/residual_reduction")


# ----- files ---------------------------------------------------------------------------

def atomic_write_text(path: os.PathLike | str, text: str) -> None:
  """Writes ``text`` to ``path`` via a temporary file + fsync + rename."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise


def atomic_write_json(path: os.PathLike | str, obj: Any) -> None:
  atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=json_default)
                    + "\n")


def atomic_savefig(fig, path: os.PathLike | str, dpi: int = 90) -> Path:
  """Saves a matplotlib figure via a temporary file + rename, then closes it."""
  import matplotlib.pyplot as plt  # noqa: PLC0415 -- heavy; only when plotting
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
  fig.savefig(tmp, dpi=dpi)
  plt.close(fig)
  os.replace(tmp, path)
  return path


def json_default(x):
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  return repr(x)


def finite_or_none(v: Any) -> Any:
  """A float as is when finite, else its repr (JSON has no inf/nan)."""
  return v if not isinstance(v, float) or math.isfinite(v) else repr(v)


def append_jsonl(path: os.PathLike | str, record: dict) -> None:
  """Appends one complete line (single write on an O_APPEND fd, then fsync)."""
  line = (json.dumps(record, sort_keys=True, default=json_default) + "\n").encode()
  fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
  try:
    os.write(fd, line)
    os.fsync(fd)
  finally:
    os.close(fd)


def read_jsonl(path: os.PathLike | str) -> list[dict]:
  """Complete, parseable lines of a JSON-lines file (a torn last line is ignored)."""
  path = Path(path)
  if not path.exists():
    return []
  out = []
  for line in path.read_text().splitlines():
    with contextlib.suppress(json.JSONDecodeError):
      if line.strip():
        out.append(json.loads(line))
  return out


def truncate_metrics(path: os.PathLike | str, last_step: int) -> None:
  """Keeps only records with ``step <= last_step`` (for a resumed run), atomically."""
  path = Path(path)
  if path.exists():
    keep = [r for r in read_jsonl(path) if int(r.get("step", 0)) <= last_step]
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in keep))


def read_json(path: os.PathLike | str) -> dict:
  """A JSON file's object, or ``{}`` when it is missing or unreadable."""
  try:
    return json.loads(Path(path).read_text())
  except (OSError, json.JSONDecodeError):
    return {}


def read_summary(workdir: os.PathLike | str) -> dict:
  """``<workdir>/summary.json``, or ``{}``."""
  return read_json(Path(workdir) / "summary.json")


def last_logged(path: os.PathLike | str, split: str) -> dict:
  """The metrics of the last ``split`` record of a metrics file (``{}`` if none)."""
  recs = [r for r in read_jsonl(path) if r.get("split") == split]
  if not recs:
    return {}
  return {k: v for k, v in recs[-1].items() if k not in ("step", "split", "epoch", "time")}


# ----- numbers -----------------------------------------------------------------------------

def fmt(v: Any) -> str:
  """A number in 4 significant digits, scientific when very large or small."""
  if isinstance(v, float):
    if v != 0 and (abs(v) >= 1e4 or abs(v) < 1e-3):
      return f"{v:.3e}"
    return f"{v:.4g}"
  return str(v)


def mean_std(values: Sequence[float], empty_std: float = float("nan")) -> tuple[float, float]:
  """Mean and sample std (ddof 1; ``empty_std`` for one value) of non-empty ``values``."""
  mean = statistics.mean(values)
  return float(mean), (float(statistics.stdev(values)) if len(values) > 1 else empty_std)


def mean_records(records: Iterable[dict]) -> dict:
  """The metrics of a logging window: means, maxima of ``*_max``, count of updates."""
  records = list(records)
  out = {}
  for k in sorted({k for r in records for k in r}):
    vals = [r[k] for r in records if k in r]
    if k.endswith("_max"):
      out[k] = float(max(vals))
    elif k == "nonfinite_update":
      out["nonfinite_updates"] = int(sum(bool(v) for v in vals))
    else:
      out[k] = float(np.mean(vals))
  return out


# ----- summary ----------------------------------------------------------------------------

def _metric_rows(split: str, metrics: dict) -> list[tuple[str, str]]:
  keys = [k for k in KEY_METRICS + ("grad_norm",) if k in metrics]
  keys += sorted(k for k in metrics if k not in keys and
                 any(w in k for w in ("accuracy", "loss", "converged_fraction",
                                      "residual_reduction"))
                 and "ci95" not in k and "controlled_loss" not in k)
  return [(f"{split} {k}", fmt(metrics[k])) for k in keys
          if isinstance(metrics[k], (int, float))]


def summary_table(summary: dict) -> str:
  """A short plain-text table of the key results."""
  rows = [("config", summary.get("config")), ("solver", summary.get("solver")),
          ("seed", summary.get("seed")), ("status", summary.get("status")),
          ("steps", f"{summary.get('steps')}/{summary.get('total_steps')}"),
          ("wall time", f"{summary.get('wall_time_s', 0):.1f} s"),
          ("s/step (median)", fmt(summary.get("seconds_per_step") or float("nan")))]
  for split in ("train", "eval"):
    rows += _metric_rows(split, summary.get(split) or {})
  if summary.get("skipped_batches"):
    rows.append(("skipped batches", summary["skipped_batches"]))
  width = max(len(r[0]) for r in rows)
  return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


# ----- curves ---------------------------------------------------------------------------------

def _finite_points(records: list[dict], key: str) -> list[tuple[float, float]]:
  return [(r["step"], r[key]) for r in records
          if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]


def _eval_keys(key: str, evals: list[dict]) -> list[str]:
  """Evaluation metrics that measure ``key`` (``test/accuracy``, ``test_accuracy``, ...)."""
  found = {k for r in evals for k in r if k == key or k.endswith(("/" + key, "_" + key))}
  return sorted(found)


def _plot_panel(ax, key: str, train: list[dict], evals: list[dict]) -> None:
  series = [(train, key, "train", "-")] + [(evals, k, f"eval {k}", "o-")
                                            for k in _eval_keys(key, evals)]
  vals = []
  for recs, k, label, style in series:
    pts = _finite_points(recs, k)
    if pts:
      xs, ys = zip(*pts)
      vals += ys
      ax.plot(xs, ys, style, label=label, markersize=3)
  ax.set_title(key, fontsize=9)
  ax.set_xlabel("step", fontsize=8)
  ax.tick_params(which="both", labelsize=7)
  if key in _LOG_PANELS and vals and min(vals) > 0:
    ax.set_yscale("log")
    ax.set_ylabel(f"{key} (log scale)", fontsize=7)
  if ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=7)


def plot_curves(metrics_path: os.PathLike | str, out_path: os.PathLike | str,
                title: str = "") -> Optional[Path]:
  """PNG of the training curves in ``metrics.jsonl`` (train and eval)."""
  records = read_jsonl(metrics_path)
  panels = [k for k in _PLOT_PANELS if any(k in r for r in records)
            or _eval_keys(k, [r for r in records if r.get("split") == "eval"])][:6]
  if not panels:
    return None
  import matplotlib  # noqa: PLC0415 -- heavy; only when plotting
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  import matplotlib.ticker  # noqa: PLC0415
  train = [r for r in records if r.get("split") == "train"]
  evals = [r for r in records if r.get("split") == "eval"]
  cols = min(3, len(panels))
  rows = math.ceil(len(panels) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
  fig.subplots_adjust(left=0.08, right=0.98, bottom=0.1, top=0.86, wspace=0.3, hspace=0.5)
  plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
  for ax, key in zip(axes.flat, panels):
    _plot_panel(ax, key, train, evals)
    if ax.get_yscale() == "log":  # 0.2, 0.5 rather than 2x10^-1 on short ranges
      ax.yaxis.set_major_formatter(plain)
      lo, hi = ax.get_ylim()
      if hi / lo < 100:
        ax.yaxis.set_minor_formatter(plain)
  for ax in list(axes.flat)[len(panels):]:
    ax.axis("off")
  if title:
    fig.suptitle(title)
  return atomic_savefig(fig, out_path)


class TensorBoard:
  """Writes scalars when tensorboardX or torch's writer is importable; else no-op."""

  def __init__(self, logdir: Path, enabled: bool):
    self.writer = None
    for mod in (("tensorboardX", "torch.utils.tensorboard") if enabled else ()):
      try:
        self.writer = __import__(mod, fromlist=["SummaryWriter"]).SummaryWriter(str(logdir))
        break
      except Exception:  # noqa: BLE001 -- optional dependency
        continue

  def scalars(self, split: str, step: int, metrics: dict) -> None:
    if self.writer is None:
      return
    for k, v in metrics.items():
      if isinstance(v, (int, float)) and math.isfinite(v):
        self.writer.add_scalar(f"{split}/{k}", v, step)
    self.writer.flush()

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()


__all__ = ["TensorBoard", "append_jsonl", "atomic_savefig", "atomic_write_json",
           "atomic_write_text", "fmt", "last_logged", "mean_records", "mean_std",
           "plot_curves", "read_json", "read_jsonl", "read_summary", "summary_table",
           "truncate_metrics"]
