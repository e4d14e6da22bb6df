"""The README's example is the shipped example file, and it runs and learns."""

import pathlib
import re
import runpy

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_example_is_the_example_file():
  readme = (ROOT / "README.md").read_text()
  block = re.search(r"## A new bilevel problem.*?```python\n(.*?)```", readme, re.S).group(1)
  example = (ROOT / "examples" / "toy_bilevel.py").read_text()
  # The README shows the file without its docstring and final print.
  assert block.strip() in example


def test_example_trains_with_two_solvers(capsys):
  runpy.run_path(str(ROOT / "examples" / "toy_bilevel.py"), run_name="__main__")
  out = capsys.readouterr().out
  for name in ("rbp", "lcp_di"):
    line = next(l for l in out.splitlines() if l.startswith(name))
    before, after = map(float, re.findall(r"loss ([\d.]+) -> ([\d.]+)", line)[0])
    assert after < 0.1 * before, line
    assert line.endswith("True"), line


def test_ci_runs_exactly_the_readme_test_command():
  readme = (ROOT / "README.md").read_text()
  command = re.search(r"Tests:\n\n```bash\n(.*?)\n```", readme, re.S).group(1).strip()
  ci = (ROOT / ".ci" / "run").read_text().splitlines()
  assert command in ci and "-m \"slow or not slow\"" in command
  assert any(line.startswith("python3 -m venv") for line in ci)
