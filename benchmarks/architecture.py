"""The numbers behind issue 10's done-criteria, measured from the source.

    python -m benchmarks.architecture            # this checkout
    python -m benchmarks.architecture --root /path/to/other/checkout   # e.g. before

Prints, for the library folders (``bilevel < solvers < problems < launch``, and
``configs`` read only by ``launch``):

* upward imports (a lower folder importing a higher one, or a non-launch folder
  importing ``configs``) and import cycles between folders and between modules,
  counting every import statement (module level or inside a function);
* function-local imports in the library folders;
* ``sys.path`` manipulations anywhere (allowed: ``launch/run.py``, ``launch/sweep.py``);
* functions longer than 60 lines outside ``benchmarks/``;
* the largest file as a share of the library's lines (must be < 10%);
* heavy modules loaded by ``python -X importtime -c "import bilevel"``.

Exit status 0 when every criterion holds, 1 otherwise (``tests/test_architecture.py``).
"""

from __future__ import annotations

import argparse
import ast
import re
import subprocess
import sys
from pathlib import Path

LAYERS = ("bilevel", "solvers", "problems", "launch")
LIBRARY = LAYERS + ("configs",)
ENTRY_SCRIPTS = {"launch/run.py", "launch/sweep.py"}
HEAVY = ("orbax", "matplotlib", "tqdm", "haiku", "ml_collections")
MAX_FUNCTION_LINES = 60
SKIP_DIRS = {".venv", "venv", "env", ".git", "build", "runs", "__pycache__", ".tox"}


def python_files(root: Path, folders=None) -> list[Path]:
  out = []
  for path in sorted(root.rglob("*.py")):
    rel = path.relative_to(root)
    if SKIP_DIRS & set(rel.parts) or any(p.endswith(".egg-info") for p in rel.parts):
      continue
    if folders is None or rel.parts[0] in folders:
      out.append(path)
  return out


def module_name(root: Path, path: Path) -> str:
  parts = list(path.relative_to(root).with_suffix("").parts)
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(tree: ast.AST, module: str, is_package: bool = False
            ) -> list[tuple[str, bool]]:
  """``(imported module, inside a function)`` for every import statement.

  Relative imports resolve against the module's package: the module itself for
  an ``__init__.py`` (``is_package``), else its parent."""
  out = []
  def visit(node, in_function):
    for child in ast.iter_child_nodes(node):
      inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
      if isinstance(child, ast.Import):
        out.extend((a.name, in_function) for a in child.names)
      elif isinstance(child, ast.ImportFrom):
        base = child.module or ""
        if child.level:  # relative import
          drop = child.level - 1 if is_package else child.level
          parts = module.split(".")
          pkg = parts[:len(parts) - drop]
          base = ".".join(pkg + ([base] if base else []))
        out.extend((f"{base}.{a.name}" if base else a.name, in_function)
                   for a in child.names)
      visit(child, inner)
  visit(tree, False)
  return out


def _sccs(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components with more than one node (Tarjan)."""
  index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
  def strong(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in graph.get(v, ()):
      if w not in index:
        strong(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))
  sys.setrecursionlimit(10000)
  for v in list(graph):
    if v not in index:
      strong(v)
  return out


def import_graph(root: Path) -> dict:
  modules = {module_name(root, p): p for p in python_files(root, LIBRARY)}
  upward, local, folder_graph, module_graph = [], [], {}, {}
  for mod, path in modules.items():
    src = mod.split(".")[0]
    for name, in_function in imports(ast.parse(path.read_text()), mod,
                                     path.name == "__init__.py"):
      dst = name.split(".")[0]
      if dst not in LIBRARY:
        continue
      target = next((m for m in (name, name.rsplit(".", 1)[0]) if m in modules), None)
      if target and target != mod:
        module_graph.setdefault(mod, set()).add(target)
      if in_function:
        local.append(f"{path.relative_to(root)}: {name}")
      if dst != src:
        folder_graph.setdefault(src, set()).add(dst)
        if (dst == "configs" and src != "launch") or (
            src in LAYERS and dst in LAYERS and LAYERS.index(dst) > LAYERS.index(src)):
          upward.append(f"{path.relative_to(root)}: {src} -> {name}")
  return {"upward": upward, "folder_cycles": _sccs(folder_graph),
          "module_cycles": _sccs(module_graph), "local_imports": local}


def path_hacks(root: Path) -> list[str]:
  pattern = re.compile(r"sys\.path(\.insert|\.append|\[[^\]]*\]\s*=|\s*\+=)")
  return [f"{p.relative_to(root)}:{i}" for p in python_files(root)
          for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]


def long_functions(root: Path) -> list[str]:
  out = []
  for p in python_files(root):
    rel = p.relative_to(root)
    if rel.parts[0] == "benchmarks":
      continue
    for node in ast.walk(ast.parse(p.read_text())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        n = node.end_lineno - node.lineno + 1
        if n > MAX_FUNCTION_LINES:
          out.append(f"{rel}:{node.lineno} {node.name} ({n} lines)")
  return out


def file_sizes(root: Path) -> tuple[int, str, int]:
  sizes = {str(p.relative_to(root)): len(p.read_text().splitlines())
           for p in python_files(root, LAYERS)}
  biggest = max(sizes, key=sizes.get)
  return sum(sizes.values()), biggest, sizes[biggest]


def heavy_imports(root: Path) -> list[str]:
  out = subprocess.run([sys.executable, "-X", "importtime", "-c", "import bilevel"],
                       cwd=root, capture_output=True, text=True)
  loaded = {line.split("|")[-1].strip().split(".")[0]
            for line in out.stderr.splitlines() if line.startswith("import time:")}
  return sorted(m for m in HEAVY if m in loaded)


def measure(root: Path) -> dict:
  graph = import_graph(root)
  total, biggest, biggest_lines = file_sizes(root)
  hacks = path_hacks(root)
  return {**graph, "path_hacks": hacks,
          "path_hacks_outside_entry_scripts": [h for h in hacks
                                               if h.split(":")[0] not in ENTRY_SCRIPTS],
          "long_functions": long_functions(root), "library_lines": total,
          "largest_file": biggest, "largest_file_lines": biggest_lines,
          "largest_file_share": biggest_lines / total, "heavy_imports": heavy_imports(root)}


def report(m: dict) -> tuple[str, bool]:
  checks = [
      ("upward imports", len(m["upward"]), len(m["upward"]) == 0),
      ("folder import cycles", len(m["folder_cycles"]), not m["folder_cycles"]),
      ("module import cycles", len(m["module_cycles"]), not m["module_cycles"]),
      ("sys.path manipulations (all / outside the 2 entry scripts)",
       f"{len(m['path_hacks'])} / {len(m['path_hacks_outside_entry_scripts'])}",
       not m["path_hacks_outside_entry_scripts"]),
      (f"functions > {MAX_FUNCTION_LINES} lines outside benchmarks/",
       len(m["long_functions"]), not m["long_functions"]),
      ("largest file share of bilevel+solvers+problems+launch",
       f"{100 * m['largest_file_share']:.1f}% ({m['largest_file']}, "
       f"{m['largest_file_lines']} of {m['library_lines']} lines)",
       m["largest_file_share"] < 0.10),
      ("heavy modules loaded by `import bilevel`", ", ".join(m["heavy_imports"]) or "none",
       not m["heavy_imports"]),
      ("function-local imports in the library (informative)", len(m["local_imports"]), True),
  ]
  lines = [f"{'ok ' if ok else 'NO '} {name}: {value}" for name, value, ok in checks]
  for key in ("upward", "folder_cycles", "module_cycles", "path_hacks_outside_entry_scripts",
              "long_functions"):
    lines += [f"      {key}: {item}" for item in m[key]]
  return "\n".join(lines), all(ok for _, _, ok in checks)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent)
  args = p.parse_args(argv)
  text, ok = report(measure(args.root.resolve()))
  print(text)
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
