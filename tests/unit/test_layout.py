"""The house rules of the layout, checked on the source (docs/architecture.md): no import cycle
among our modules (lazy imports inside functions included), ``vllm_lk`` imports neither
``training`` nor ``server``, ``training`` does not import ``server``, and no ``SystemExit`` below
the CLI (library code raises vllm_lk.errors.UserError)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("vllm_lk", "training", "server")


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """Our modules ``path`` imports anywhere in the file (functions included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
    return {name for name in out if name in known}


def test_no_import_cycle():
    known = modules()
    graph = {name: imports(path, known) - {name} for name, path in known.items()}
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(name: str, trail: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                cycle = trail[trail.index(dep):] + [dep] if dep in trail else [name, dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, trail + [dep])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_dependency_direction():
    known = modules()
    for name, path in known.items():
        deps = {dep.split(".")[0] for dep in imports(path, known)}
        if name.startswith("vllm_lk"):
            assert not deps & {"training", "server"}, f"{name} imports {deps & {'training', 'server'}}"
        if name.startswith("training"):
            assert "server" not in deps, f"{name} imports server"


def test_no_system_exit_below_the_cli():
    for name, path in modules().items():
        if name in ("server.cli", "training.__main__"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and node.exc is not None:
                call = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                assert not (isinstance(call, ast.Name) and call.id == "SystemExit"), f"{name}:{node.lineno} raises SystemExit"
