"""Issue 10's done-criteria, measured by ``python -m benchmarks.architecture``."""

from pathlib import Path

import pytest

from benchmarks import architecture

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def measured():
  return architecture.measure(ROOT)


def _in(folders, items):
  return [i for i in items if i.split("/")[0] in folders]


def test_all_done_criteria(measured):
  """0 upward imports, 0 cycles, no sys.path edits outside the two entry scripts, no
  function over 60 lines outside benchmarks/, no file over 10% of the library, a light
  `import bilevel`, and no function-local imports in the library."""
  text, ok = architecture.report(measured)
  assert ok, text
  assert measured["local_imports"] == [], text
