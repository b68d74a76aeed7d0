"""The code's shape, checked: no import cycles in the trainer's package, no module reaching into
another's private names, and `python -m train --help` answering without importing torch.

    .venv/bin/python -m pytest tests/test_imports.py -q      # about 2 s
"""

import ast
import subprocess
import sys

from helpers import ROOT

PACKAGE = ROOT / "train"


def module_name(path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path) -> list[tuple[str, list[str]]]:
    """(module imported, names taken from it) for every import in the file, wherever it stands:
    a function-local import can close a cycle as surely as one at the top."""
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found.append((module, [alias.name for alias in node.names]))
    return found


def package_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (`from . import x` counts as importing x)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        edges = set()
        for module, names in imports(path):
            for candidate in [f"{module}.{n}" for n in names] + [module]:
                if candidate in modules and candidate != name:
                    edges.add(candidate)
                    break
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_package_has_no_import_cycles():
    graph = package_graph()
    assert "train.recipe" in graph and "train.families.sdxl" in graph  # the walk saw them all
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_imports_another_modules_private_names():
    """A name starting with _ is its module's own: another module (the lab, the predictor, a
    test) that needs it needs a public function instead."""
    files = [*PACKAGE.rglob("*.py"), *(ROOT / "toy").rglob("*.py"), *(ROOT / "bench").rglob("*.py"),
             ROOT / "predict.py", *(ROOT / "tests").glob("*.py")]
    private = [f"{path.relative_to(ROOT)}: from {module} import {name}"
               for path in files for module, names in imports(path) for name in names
               if name.startswith("_") and not name.startswith("__")]
    assert private == []


# Libraries that take seconds to import: the functions that use them import them, so that a
# user's mistake is answered before (see train/__init__.py).
HEAVY = {"diffusers", "transformers", "accelerate", "peft", "bitsandbytes"}
# What `python -m train --help` imports, which must not import torch at the top.
BEFORE_TORCH = {"train/__init__.py", "train/cli.py", "train/distributed.py"}


def test_function_local_imports_are_only_the_deliberate_ones():
    local = []
    for path in PACKAGE.rglob("*.py"):
        name = str(path.relative_to(ROOT))
        for function in ast.walk(ast.parse(path.read_text())):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if isinstance(node, ast.Import):
                    roots = {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom):
                    roots = {"." if node.level else node.module.split(".")[0]}
                else:
                    continue
                if not (roots <= HEAVY or name in BEFORE_TORCH):
                    local.append(f"{name}:{node.lineno} imports {sorted(roots)} in a function")
    assert local == []


def test_the_command_line_answers_help_without_torch():
    code = ("import sys, runpy; sys.argv = ['train', '--help']\n"
            "try:\n    runpy.run_module('train', run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False"
