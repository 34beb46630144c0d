"""Every module of the package and of bench/ imports on its own, and the project's import graph has no cycle.

Whether a cycle breaks depends on which module is imported first, so (a) imports each module first, in a
process that has none of the project's modules yet, and (b) finds cycles statically, including the imports
inside functions that (a) never runs.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).parents[1]
# Folders of plain modules that are not part of the installed package, imported from the project root.
LOCAL_PACKAGES = ("bench", "tests")


def _package_modules() -> dict[str, Path]:
    """Every module of the installed package, by name, with its file. The packages are pyproject's list and
    their folders come from the import system, so package-dir (kernels/ is fastvae.kernels) is respected."""
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    modules = {}
    for package in packages:
        spec = importlib.util.find_spec(package)
        modules[package] = Path(spec.origin)
        for info in pkgutil.walk_packages(spec.submodule_search_locations, f"{package}."):
            modules[info.name] = Path(info.module_finder.find_spec(info.name).origin)
    return modules


def _local_modules(package: str) -> dict[str, Path]:
    folder = ROOT / package
    modules = {package: folder / "__init__.py"}
    for info in pkgutil.iter_modules([str(folder)], f"{package}."):
        modules[info.name] = folder / f"{info.name.rpartition('.')[2]}.py"
    return modules


def _all_modules() -> dict[str, Path]:
    modules = _package_modules()
    for package in LOCAL_PACKAGES:
        modules.update(_local_modules(package))
    return modules


# Run in a fresh interpreter: the third-party modules the project imports at module level are imported once
# up front (speed only: a module that forgets an import still fails), then each project module is imported in
# a forked child, so every one of them is the first project module its process imports; as many children at a
# time as there are cores. Forks, not fresh interpreters: ~35 of those, each importing torch, take minutes on
# 2 cores; and not one process that clears sys.modules between imports, since torch.library refuses to
# register an op twice.
_IMPORT_EACH = """
import importlib, json, os, sys, traceback
names, third_party = json.loads(sys.argv[1]), json.loads(sys.argv[2])
for name in third_party:
    try:
        importlib.import_module(name)
    except Exception:
        pass
running, failed = {}, []

def wait_one():
    pid, status = os.wait()
    if status != 0:
        failed.append(running[pid])
    del running[pid]

for name in names:
    if len(running) >= (os.cpu_count() or 1):
        wait_one()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            importlib.import_module(name)
        except BaseException:
            print(f"---- import {name} ----", file=sys.stderr)
            traceback.print_exc()
            code = 1
        sys.stderr.flush()
        os._exit(code)
    running[pid] = name
while running:
    wait_one()
print(json.dumps(sorted(failed)))
"""


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")


def _imports(path: Path, module: str, modules: dict[str, Path]) -> tuple[set[str], set[str]]:
    """(the project modules `module` imports anywhere, the names it imports at module level: modules, and
    for `from x import y` also x.y, which may be one).

    `from package import name` is an edge to package.name when that is a module, else to the package; the
    package __init__ that a submodule import runs first is no edge of its own (Python allows that cycle).
    Imports under `if TYPE_CHECKING:` never run and are left out.
    """
    edges, external = set(), set()

    def visit(node: ast.AST, in_function: bool) -> None:
        if _is_type_checking(node):
            return
        found = []
        if isinstance(node, ast.Import):
            found = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package, one level up per extra dot
                parts = module.split(".")
                parts = parts[: len(parts) - node.level + (path.name == "__init__.py")]
                base = ".".join(parts + ([base] if base else []))
            found = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
            if not in_function:  # `from x import y`: y may be a module of x
                external.update(f"{base}.{alias.name}" for alias in node.names)
        edges.update(name for name in found if name in modules and name != module)
        if not in_function:
            external.update(found)
        in_function = in_function or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        for child in ast.iter_child_nodes(node):
            visit(child, in_function)

    visit(ast.parse(path.read_text(), str(path)), False)
    return edges, external


def _graph(modules: dict[str, Path]) -> tuple[dict[str, set[str]], set[str]]:
    """module -> the project modules it imports, and the other names (third-party or standard library; maybe
    not modules) imported at module level anywhere."""
    graph, external = {}, set()
    for module, path in modules.items():
        graph[module], names = _imports(path, module, modules)
        external |= names
    ours = {module.partition(".")[0] for module in modules}
    return graph, {name for name in external if name.partition(".")[0] not in ours}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan), each as a path
    [a, b, ..., a]."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(set(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return [_cycle_through(graph, component) for component in components]


def _cycle_through(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest path from the component's first module back to itself, inside the component (BFS)."""
    start = min(component)
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(graph[node] & component):
                if target == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [*reversed(path), start]
                if target not in parents:
                    parents[target] = node
                    following.append(target)
        frontier = following
    raise AssertionError(f"no cycle in {component}")


@pytest.mark.slow
def test_every_module_imports_first_in_a_fresh_process() -> None:
    modules = _all_modules()
    # __main__ modules run the program when imported; tests/ modules are imported by pytest itself.
    names = sorted(name for name in modules if not name.endswith(".__main__") and name.partition(".")[0] != "tests")
    _, third_party = _graph(modules)
    result = subprocess.run([sys.executable, "-c", _IMPORT_EACH, json.dumps(names), json.dumps(sorted(third_party))],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-6000:]
    failed = json.loads(result.stdout.strip().splitlines()[-1])
    assert not failed, f"{failed} fail to import on their own:\n{result.stderr[-6000:]}"
    assert {"fastvae.kernels", "fastvae.export", "bench.memory"} <= set(names)  # package-dir and bench/ were found


def test_static_import_graph_has_no_cycle() -> None:
    graph, _ = _graph(_all_modules())
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_find_cycles_reports_a_cycle_as_a_path() -> None:
    graph = {"a": {"b"}, "b": {"c", "d"}, "c": {"a"}, "d": set(), "e": {"d"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []
