"""Imports point one way: loadtest -> trainer -> updater -> server, and no module imports itself back.

Reads every module's AST, imports inside functions and ``importlib.import_module("...")`` calls
included; imports under ``if TYPE_CHECKING:`` are for annotations only and never run, so they are
not edges. ``from package import name`` counts as an import of ``package.name`` when that is a
module, else of ``package``. Python also runs a package's ``__init__`` before any of its
submodules; that implicit step is not an edge here, the explicit imports are.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("server", "updater", "trainer", "loadtest")  # lowest first


def _modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The project module ``name`` is, or lies in; None outside the project."""
    parts = name.split(".")
    while parts and ".".join(parts) not in MODULES:
        parts.pop()
    return ".".join(parts) or None


def _typing_only(tree: ast.AST) -> set:
    """The nodes under ``if TYPE_CHECKING:``."""
    return {inner for node in ast.walk(tree) if isinstance(node, ast.If) and
            getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING"
            for statement in node.body for inner in ast.walk(statement)}


def _imported(module: str, tree: ast.AST):
    """(imported project module, line) for every import in ``tree`` that can run."""
    is_package = MODULES[module].name == "__init__.py"
    skipped = _typing_only(tree)
    for node in ast.walk(tree):
        if node in skipped:
            continue
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == \
                "import_module" and node.args and isinstance(node.args[0], ast.Constant):
            names = [node.args[0].value]
        for name in names:
            target = _resolve(name)
            if target is not None and target != module:
                yield target, node.lineno


GRAPH = {module: {} for module in MODULES}
for _module, _path in MODULES.items():
    for _target, _line in _imported(_module, ast.parse(_path.read_text(), str(_path))):
        GRAPH[_module].setdefault(_target, _line)


def test_no_module_imports_from_a_higher_package():
    rank = {package: i for i, package in enumerate(PACKAGES)}
    upward = [f"{MODULES[m].relative_to(ROOT)}:{line} imports {t}" for m, targets in GRAPH.items()
              for t, line in targets.items() if rank[t.split(".")[0]] > rank[m.split(".")[0]]]
    assert not upward, "imports that reach up:\n" + "\n".join(upward)


def test_no_import_cycles():
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components, iteratively
        work = [(v, iter(GRAPH[v]))]
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(GRAPH[child])))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        component.append(w)
                        if w == node:
                            break
                    if len(component) > 1:
                        cycles.append(sorted(component))

    for module in GRAPH:
        if module not in index:
            visit(module)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_checker_sees_imports_inside_functions_but_not_typing_only_ones():
    tree = ast.parse("def f():\n    from updater.applier import DeltaApplier\n    importlib.import_module('trainer.cli')\n"
                     "if TYPE_CHECKING:\n    from loadtest.cli import main\n")
    assert {t for t, _ in _imported("server.runtime.ranker", tree)} == {"updater.applier", "trainer.cli"}
