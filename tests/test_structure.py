"""The layering docs/architecture.md describes, held against the code: policy/ imports nothing
of the proxy (no mitmproxy, no sockets), addons/ never imports proxy/, no import cycle, and no
module of the product grows past ~300 lines (the compiled policy engine may stay whole)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parent.parent
PACKAGES = {"policy": "agent_egress.policy", "addons": "agent_egress.addons",
            "proxy": "agent_egress.proxy"}
WHOLE = {"policy/engine.py"}  # one cohesive structure: the compiled policy and its indexes


def _imports() -> dict[str, set[str]]:
    modules = {f"{package}.{path.stem}": path for folder, package in PACKAGES.items()
               for path in (ROOT / folder).glob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package if node.level == 1 else node.module or ""
                if node.level == 1:
                    targets = ([f"{base}.{node.module}"] if node.module else
                               [f"{base}.{alias.name}" for alias in node.names])
                else:
                    targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
                found.update(targets)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
        graph[name] = found
    return graph


def test_layers_import_only_downwards() -> None:
    for module, imported in _imports().items():
        if module.startswith("agent_egress.policy"):
            assert not any(name.startswith(("mitmproxy", "agent_egress.addons",
                                            "agent_egress.proxy", "socket", "asyncio"))
                           for name in imported), module
        if module.startswith("agent_egress.addons"):
            assert not any(name.startswith("agent_egress.proxy") for name in imported), module


def test_no_import_cycle() -> None:
    graph = _imports()
    internal = {name: {d for d in deps if d in graph} for name, deps in graph.items()}
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for dep in internal[name]:
            assert state.get(dep) != "open", " -> ".join([*path, dep])
            if dep not in state:
                visit(dep, [*path, dep])
        state[name] = "done"

    for name in internal:
        if name not in state:
            visit(name, [name])


def test_modules_stay_small() -> None:
    for folder in PACKAGES:
        for path in (ROOT / folder).glob("*.py"):
            relative = f"{folder}/{path.name}"
            if relative not in WHOLE:
                assert len(path.read_text().splitlines()) <= 320, relative
