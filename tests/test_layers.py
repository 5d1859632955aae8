"""The package's layering: no import cycles, pure metrics, a layout module that needs nothing."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "kcls"


def import_graph() -> dict[str, set[str]]:
    """kcls module -> the kcls modules it imports (anywhere in it, lazily too).

    The package root `kcls` (the public facade, which imports `kcls.run` lazily) is left
    out: every module may use `kcls.__version__`.
    """
    modules = {".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
               .removesuffix(".__init__"): path for path in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
        graph[name] = {module for module in imported if module in modules} - {"kcls", name}
    return graph


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


def test_metrics_are_pure_and_the_layout_stands_alone():
    graph = import_graph()
    assert graph["kcls.metrics"] == set() and graph["kcls.layout"] == set()
    source = (PACKAGE / "metrics.py").read_text()
    assert "import tensorflow" not in source and "import keras" not in source
    # The metrics feed the report and the evaluation command, never the reverse.
    assert "kcls.metrics" in graph["kcls.report"] and "kcls.report" in graph["kcls.evaluate"]
