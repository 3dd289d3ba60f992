"""The package's shape: no import circles, no private names used across modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "patchcore"


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = ast.parse(path.read_text(encoding="utf-8"))
    return out


MODULES = _modules()


def _resolve(module: str, node: ast.ImportFrom) -> str:
    is_package = (PACKAGE.parent / module.replace(".", "/") / "__init__.py").is_file()
    base = module.split(".") if is_package else module.split(".")[:-1]
    if node.level:
        base = base[: len(base) - node.level + 1]
        return ".".join(base + ([node.module] if node.module else []))
    return node.module or ""


def _imports(module: str, tree: ast.Module) -> set[str]:
    """Modules of the package that `module` imports (also inside functions)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in MODULES else target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in MODULES)
    # A package's __init__ that only re-exports is not a dependency of its own modules.
    return {m for m in found if m in MODULES and m != module and m != "patchcore"}


def test_no_import_circles():
    graph = {m: _imports(m, t) for m, t in MODULES.items()}
    for m in graph:  # a module importing its own package's __init__ is not a circle
        graph[m] = {d for d in graph[m] if not m.startswith(d + ".")}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def _private_definitions() -> dict[str, set[str]]:
    """Underscore names each module defines (functions, classes, methods, module names)."""
    out: dict[str, set[str]] = {}
    for module, tree in MODULES.items():
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Assign):
                names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        out[module] = {n for n in names if n.startswith("_") and not n.startswith("__")}
    return out


def test_no_private_names_used_outside_their_module():
    private = _private_definitions()
    offences = []
    for module, tree in MODULES.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = _resolve(module, node)
                offences += [f"{module} imports {target}.{a.name}" for a in node.names
                             if a.name.startswith("_") and not a.name.startswith("__")
                             and target != module]
            elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not (
                    node.attr.startswith("__")):
                owner = node.value
                if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                    continue
                own = private[module]
                if node.attr in own:
                    continue
                if any(node.attr in names for m, names in private.items() if m != module):
                    offences.append(f"{module} uses .{node.attr} (line {node.lineno})")
    assert not offences, "\n".join(offences)


@pytest.mark.parametrize("name, limit", [("model.py", 400), ("cli/commands.py", 300),
                                         ("cli/shell.py", 200)])
def test_shell_modules_stay_small(name, limit):
    lines = (PACKAGE / name).read_text(encoding="utf-8").count("\n")
    assert lines < limit, f"{name} has {lines} lines"


def test_importing_patchcore_leaves_openmp_waits_alone():
    """Passive OpenMP waits made every small op of a batch-1 forward pay a thread wake-up
    (lite2 predict 47 vs 29 ms on 2 cores): `import patchcore` must not set them."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", "import os, patchcore; patchcore.PatchCore; "
                          "print(os.environ.get('OMP_WAIT_POLICY', 'unset'))"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.strip() == "unset", out.stderr[-500:]


def test_every_planted_mutant_still_applies():
    """scripts/mutation_check.py's snippets must follow the code (`make mutation` runs them)."""
    import subprocess
    import sys

    root = PACKAGE.parents[1]
    out = subprocess.run([sys.executable, str(root / "scripts" / "mutation_check.py"), "--list"],
                         capture_output=True, text=True, timeout=120)
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    assert len(lines) >= 24 and not any("stale" in line.lower() for line in lines), out.stdout
