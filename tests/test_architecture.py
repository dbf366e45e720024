"""The package's shape: imports flow one way through its layers, no module imports itself back, no long functions.

Layers, lowest first (a module may import its own subpackage and any lower layer, never a higher one):

    base        errors, console, hub, batch (the one batch type)
    objectives  the math: divergences, policy gradient, penalties, hidden-state loss, the mode table
    recipe      the schema (reads the mode table and the divergence names) and its loading
    models      loading, forward passes, accelerate / DeepSpeed placement
    data        formats, loading and caching, prompt order
    rollout     sampling completions
    evaluation  metrics, the held-out evaluation, reports, plots
    training    the loop and its phases, checkpoints, monitor, optimizers
    entry       the command line and the Python API: train, evaluate, cli, api, assets, push, prune
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "onpolicy_kd"

LAYERS = [
    {"errors", "console", "hub", "batch", "metrics_log"},
    {"objectives"},
    {"recipe"},
    {"models"},
    {"data"},
    {"rollout"},
    {"evaluation"},
    {"training"},
    {"train", "evaluate", "cli", "api", "assets", "push", "prune", "__init__"},
]
LAYER_OF = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Modules of the package this file imports at run time (imports under `if TYPE_CHECKING:` are hints only)."""
    tree = ast.parse(path.read_text())
    skip = {id(n) for block in ast.walk(tree) if _type_checking_block(block) for n in ast.walk(block)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found |= {n for n in names if n in known}
    return found


def unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_module_has_a_layer():
    assert {unit(m) for m in modules()} <= set(LAYER_OF), set(unit(m) for m in modules()) - set(LAYER_OF)


def test_imports_flow_down_the_layers():
    found = modules()
    wrong = []
    for name, path in found.items():
        for target in imports_of(path, set(found)):
            here, there = unit(name), unit(target)
            if here != there and LAYER_OF[there] >= LAYER_OF[here] and here != "__init__":  # the root re-exports
                wrong.append(f"{name} imports {target} ({there} is not below {here})")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    found = modules()
    graph = {name: imports_of(path, set(found)) - {name} for name, path in found.items()}
    # a package's __init__ that re-exports its modules is not a cycle with them
    graph = {name: {t for t in targets if not name.startswith(t + ".")} for name, targets in graph.items()}
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_no_function_over_80_lines():
    long = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 80:
                    long.append(f"{name}.{node.name}: {length} lines")
    assert not long, long


def test_a_cycle_would_be_found(tmp_path):
    """The cycle check itself can fail: two files importing each other."""
    (tmp_path / "a.py").write_text("from onpolicy_kd.objectives import loss\n")
    assert imports_of(tmp_path / "a.py", {"onpolicy_kd.objectives", "onpolicy_kd.objectives.loss"}) == {
        "onpolicy_kd.objectives", "onpolicy_kd.objectives.loss"}
    hinted = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from onpolicy_kd.recipe import Recipe\n"
    (tmp_path / "b.py").write_text(hinted)
    assert imports_of(tmp_path / "b.py", {"onpolicy_kd.recipe"}) == set()


def test_the_code_cites_nothing_outside_the_repository():
    root = PACKAGE.parent
    files = [*PACKAGE.rglob("*.py"), root / "README.md", *(root / "docs").glob("*.md"), *(root / "recipes").glob("*")]
    assert not [str(p) for p in files if "../shared" in p.read_text()]
