"""The import rule of docs/architecture.md: layers import only downward, and no module imports in a circle.

Every `import` in the library counts, including those inside functions and the module names of a package's
lazy-export table (`_LAZY`): a lazy import still ties the modules together.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Lowest first. A module may import its own layer and the layers before it; the two layers that share a
# rank (data, parallel) are siblings and import neither each other nor anything above them.
LAYERS = {
    "base": (0, ("t2v.config", "t2v.cli", "t2v.flow", "t2v.runtime")),
    "models": (1, ("t2v.models",)),
    "data": (2, ("t2v.data",)),
    "parallel": (2, ("t2v.parallel",)),
    "pipelines": (3, ("t2v.pipelines", "t2v.generation")),
    "eval": (4, ("t2v.eval",)),
    "train": (5, ("t2v.train", "t2v.bench")),
    # The root package is the facade users import (`t2v.DEFAULT_MODEL`, lazy `t2v.T2VPipeline`): above every
    # layer, so no library module may import it.
    "facade": (6, ("t2v",)),
    # The web app's page (t2v-app, app.py) may import anything; nothing in the library imports it.
    "app": (7, ("t2v.app",)),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def library_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted((ROOT / "t2v").rglob("*.py"))}


def imports_of(path: Path, name: str) -> set[str]:
    """Every module `path` imports (absolute names; relative imports resolved against `name`)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
        elif isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_LAZY" for t in node.targets):
            found.update(value.value for value in node.value.values if isinstance(value, ast.Constant))
    return found


def layer_of(module: str) -> str | None:
    best, best_len = None, -1
    for layer, (_, prefixes) in LAYERS.items():
        for prefix in prefixes:
            matches = module == prefix or (prefix != "t2v" and module.startswith(prefix + "."))
            if matches and len(prefix) > best_len:
                best, best_len = layer, len(prefix)
    return best


def graph() -> dict[str, set[str]]:
    modules = library_modules()
    return {name: {m for m in imports_of(path, name) if m in modules and m != name}
            for name, path in modules.items()}


def test_every_library_module_has_a_layer():
    assert [name for name in library_modules() if layer_of(name) is None] == []


def test_layers_import_only_downward():
    wrong = []
    for module, imported in graph().items():
        layer = layer_of(module)
        rank = LAYERS[layer][0]
        for target in imported:
            target_layer = layer_of(target)
            target_rank = LAYERS[target_layer][0]
            if target_rank > rank or (target_rank == rank and target_layer != layer):
                wrong.append(f"{module} ({layer}) imports {target} ({target_layer})")
    assert wrong == []


def test_library_never_imports_the_front():
    """The library does not import entry points, and not the `pipelines` compatibility package."""
    wrong = []
    for name, path in library_modules().items():
        for target in imports_of(path, name):
            if target.split(".")[0] in ("pipelines", "scripts", "generate", "examples", "benchmarks"):
                wrong.append(f"{name} imports {target}")
    assert wrong == []


def test_no_import_cycles():
    edges = graph()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in edges[node]:
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    assert cycles == []


def test_the_rule_catches_an_upward_import(tmp_path):
    """The checker itself: a lazy import of train from parallel, and a lazy-export table, are both seen."""
    source = tmp_path / "mod.py"
    source.write_text("def f():\n    from t2v.train import checkpoint\n_LAZY = {'EMA': 't2v.train.optim'}\n")
    imported = imports_of(source, "t2v.parallel.mod")
    assert {"t2v.train.checkpoint", "t2v.train.optim"} <= imported
    assert LAYERS[layer_of("t2v.train.checkpoint")][0] > LAYERS[layer_of("t2v.parallel.mod")][0]
    assert layer_of("t2v") == "facade" and layer_of("t2v.config") == "base"
