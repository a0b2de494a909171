"""The package's imports point downhill: no cycles, and every arrow goes to a lower layer.

The graph is read from the source with ``ast`` and counts every import of a module of ours: at the
top level, inside functions and under ``TYPE_CHECKING``. ``kernels/`` is ``adalora_fast.kernels``.
(Importing a submodule also runs its parent packages' ``__init__``; those implicit edges are not
counted, as in every import linter: the ``__init__`` files only re-export.)
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"adalora_fast": ROOT / "adalora_fast", "adalora_fast.kernels": ROOT / "kernels"}

# Layers, bottom first. An import may go to a lower layer, or inside its own group (a module or a
# subpackage), never up and never sideways into another group of the same layer.
LAYERS: list[list[str]] = [
    ["adalora_fast.kernels"],
    ["adalora_fast.factors", "adalora_fast.backend", "adalora_fast.testing", "adalora_fast.distributed"],
    ["adalora_fast.config", "adalora_fast.reference", "adalora_fast.targets", "adalora_fast.quantized"],
    ["adalora_fast.functional"],
    ["adalora_fast.layer", "adalora_fast.saved_modules", "adalora_fast.allocator", "adalora_fast.checkpoint"],
    ["adalora_fast.peft_api"],
    ["adalora_fast.model"],
    ["adalora_fast.integrations"],
    ["adalora_fast.demo", "adalora_fast.bench"],
    ["adalora_fast.cli"],
    ["adalora_fast.__main__", "adalora_fast"],
]


def _modules() -> dict[str, Path]:
    out = {}
    for package, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if package == "adalora_fast" and parts[:1] == ["kernels"]:
                continue
            out[".".join([package, *parts])] = path
    return out


MODULES = _modules()


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    if level == 0:
        return target or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _ours(name: str) -> str | None:
    """The module of ours that importing ``name`` loads (its longest known prefix), or None."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in MODULES:
            return candidate
    return None


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                source = _resolve(module, is_package, node.level, node.module)
                # `from pkg import sub` imports the submodule pkg.sub when there is one
                targets = [f"{source}.{alias.name}" for alias in node.names] or [source]
            for name in targets:
                ours = _ours(name)
                if ours is not None and ours != module:
                    graph[module].add(ours)
    return graph


def _group(module: str) -> tuple[int, str]:
    """(layer index, group) of a module: the longest listed prefix."""
    best = None
    for index, groups in enumerate(LAYERS):
        for group in groups:
            inside = module == group or module.startswith(group + ".")
            if inside and (best is None or len(group) > len(best[1])):
                best = (index, group)
    assert best is not None, f"{module} is in no layer of LAYERS: place it there"
    return best


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_the_package():
    graph = import_graph()
    assert len(graph) > 30
    # function-local and lazy imports are counted
    assert "adalora_fast.kernels.svd_linear" in graph["adalora_fast.functional"]
    assert "adalora_fast.allocator.triton_scorer" in graph["adalora_fast.allocator.rank_allocator"]


def test_no_import_cycles():
    assert _cycles(import_graph()) == []


def test_a_cycle_is_found():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_every_import_points_downhill():
    bad = []
    for module, targets in import_graph().items():
        layer, group = _group(module)
        for target in targets:
            t_layer, t_group = _group(target)
            if t_layer > layer or (t_layer == layer and t_group != group):
                bad.append(f"{module} -> {target}")
    assert bad == []


def test_kernels_import_nothing_of_the_package():
    for module, targets in import_graph().items():
        if module.startswith("adalora_fast.kernels"):
            assert all(t.startswith("adalora_fast.kernels") for t in targets), (module, targets)


def test_no_file_points_outside_the_repository():
    outside = "../" + "shared"  # built here so that this file does not match itself
    design = "DESIGN" + ".md"
    hits = []
    for path in ROOT.rglob("*"):
        if ".git" in path.parts or not path.is_file() or path.suffix not in {".py", ".md", ".sh", ".toml"}:
            continue
        text = path.read_text(errors="replace")
        if outside in text or design in text or "shared/" + "DESIGN" in text:
            hits.append(str(path.relative_to(ROOT)))
    assert hits == []
