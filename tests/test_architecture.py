"""The package's shape (docs/architecture.md): rooms of bounded size, imports that flow one way.

Read from the source with ``ast``, so every import counts: module level, inside functions (lazy
imports) and under ``if TYPE_CHECKING:``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "compeft"
MAX_LINES = 500
README_LINES = 200


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def resolve(importer: str, level: int, module: str | None) -> str:
    """The absolute name a (possibly relative) ``from`` import refers to."""
    if level == 0:
        return module or ""
    base = importer.split(".")
    if not is_package(importer):
        base = base[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def imports(name: str) -> list[tuple[str, str, int]]:
    """(imported compeft module, imported name or '', line) of every import in module ``name``."""
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, "", node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = resolve(name, node.level, node.module)
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((sub, "", node.lineno) if sub in MODULES else (target, alias.name, node.lineno))
    return [(m, n, line) for m, n, line in found if m == "compeft" or m.startswith("compeft.")]


def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for name in MODULES:
        targets = set()
        for target, _, _ in imports(name):
            while target not in MODULES:  # ``import compeft.codec.golomb`` names a module; trim attributes
                target = target.rpartition(".")[0]
            if target != name:
                targets.add(target)
        edges[name] = targets
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_find_cycle_finds_a_cycle_and_accepts_a_dag():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_resolve_relative_imports():
    assert resolve("compeft.expert", 1, "format") == "compeft.format"
    assert resolve("compeft.codec.golomb", 2, "format.header") == "compeft.format.header"
    assert resolve("compeft.format", 1, "header") == "compeft.format.header"


def test_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_private_name_crosses_modules():
    crossing = [f"{name}:{line} imports {target}.{imported}" for name in MODULES
                for target, imported, line in imports(name)
                if imported.startswith("_") and not imported.startswith("__")]
    assert not crossing, "\n".join(crossing)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_size(name):
    lines = MODULES[name].read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_LINES, f"{MODULES[name].relative_to(ROOT)} has {lines} lines (at most {MAX_LINES})"


def test_codec_and_gpu_are_leaves():
    """The kernels and the GPU executor know arrays, tensors and plans, not containers or consumers."""
    edges = graph()
    allowed = {"compeft.errors", "compeft.format.header", "compeft.dtypes", "compeft.plan"}
    for name in [m for m in MODULES if m.startswith("compeft.codec")] + ["compeft.gpu"]:
        outside = {t for t in edges[name] if not t.startswith("compeft.codec") and t not in allowed}
        assert not outside, f"{name} imports {sorted(outside)}"


def test_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_LINES, f"README.md has {lines} lines (at most {README_LINES})"


def fuzz_uninstrumented_imports() -> list[str]:
    """The compeft modules tools/fuzz.py imports before ``atheris.instrument_imports``."""
    tree = ast.parse((ROOT / "tools" / "fuzz.py").read_text())
    child = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "_fuzz_child")
    names = []
    for stmt in child.body:
        if isinstance(stmt, ast.With):  # the instrumented imports start here
            break
        if isinstance(stmt, ast.Import):
            names += [a.name for a in stmt.names if a.name.startswith("compeft.")]
    return names


def test_fuzzer_imports_every_numba_module_uninstrumented():
    """atheris's instrumented bytecode does not compile under Numba: a module defining kernels that
    the fuzzer imports instrumented crashes its target at the first input reaching that kernel (as
    codec/packed.py once did). Every such module must be loaded, directly or through another, by
    the imports tools/fuzz.py makes before instrumenting."""
    import subprocess
    import sys

    kernel_modules = sorted(name for name, path in MODULES.items() if "@njit" in path.read_text())
    assert "compeft.codec.kernels" in kernel_modules
    early = fuzz_uninstrumented_imports()
    assert early, "tools/fuzz.py's uninstrumented imports were not found"
    code = f"import sys\nfor m in {early!r}: __import__(m)\nprint(' '.join(sorted(sys.modules)))"
    loaded = set(subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.split())
    missing = [m for m in kernel_modules if m not in loaded]
    assert not missing, f"import these in tools/fuzz.py before atheris.instrument_imports: {missing}"
