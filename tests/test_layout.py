"""The package layout is the architecture: imports go one way (io and data at the bottom, then the adapter, the
engine, planning, and the top-level modules), no module imports the `pock_hf` facade, and there is no import circle,
counting imports inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parent.parent / "pock_hf"
# the part each sub-package is, bottom first; a module may import its own part and the parts below it
RANK = {"io": 0, "data": 0, "tuner": 1, "engine": 2, "planning": 3}
TOP_RANK = 4


def module_name(path: Path) -> str:
    parts = ("pock_hf", *path.relative_to(PACKAGE_ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE_ROOT.rglob("*.py"))}


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The pock_hf modules `name` imports, anywhere in its body; `from package import submodule` counts as the
    submodule."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("pock_hf"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("pock_hf"):
                continue
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                found.add(submodule if submodule in known else target)
    return found


def part_rank(name: str) -> int:
    parts = name.split(".")
    return RANK[parts[1]] if len(parts) > 2 or (len(parts) == 2 and parts[1] in RANK) else TOP_RANK


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imported_modules(name, path, set(known)) - {name} for name, path in known.items()}


def test_the_graph_sees_the_packages_modules():
    graph = import_graph()
    assert "pock_hf.tuner.model" in graph["pock_hf.tuner"]
    assert "pock_hf.tuner.mapping" in graph["pock_hf.planning.costs"] | graph["pock_hf.tuner"]
    assert "pock_hf.io.files" in graph["pock_hf.tuner.config"]
    assert {"pock_hf.io", "pock_hf.data", "pock_hf.tuner", "pock_hf.engine", "pock_hf.planning"} <= set(graph)


@pytest.mark.parametrize("name", sorted(import_graph()))
def test_no_module_imports_a_higher_part_or_the_facade(name):
    graph = import_graph()
    if name == "pock_hf":
        return  # the facade re-exports the public names of every part
    assert "pock_hf" not in graph[name], f"{name} imports the pock_hf facade; import the defining module instead"
    higher = sorted(target for target in graph[name] if part_rank(target) > part_rank(name))
    assert not higher, f"{name} (part rank {part_rank(name)}) imports higher parts: {higher}"
    if name.split(".")[1:2] in (["io"], ["data"]):
        foreign = sorted(t for t in graph[name] if t.split(".")[1] != name.split(".")[1])
        assert not foreign, f"{name} is at the bottom but imports {foreign}"


def test_no_import_circle():
    graph = {name: targets - {"pock_hf"} for name, targets in import_graph().items() if name != "pock_hf"}
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                raise AssertionError(f"import circle: {' -> '.join([*path[path.index(target):], target])}")
            if target not in state:
                visit(target, [*path, target])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
