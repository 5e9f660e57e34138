"""The package layout is the architecture: a folder is a layer and imports only go down."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Bottom to top. A module may import from its own layer or any layer below.
LAYERS = [
    "peerd.errors",
    "peerd.units",
    "peerd.wire",
    "peerd.content",
    "peerd.engine",
    "peerd.transport",
    "peerd.node",
    "peerd.app",
    "tracker",
    "cli",
]


def _layer(module: str) -> int | None:
    if module == "peerd":
        return 0  # the package itself (empty): as low as it gets
    for i, prefix in enumerate(LAYERS):
        if module == prefix or module.startswith(prefix + "."):
            return i
    return None


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, module: str, *, runtime_only: bool) -> set[str]:
    """Absolute names of the project modules ``path`` imports."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST, type_only: bool) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                visit(child, True)
            for child in node.orelse:
                visit(child, type_only)
            return
        if not (runtime_only and type_only):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child, type_only)

    visit(tree, False)
    return {name for name in found if _layer(name) is not None}


def _project_modules() -> dict[str, Path]:
    out = {}
    for top in ("peerd", "tracker", "cli"):
        for path in (ROOT / top).rglob("*.py"):
            out[_module_name(path)] = path
    return out


def test_every_product_module_belongs_to_a_layer() -> None:
    assert all(_layer(m) is not None for m in _project_modules())


def test_imports_only_go_down() -> None:
    wrong = []
    for module, path in _project_modules().items():
        mine = _layer(module)
        assert mine is not None
        for name in _imports(path, module, runtime_only=False):
            theirs = _layer(name)
            assert theirs is not None
            if theirs > mine:
                wrong.append(f"{module} imports {name} ({LAYERS[theirs]} is above {LAYERS[mine]})")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles() -> None:
    modules = _project_modules()
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        graph[module] = {
            name
            for name in _imports(path, module, runtime_only=False)
            if name in modules and name != module and not module.startswith(name + ".")
        }
    # Depth-first search for a back edge.
    state: dict[str, int] = {}
    cycles: list[str] = []

    def walk(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*stack[stack.index(nxt) :], nxt]))
            elif nxt not in state:
                walk(nxt, [*stack, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            walk(module, [module])
    assert not cycles, "\n".join(cycles)


def test_the_daemon_client_commands_start_without_trio() -> None:
    # `peer status`, `ls`, `pause`... only talk to a running daemon: their
    # start-up must not pay for Trio and the node (0.37 s -> 0.12 s).
    import subprocess
    import sys

    code = (
        "import sys, cli.app, cli.remote, peerd.app.control, peerd.units; "
        "print(sorted(m for m in ('trio', 'peerd.node.node', 'peerd.app.daemon') "
        "if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout
