"""Imports inside `lab/` flow one way (task -> model -> trainer -> run folder -> analysis -> CLI/REPL):
no module may reach itself through the modules it imports.

Every module under lab/ is parsed with `ast` (nothing is imported), and every `import` counts, at
module level or inside a function: a lazy import still ties two modules together in the design and
only hides the cycle from Python. Imports under `if TYPE_CHECKING:` never run and are skipped;
`lab/__init__.py`'s lazy name table (importlib) is not an import statement and is not followed.
"""

import ast
from pathlib import Path

LAB = Path(__file__).resolve().parent.parent / "lab"


def module_name(path: Path) -> str:
    parts = path.relative_to(LAB.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(LAB.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(node: ast.AST):
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child):
            for other in child.orelse:
                yield from _import_nodes_of(other)
            continue
        yield from _import_nodes_of(child)


def _import_nodes_of(node: ast.AST):
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        yield node
    yield from _import_nodes(node)


def _resolve(node: ast.ImportFrom, importer: str) -> str:
    if not node.level:
        return node.module or ""
    package = importer if MODULES[importer].name == "__init__.py" else importer.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def lab_imports(name: str) -> set[str]:
    """The lab modules `name` imports anywhere in its source (`from lab.runs import storage` counts as lab.runs.storage)."""
    tree = ast.parse(MODULES[name].read_text(), filename=str(MODULES[name]))
    found = set()
    for node in _import_nodes(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        else:
            base = _resolve(node, name)
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {module for module in found if module in MODULES and module != name}


GRAPH = {name: lab_imports(name) for name in MODULES}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_checker_finds_cycles_and_reads_every_kind_of_import():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    # lazy, aliased and `from lab import module` imports all count; type-checking-only ones do not
    assert {"lab.runs.storage", "lab.errors"} <= GRAPH["lab.runs.run"]
    assert "lab.models.architectures" in GRAPH["lab.training.trainer"] and "lab.tasks" in GRAPH["lab.config"]
    assert len(MODULES) > 20 and "lab.tasks.base" in MODULES and "lab.analysis.progress" in MODULES


def test_no_import_cycle_inside_lab():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# The layers, lowest first: data flows task -> model -> trainer -> run folder -> analysis -> figures
# -> the CLI and the dashboard. A module may import its own layer and the layers below it, never one above.
LAYERS = [
    ["lab", "lab.errors", "lab.schema", "lab.files"],
    ["lab.tasks"],
    ["lab.config"],
    ["lab.models"],
    ["lab.runs"],
    ["lab.training"],
    ["lab.sweeps"],
    ["lab.analysis"],
    ["lab.plots"],
    ["lab.bench"],
    ["lab.cli", "lab.dashboard_server", "lab.dashboard_timing"],
]


def layer_of(module: str) -> int:
    """The index in LAYERS of the longest prefix naming `module`'s package or module."""
    best, best_len = None, -1
    for index, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > best_len:
                best, best_len = index, len(name)
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best


def test_every_module_has_a_layer():
    for name in MODULES:
        layer_of(name)


def test_no_package_imports_one_above_it():
    upward = [f"{name} (layer {layer_of(name)}) imports {module} (layer {layer_of(module)})"
              for name in sorted(MODULES) for module in sorted(GRAPH[name])
              if module != "lab" and layer_of(module) > layer_of(name)]
    assert upward == [], "imports against the layering:\n" + "\n".join(upward)


def test_the_layering_check_can_fail():
    assert layer_of("lab.models.transformer") < layer_of("lab.training.trainer") < layer_of("lab.analysis.fourier")
    assert layer_of("lab.runs.storage") > layer_of("lab.files")


def test_tasks_models_and_storage_sit_below_what_uses_them():
    """Within the layers: tasks know nothing of experiments, the model nothing of its exports, storage
    nothing of training or models, and the errors module nothing at all."""
    assert not any(module.startswith("lab.config") for name in MODULES if name.startswith("lab.tasks") for module in GRAPH[name])
    assert "lab.models.export" not in GRAPH["lab.models.transformer"]
    assert GRAPH["lab.errors"] == set()
    assert GRAPH["lab.runs.storage"] <= {"lab.errors", "lab.files"}
