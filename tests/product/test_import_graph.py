"""The packages' import graph has no cycles, counting imports inside functions too: a lazy
import that closes a cycle still ties two modules together (and breaks when one is split)."""

from __future__ import annotations

import ast

from tests.paths import REPO

PACKAGES = ("server", "router_core", "training", "bench")


def import_graph() -> dict[str, set[str]]:
    files = {}
    for package in PACKAGES:
        for f in (REPO / package).rglob("*.py"):
            name = ".".join(f.relative_to(REPO).with_suffix("").parts)
            files[name.removesuffix(".__init__")] = f
    graph: dict[str, set[str]] = {}
    for name, f in files.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path [a, b, ..., a], or None (depth-first search with colours)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_finder_sees_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles() -> None:
    graph = import_graph()
    assert "router_core.store_rules" in graph and graph["server.engine.base_model"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


# -- the import rules of docs/architecture.md ("Packages"), one row per room -----------------------
# Each room may import itself, the packages outside the repo, and the rooms listed here (prefixes).
LOOSE = ("server.settings", "server.metrics", "server.worker", "server.state", "server.build", "server.local")
RULES: dict[str, tuple[str, ...]] = {
    "server": (),  # the package itself; every module of it belongs to a room below
    "router_core": (),
    "training": ("router_core",),
    "server.engine": ("router_core", "server.kernels"),
    "server.kernels": (),  # native kernels: torch and the C++ compiler only
    "server.settings": (),
    "server.metrics": ("server.engine",),
    "server.worker": ("server.engine",),
    "server.local": (),
    "server.store": ("router_core", "server.engine", "server.settings", "server.metrics", "server.state"),
    "server.routing": ("router_core", "server.engine", "server.store", "server.settings"),
    "server.build": ("router_core", "server.engine", "server.store", "server.routing", "server.settings"),
    "server.state": ("server.engine", "server.store", "server.routing", "server.settings", "server.metrics",
                     "server.worker"),
    # serving uses the API's models and errors, never its routes or dependencies
    "server.serving": ("router_core", "server.engine", "server.store", "server.routing", *LOOSE[:4],
                       "server.api.schemas", "server.api.responses", "server.api.http_errors"),
    "server.api": ("router_core", "server.engine", "server.store", "server.routing", "server.serving", *LOOSE),
    "server.app": ("router_core", "server.engine", "server.store", "server.routing", "server.serving", "server.api",
                   *LOOSE),
    # the app commands are the only server code that may import training
    "server.commands": ("router_core", "training", "server"),
    "bench": ("router_core", "server"),
}
# FastAPI and Starlette stay at the HTTP edge and the app that mounts it
WEB = ("fastapi", "starlette")
WEB_ALLOWED = ("server.api", "server.app", "server.serving", "server.state", "server.commands")


def room(module: str) -> str:
    return max((r for r in RULES if module == r or module.startswith(r + ".")), key=len)


def _under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def external_imports() -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for package in PACKAGES:
        for f in (REPO / package).rglob("*.py"):
            name = ".".join(f.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
            mods: set[str] = set()
            for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    mods |= {a.name for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    mods.add(node.module)
            out[name] = mods
    return out


def test_rooms_import_only_what_the_architecture_allows() -> None:
    graph = import_graph()
    broken = [f"{a} -> {b}" for a, targets in sorted(graph.items()) for b in sorted(targets)
              if room(a) != room(b) and not _under(b, RULES[room(a)])]
    assert not broken, "imports the rules in docs/architecture.md forbid:\n" + "\n".join(broken)


def test_rules_cover_every_module_and_catch_a_violation() -> None:
    graph = import_graph()
    homeless = [m for m in graph if not any(m == r or m.startswith(r + ".") for r in RULES)
                or (room(m) == "server" and m != "server")]
    assert not homeless, f"modules in no room of docs/architecture.md: {homeless}"
    assert room("server.engine.batch") == "server.engine" and room("server.api.routes.chat") == "server.api"
    assert not _under("training.cli", RULES["server.routing"])  # what the test would flag


def test_web_framework_stays_at_the_edge() -> None:
    web = [f"{m} imports {x}" for m, mods in sorted(external_imports().items()) for x in sorted(mods)
           if x.split(".")[0] in WEB and not _under(m, WEB_ALLOWED)]
    assert not web, "\n".join(web)


def test_no_branching_on_a_router_class_outside_router_core() -> None:
    """Every router kind implements `router_core.router.Router`; code outside router_core asks
    the protocol (`needs_complexity`, `switch_margin`, `scores`, `route`), never the class."""
    concrete = {"CentroidRouter", "MLPRouter", "ArrowRouter"}
    found = []
    for package in ("server", "training", "bench"):
        for f in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("isinstance", "issubclass"):
                    names = {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)} if len(node.args) > 1 else set()
                    if names & concrete:
                        found.append(f"{f.relative_to(REPO)}:{node.lineno}")
    assert not found, found


def test_server_has_no_module_name_twice() -> None:
    names: dict[str, list[str]] = {}
    for f in (REPO / "server").rglob("*.py"):
        if f.name != "__init__.py":
            names.setdefault(f.stem, []).append(str(f.relative_to(REPO)))
    assert {n: p for n, p in names.items() if len(p) > 1} == {}
