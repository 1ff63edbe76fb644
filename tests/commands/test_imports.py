"""The import graph of `t2po/` has no cycles (imports at module level and inside functions, and
`importlib.import_module("t2po.x")` with a literal name, read from the source with `ast`), and the config imports
neither environments nor models at module level
(they are imported inside the functions that need them)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "t2po"


def _module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_imports(lazy: bool = True, package: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the t2po modules it imports: at module level, and with `lazy` also inside functions
    (an import moved into a function still ties the two modules together). `from pkg import name`
    counts the submodule `pkg.name` when it exists; importing `a.b.c` counts the packages `a`, `a.b`."""
    modules = {_module_name(p, package): p for p in package.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        deps: set[str] = set()
        tree = ast.parse(path.read_text())
        module_level_calls = {n for stmt in tree.body if not isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                                ast.ClassDef))
                              for n in ast.walk(stmt)}
        for node in (ast.walk(tree) if lazy else tree.body):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative import
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                targets = [module] + [f"{module}.{a.name}" for a in node.names]
            elif (name_ := _import_module_literal(node)) is not None:
                if lazy or node in module_level_calls:
                    targets = [name_]
                else:
                    continue
            else:
                continue
            for target in targets:
                if target in modules:
                    deps.add(target)
                # importing a.b.c runs a/__init__ and a/b/__init__ first
                parts = target.split(".")
                deps.update(".".join(parts[:k]) for k in range(1, len(parts)) if ".".join(parts[:k]) in modules)
        deps.discard(name)
        # a package's own __init__ importing its submodules is how packages work, not a cycle
        graph[name] = {d for d in deps if not (d.startswith(name + ".") and is_package)
                       and not name.startswith(d + ".")}
    return graph


def _import_module_literal(node: ast.AST) -> str | None:
    """The module name of `importlib.import_module("a.b")` or `import_module("a.b")` with a literal
    string (an import by name is still an import); None for any other node."""
    if not (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)):
        return None
    func = node.func
    called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    return node.args[0].value if called == "import_module" else None


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles():
    cycle = find_cycle(module_imports())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_cycles_between_the_package_layers():
    """Folded to the layers (t2po.trainer, t2po.envs, t2po.sft, ...): trainer/ <-> sft.py was one."""
    layer = lambda m: ".".join(m.split(".")[:2])  # noqa: E731
    graph: dict[str, set[str]] = {}
    for module, deps in module_imports().items():
        graph.setdefault(layer(module), set()).update(layer(d) for d in deps if layer(d) != layer(module))
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle between layers: " + " -> ".join(cycle)


def test_the_checker_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_graph_counts_imports_by_literal_name(tmp_path):
    """`importlib.import_module("t2po.b")` ties a to b as `import t2po.b` would: the hidden cycle
    models -> tiny_models -> models was written that way."""
    package = tmp_path / "t2po"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("import importlib\n\ndef f():\n    return importlib.import_module('t2po.b')\n")
    (package / "b.py").write_text("from importlib import import_module\nx = import_module('t2po.a')\n")
    graph = module_imports(package=package)
    assert graph["t2po.a"] == {"t2po.b"} and graph["t2po.b"] == {"t2po.a"}
    assert module_imports(lazy=False, package=package)["t2po.a"] == set()
    assert find_cycle(graph) == ["t2po.a", "t2po.b", "t2po.a"]


def test_config_imports_neither_environments_nor_models():
    deps = module_imports(lazy=False)["t2po.config"]
    assert not any(d == "t2po.models" or d == "t2po.envs" or d.startswith("t2po.envs.") for d in deps), deps
