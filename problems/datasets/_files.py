"""File lookup shared by the data set loaders (private)."""

from __future__ import annotations

import os
from pathlib import Path

SHIPPED_DIR = Path(__file__).resolve().parent / "files"
DATA_DIR_ENV = "BILEVEL_DATA_DIR"


def missing_file_error(what: str, tried: list[Path] | Path, tfds_hint: str = "") -> FileNotFoundError:
    """FileNotFoundError naming every path tried and how to fix it."""
    paths = [tried] if isinstance(tried, Path) else list(tried)
    listed = ", ".join(str(p) for p in paths) if paths else "(no path: no data_dir given)"
    msg = (
        f"{what} not found; tried: {listed}. Fix: pass data_dir (from a config: "
        f"--config.data_dir=/path/to/data) or set the environment variable {DATA_DIR_ENV} "
        f"to the folder holding the files"
    )
    msg += f", or use TFDS ({tfds_hint})." if tfds_hint else "."
    return FileNotFoundError(msg)


def resolve_file(data_dir: str | os.PathLike | None, filename: str, what: str, tfds_hint: str = "") -> Path:
    """Path of ``filename``: the shipped copy when ``data_dir`` is None, else
    ``data_dir`` itself when it is a file, else ``data_dir / filename``.

    Raises FileNotFoundError (naming the path tried) when it does not exist.
    """
    if data_dir is None:
        path = SHIPPED_DIR / filename
    else:
        p = Path(data_dir).expanduser()
        path = p if p.is_file() else p / filename
    if not path.is_file():
        raise missing_file_error(what, path, tfds_hint)
    return path
