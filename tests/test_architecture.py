"""The platform's layering, checked from the source alone (``ast``: no module is imported).

Rules, over every module under ``api/``, ``tenants/``, ``inference/`` and ``kernels/``:

1. no import cycles between modules, counting every import that runs: at module level (class
   bodies, ``try`` blocks included) and inside functions (a deferred import hides a cycle, it does
   not remove it); only imports under ``if TYPE_CHECKING:`` do not count;
2. nothing in ``inference/`` or ``kernels/`` imports ``tenants`` or ``api`` (any import, also one
   inside a function);
3. nothing in ``inference/`` outside ``inference/service/``, and nothing in ``kernels/``, imports a
   web framework, a database, a task queue or a network client (fastapi, starlette, sqlalchemy,
   celery, boto3, httpx);
4. ``kernels/`` imports nothing from ``inference/``;
5. object-store keys of adapters are built by one module, ``inference/adapters/storage_keys.py``:
   no other module makes one with an f-string.

The checker's own tests build small bad trees in a temporary folder and expect every rule to fire.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("api", "tenants", "inference", "kernels")
SERVICE_LIBRARIES = ("fastapi", "starlette", "sqlalchemy", "celery", "boto3", "httpx")


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name of the importing file
    target: str  # dotted name imported (resolved to one of our modules where it is one)
    line: int
    runs: bool  # False only under ``if TYPE_CHECKING:`` (annotations; never executed)

    def __str__(self) -> str:
        return f"{self.importer} (line {self.line}) imports {self.target}"


@dataclass
class Codebase:
    modules: dict[str, Path]  # dotted name -> file
    imports: list[Import]

    def edges(self) -> dict[str, set[str]]:
        """The edges between our own modules of every import that runs."""
        graph: dict[str, set[str]] = {name: set() for name in self.modules}
        for imp in self.imports:
            if imp.runs and imp.target in self.modules and imp.target != imp.importer:
                graph[imp.importer].add(imp.target)
        return graph


# --------------------------------------------------------------------------- reading the source
def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.Module) -> Iterable[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement with whether it ever runs (False under ``if TYPE_CHECKING:``)."""

    def walk(node: ast.AST, runs: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, runs
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.body:
                    yield from walk(ast.Module(body=[stmt], type_ignores=[]), False)
                for stmt in child.orelse:
                    yield from walk(ast.Module(body=[stmt], type_ignores=[]), runs)
            else:
                yield from walk(child, runs)

    yield from walk(tree, True)


def _resolve(name: str, modules: dict[str, Path]) -> str:
    """``name`` itself when it is one of our modules, else its nearest enclosing one of ours, else
    ``name`` unchanged (a third-party or standard module)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return name


def _targets(node: ast.Import | ast.ImportFrom, importer: str, is_package: bool, modules: dict[str, Path]) -> list[str]:
    if isinstance(node, ast.Import):
        return [_resolve(alias.name, modules) for alias in node.names]
    if node.level:
        package = importer.split(".") if is_package else importer.split(".")[:-1]
        base_parts = package[: len(package) - (node.level - 1)]
        base = ".".join(base_parts + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    targets = []
    for alias in node.names:
        submodule = f"{base}.{alias.name}"
        targets.append(submodule if submodule in modules else _resolve(base, modules))
    return targets


def read_codebase(root: Path, packages: Iterable[str] = PACKAGES) -> Codebase:
    modules: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            if not any(part.startswith(".") or part == "__pycache__" for part in path.relative_to(root).parts):
                modules[_module_name(root, path)] = path
    imports = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        for node, runs in _import_nodes(tree):
            for target in _targets(node, name, is_package, modules):
                imports.append(Import(name, target, node.lineno, runs))
    return Codebase(modules, imports)


# --------------------------------------------------------------------------- the rules
def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected component that has one (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(start: str) -> None:  # iterative, so deep graphs do not hit the recursion limit
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in graph[node]:
                    components.append(component)

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return [_cycle_in(graph, set(component)) for component in components]


def _cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A concrete cycle through the component's smallest module (breadth-first back to it)."""
    start = min(component)
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(graph[node] & component):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start] if node != start else [start, start]
                if child not in previous:
                    previous[child] = node
                    nxt.append(child)
        frontier = nxt
    raise AssertionError(f"no cycle in component {sorted(component)}")


def _top(name: str) -> str:
    return name.split(".", 1)[0]


def _under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def forbidden_imports(codebase: Codebase) -> list[Import]:
    """Rules 2-4: every import that breaks the layering."""
    bad = []
    for imp in codebase.imports:
        importer, target = imp.importer, _top(imp.target)
        low_level = _under(importer, "inference") or _under(importer, "kernels")
        if low_level and target in ("tenants", "api"):
            bad.append(imp)
        elif (_under(importer, "kernels") or (_under(importer, "inference") and not _under(importer, "inference.service"))) \
                and target in SERVICE_LIBRARIES:
            bad.append(imp)
        elif _under(importer, "kernels") and target == "inference":
            bad.append(imp)
    return bad


KEY_MODULE = "inference.adapters.storage_keys"
KEY_FRAGMENTS = ("adapter_config.json", "adapter_model.safetensors", "adapters/")


@dataclass(frozen=True)
class KeyBuilder:
    module: str
    line: int

    def __str__(self) -> str:
        return f"{self.module} (line {self.line}) builds a storage key with an f-string"


def storage_key_builders(codebase: Codebase) -> list[KeyBuilder]:
    """Rule 5: f-strings outside ``KEY_MODULE`` whose text names an adapter file or an ``adapters/``
    folder (routes such as ``/internal/adapters/...`` are URLs, not keys, and are skipped)."""
    found = []
    for name, path in codebase.modules.items():
        if name == KEY_MODULE:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.JoinedStr):
                continue
            text = "".join(v.value for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str))
            if any(fragment in text for fragment in KEY_FRAGMENTS) and "/internal/" not in text:
                found.append(KeyBuilder(name, node.lineno))
    return found


# --------------------------------------------------------------------------- the codebase
@pytest.fixture(scope="module")
def codebase() -> Codebase:
    return read_codebase(ROOT)


def test_every_package_is_read(codebase):
    for package in PACKAGES:
        assert package in codebase.modules, package
    assert "inference.service.events" in codebase.modules
    assert any(imp.importer.startswith("api.") for imp in codebase.imports)


def test_no_import_cycles(codebase):
    cycles = find_cycles(codebase.edges())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_the_layers_import_only_downwards(codebase):
    bad = forbidden_imports(codebase)
    assert not bad, "imports that break the layering:\n" + "\n".join(map(str, bad))


def test_storage_keys_are_built_in_one_place(codebase):
    found = storage_key_builders(codebase)
    assert not found, "storage keys built outside storage_keys.py:\n" + "\n".join(map(str, found))


# --------------------------------------------------------------------------- the checker itself
def _tree(root: Path, files: dict[str, str]) -> Path:
    for relative, source in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    for package in PACKAGES:
        (root / package).mkdir(exist_ok=True)
        (root / package / "__init__.py").touch()
    return root


def test_the_checker_finds_a_cycle_and_names_it(tmp_path):
    root = _tree(tmp_path, {
        "tenants/a.py": "from tenants import b\n",
        "tenants/b.py": "from .c import thing\n",
        "tenants/c.py": "import tenants.a\nthing = 1\n",
        "tenants/lazy.py": "import tenants.typed\n",
        # annotations only: no cycle
        "tenants/typed.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from tenants import lazy\n",
        # a deferred import is a cycle all the same
        "kernels/k1.py": "import kernels.k2\n",
        "kernels/k2.py": "def load():\n    from kernels import k1\n",
        "api/x.py": "from . import y\n",
        "api/y.py": "try:\n    from api.x import z\nexcept ImportError:\n    pass\n",
    })
    cycles = find_cycles(read_codebase(root).edges())
    assert ["tenants.a", "tenants.b", "tenants.c", "tenants.a"] in cycles
    assert ["api.x", "api.y", "api.x"] in cycles
    assert ["kernels.k1", "kernels.k2", "kernels.k1"] in cycles
    assert len(cycles) == 3


def test_the_checker_finds_every_layering_break(tmp_path):
    root = _tree(tmp_path, {
        "inference/engine.py": "import httpx\n\ndef f():\n    from tenants.models import Adapter\n",
        "inference/service/app.py": "import fastapi\nfrom api import deps\n",
        "inference/ok.py": "import torch\nfrom inference import engine\n",
        "kernels/lora.py": "from inference.engine import x\nfrom sqlalchemy import select\n",
        "tenants/models.py": "import sqlalchemy\nfrom inference import engine\n",
        "api/deps.py": "import fastapi\nfrom tenants import models\n",
    })
    bad = {(imp.importer, imp.target) for imp in forbidden_imports(read_codebase(root))}
    assert bad == {
        ("inference.engine", "httpx"),
        ("inference.engine", "tenants.models"),
        ("inference.service.app", "api.deps"),  # the service may use fastapi, never api/
        ("kernels.lora", "inference.engine"),
        ("kernels.lora", "sqlalchemy"),
    }


def test_the_checker_finds_storage_keys_built_elsewhere(tmp_path):
    root = _tree(tmp_path, {
        "inference/adapters/storage_keys.py": "def keys(p):\n    return f'{p}/adapter_config.json'\n",
        "tenants/bad.py": "def key(t, a):\n    return f'tenants/{t}/adapters/{a}'\n",
        "api/bad.py": "def key(p):\n    return f'{p}/adapter_model.safetensors'\n",
        "inference/service/client.py": "def url(a):\n    return f'/internal/adapters/{a}'\n",  # a URL
        "api/ok.py": "NAME = 'adapter_model.safetensors'\n",  # a file name alone builds nothing
    })
    found = {(b.module, b.line) for b in storage_key_builders(read_codebase(root))}
    assert found == {("tenants.bad", 2), ("api.bad", 2)}
