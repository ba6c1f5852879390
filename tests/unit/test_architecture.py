"""The floors of docs/ARCHITECTURE.md hold in the tree: no import climbs a floor, every module is
placed, every placed name exists, atlas_torch_ref imports nothing from atlas_jax, and no cycle."""
from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def modules(pkg: str) -> dict[str, Path]:
    out = {}
    for f in sorted((REPO / pkg).rglob("*.py")):
        name = ".".join(f.relative_to(REPO).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = f
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Modules of `known` that `path` imports, at module level or inside functions."""
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rsplit(".", 1)[0] if "." in t else ""
            if t and t != name:
                out.add(t)
    return out


def floors() -> list[tuple[int, list[str]]]:
    text = (REPO / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\|\s*(\d+)\s*\|[^|]*\|([^|]*)\|\s*$", text, flags=re.M)
    assert rows, "docs/ARCHITECTURE.md has no floors table"
    return [(int(n), re.findall(r"`([\w.*]+)`", cells)) for n, cells in rows]


def floor_of(module: str, table) -> int | None:
    exact = [n for n, names in table for x in names if x == module]
    if exact:
        return exact[0]
    best = None
    for n, names in table:
        for x in names:
            if x.endswith(".*") and (module == x[:-2] or module.startswith(x[:-1])):
                if best is None or len(x) > best[0]:
                    best = (len(x), n)
    return best[1] if best else None


def test_every_module_is_placed_and_every_placed_name_exists():
    table = floors()
    mods = modules("atlas_jax")
    unplaced = [m for m in mods if floor_of(m, table) is None]
    assert not unplaced, f"modules without a floor in docs/ARCHITECTURE.md: {unplaced}"
    for _, names in table:
        for x in names:
            assert x.removesuffix(".*") in mods, f"docs/ARCHITECTURE.md names {x}, which is not in the tree"


def test_no_import_climbs_a_floor():
    table = floors()
    mods = modules("atlas_jax")
    climbs = []
    for m, path in mods.items():
        own = floor_of(m, table)
        for t in imports(m, path, set(mods)):
            if m.startswith(t + "."):  # a package's own __init__ (atlas_jax, atlas_jax.export ...)
                continue
            if floor_of(t, table) > own:
                climbs.append(f"{m} (floor {own}) imports {t} (floor {floor_of(t, table)})")
    assert not climbs, "imports that climb a floor:\n" + "\n".join(climbs)


def test_the_torch_twin_imports_nothing_from_atlas_jax():
    for f in sorted((REPO / "atlas_torch_ref").rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n == "atlas_jax" or n.startswith("atlas_jax.") for n in names), \
                f"{f.relative_to(REPO)} imports {names}"


def test_no_import_cycles():
    mods = {**modules("atlas_jax"), **modules("atlas_torch_ref")}
    graph = {m: {t for t in imports(m, p, set(mods)) if not m.startswith(t + ".") and not t.startswith(m + ".")}
             for m, p in mods.items()}
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for t in graph[m]:
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])
