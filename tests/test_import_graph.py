"""The layout's rules, read from the import statements (docs/architecture.md, "Layout").

* No import circle among the modules of danet, danet_kernels, benchmarks and scripts, counting
  every import, those inside functions too (a function-level import cannot hide a circle).
* danet_kernels imports nothing of danet; the packages import nothing of benchmarks, scripts or
  tests; no library module of danet imports the command layer (danet.cli, danet.__main__,
  danet.commands).
* An import of the project's own modules inside a function is a lazy import kept for start-up
  time, and says so: ``# lazy: <why>`` on its line, or on the line above its block of imports.
* danet's top level holds at most six modules beside its folders, and every command lives in
  the module named after it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from danet.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("danet", "danet_kernels", "benchmarks", "scripts")
COMMAND_LAYER = ("danet.cli", "danet.__main__", "danet.commands")
LAZY_MARK = "# lazy:"


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported module (the longest prefix that is one of ours)
    line: int
    in_function: bool


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            modules[module_name(path)] = path
    return modules


MODULES = project_modules()


def _resolve(name: str) -> str | None:
    """The longest prefix of the dotted ``name`` that is a module of ours (None: not ours)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in MODULES:
            return candidate
    return None


def _package_of(module: str, path: Path) -> str:
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def _imports(module: str, path: Path) -> Iterator[Import]:
    tree = ast.parse(path.read_text(encoding="utf-8"))

    def visit(node: ast.AST, in_function: bool) -> Iterator[Import]:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    target = _resolve(alias.name)
                    if target:
                        yield Import(module, target, child.lineno, in_function)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    package = _package_of(module, path).split(".")
                    package = package[: len(package) - child.level + 1]
                    base = ".".join([*package, base] if base else package)
                for alias in child.names:
                    target = _resolve(f"{base}.{alias.name}") or _resolve(base)
                    if target:
                        yield Import(module, target, child.lineno, in_function)
            yield from visit(child, nested)

    yield from visit(tree, False)


IMPORTS = [imp for module, path in MODULES.items() for imp in _imports(module, path)]


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module, or a module importing itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in edges.get(node, ()):
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            connect(node)
    return found


def test_the_graph_is_read() -> None:
    """The reader finds the imports it must (a reader that finds none would pass every rule)."""
    pairs = {(imp.source, imp.target) for imp in IMPORTS}
    assert ("danet.training.trainer", "danet.training.resume") in pairs
    assert ("danet.models.head", "danet_kernels") in pairs
    assert ("danet.cli", "danet.training.run_dir") in pairs  # a function-level import
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"a"}}) == [["a"]]


def test_no_import_circles() -> None:
    edges: dict[str, set[str]] = {}
    for imp in IMPORTS:
        if imp.target != imp.source:
            edges.setdefault(imp.source, set()).add(imp.target)
    assert _cycles(edges) == []


@pytest.mark.parametrize(
    ("importer", "forbidden"),
    [
        ("danet_kernels", ("danet", "benchmarks", "scripts", "tests")),
        ("danet", ("benchmarks", "scripts", "tests")),
        ("benchmarks", ("scripts", "tests")),
    ],
)
def test_dependencies_point_one_way(importer: str, forbidden: tuple[str, ...]) -> None:
    bad = [f"{imp.source}:{imp.line} imports {imp.target}" for imp in IMPORTS
           if imp.source.split(".")[0] == importer and imp.target.split(".")[0] in forbidden]
    assert bad == []


def _in_command_layer(module: str) -> bool:
    return any(module == layer or module.startswith(layer + ".") for layer in COMMAND_LAYER)


def test_the_library_never_imports_a_command() -> None:
    bad = [f"{imp.source}:{imp.line} imports {imp.target}" for imp in IMPORTS
           if imp.source.startswith("danet.") and not _in_command_layer(imp.source)
           and _in_command_layer(imp.target)]
    assert bad == []


def test_function_level_imports_say_why() -> None:
    unmarked = []
    for imp in IMPORTS:
        if not imp.in_function:
            continue
        lines = MODULES[imp.source].read_text(encoding="utf-8").splitlines()
        above = imp.line - 2  # the comment may head a block of imports
        while above >= 0 and lines[above].strip().startswith(("from ", "import ")):
            above -= 1
        heading = lines[above].strip() if above >= 0 else ""
        marked = LAZY_MARK in lines[imp.line - 1] or heading.startswith(LAZY_MARK)
        if not marked:
            unmarked.append(f"{MODULES[imp.source].relative_to(ROOT)}:{imp.line} imports {imp.target}")
    assert unmarked == [], f"function-level imports without a '{LAZY_MARK} why' comment"


def test_danet_top_level_is_small_and_commands_are_named() -> None:
    top = sorted(p.name for p in (ROOT / "danet").glob("*.py"))
    assert len(top) <= 6, top
    for command, module in COMMANDS.items():
        assert module == "danet.commands." + command.replace("-", "_")
        assert module in MODULES
