"""The package's layering, as a table: which kcls package may import which.

A module imports only its own package and the layers below its own. Packages of one
layer are peers and never import each other. Imports inside functions count too, and so
do those under `TYPE_CHECKING`: a type is a dependency.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "kcls"

# Top to bottom (docs/architecture.md explains each).
LAYERS = [
    ["kcls.__main__"],
    ["kcls.cli"],
    ["kcls.workflows"],
    ["kcls.evaluation", "kcls.serving", "kcls.monitoring", "kcls.optimize", "kcls.ssl",
     "kcls.tuning"],
    ["kcls.train"],
    ["kcls.load"],
    ["kcls.tasks"],
    ["kcls.data", "kcls.models"],
    ["kcls.metrics", "kcls.figures", "kcls.environment", "kcls.recipes", "kcls.tracking"],
    ["kcls.config", "kcls.layout", "kcls.files"],
]


def unit(module: str) -> str:
    """The row of LAYERS a module belongs to: its package, or itself for a top-level module."""
    for row in LAYERS:
        for name in row:
            if module == name or module.startswith(name + "."):
                return name
    raise AssertionError(f"{module} is in no layer of LAYERS: add it to the table")


def layer_of(name: str) -> int:
    return next(index for index, row in enumerate(LAYERS) if name in row)


def import_graph() -> dict[str, set[str]]:
    """kcls module -> the kcls modules it imports (anywhere in it, lazily too).

    The package root `kcls` (the public facade, which imports workflows lazily) is left
    out: every module may use `kcls.__version__`.
    """
    modules = {".".join(path.relative_to(ROOT).with_suffix("").parts)
               .removesuffix(".__init__"): path for path in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
                imported |= {f"{node.module}.{alias.name}" for alias in node.names}
        graph[name] = {module for module in imported if module in modules} - {"kcls", name}
    return graph


def test_every_import_goes_down_the_layers():
    upward, sideways = [], []
    for module, imported in import_graph().items():
        if module == "kcls":
            continue
        for target in imported:
            source_unit, target_unit = unit(module), unit(target)
            if source_unit == target_unit:
                continue
            if layer_of(target_unit) < layer_of(source_unit):
                upward.append(f"{module} -> {target}")
            elif layer_of(target_unit) == layer_of(source_unit):
                sideways.append(f"{module} -> {target}")
    assert not upward, f"imports up the layers: {sorted(upward)}"
    assert not sideways, f"imports between peers of one layer: {sorted(sideways)}"


def test_no_module_imports_itself_through_others():
    graph = import_graph()
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        for imported in graph[module]:
            if imported in path:
                cycles.append(path[path.index(imported):] + [imported])
            elif imported not in done:
                visit(imported, path + [imported])
        done.add(module)

    done: set[str] = set()
    for module in graph:
        visit(module, [module])
    assert not cycles, cycles


def test_metrics_are_pure_and_the_bottom_layer_stands_alone():
    graph = import_graph()
    for module, imported in graph.items():
        bottom = ("kcls.metrics", "kcls.config", "kcls.layout", "kcls.files")
        if module != "kcls" and unit(module) in bottom:
            assert {unit(target) for target in imported} <= {unit(module)}, module
    for path in (PACKAGE / "metrics").glob("*.py"):
        source = path.read_text()
        assert "import tensorflow" not in source and "import keras" not in source, path


def test_no_problem_type_branch_outside_the_task_modules():
    # A problem type is a kcls.tasks.Task: modules elsewhere ask it, never test its name.
    branch = re.compile(r"""(==|!=)\s*["']multi(label|class)["']"""
                        r"""|["']multi(label|class)["']\s*(==|!=)"""
                        r"""|thresholds is (not )?None|\bmultilabel\s*=""")
    found = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
             for path in PACKAGE.rglob("*.py") if "tasks" not in path.parts
             for number, line in enumerate(path.read_text().splitlines(), 1)
             if branch.search(line)]
    assert not found, found


def test_no_function_is_longer_than_a_screen():
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 80:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length})")
    assert not long, long


def test_the_readme_layout_lists_every_package_and_module():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"kcls/[\w/]+(?:\.py)?", section))
    actual = {f"kcls/{path.name}" for path in PACKAGE.glob("*.py") if path.name != "__init__.py"}
    actual |= {f"kcls/{path.parent.name}/" for path in PACKAGE.glob("*/__init__.py")}
    assert actual <= listed, f"missing from the README's layout: {sorted(actual - listed)}"
    stale = {entry for entry in listed if not (ROOT / entry).exists()}
    assert not stale, f"in the README's layout but not in kcls/: {sorted(stale)}"
