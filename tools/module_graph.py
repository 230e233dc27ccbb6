#!/usr/bin/env python3
"""The relay crate's module graph: which top-level module imports which (`crate::name`, tests
left out), its import cycles, and the modules imported by more than half of the others.

    python3 tools/module_graph.py [--check]

With --check it exits 1 when there is a cycle, or a module other than the allowed ones (config,
the row model `event`) is imported by more than half of the others. It also prints the import
cycles between files (each file a module: `store/coverage.rs` is `store::coverage`, a `mod.rs` or
`name.rs` its directory's module), which --check counts too.
"""

import re
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "crates" / "relay" / "src"
ALLOWED_WIDE = {"config", "event"}


def modules() -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {}
    for path in sorted(SRC.glob("*.rs")):
        if path.stem != "lib":
            found.setdefault(path.stem, []).append(path)
    for path in sorted(SRC.glob("*/**/*.rs")):
        found.setdefault(path.relative_to(SRC).parts[0], []).append(path)
    return found


def code(path: Path) -> str:
    text = path.read_text()
    if path.name in ("loop_tests.rs", "memory.rs"):  # test-only modules
        return ""
    cut = re.search(r"^#\[cfg\(test\)\]\s*\nmod tests", text, re.M)
    text = text[: cut.start()] if cut else text
    # Doc comments and comments name modules without importing them.
    return "\n".join(line.split("//")[0] for line in text.splitlines())


def graph() -> dict[str, set[str]]:
    mods = modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for name, paths in mods.items():
        for path in paths:
            text = code(path)
            uses = set(re.findall(r"\bcrate::(\w+)", text))
            for group in re.findall(r"\buse crate::\{([^}]*)\}", text):
                uses |= {part.strip().split("::")[0] for part in group.split(",")}
            edges[name] |= {u for u in uses if u in mods and u != name}
    return edges


def file_modules() -> dict[str, Path]:
    """Each file as its module path: store/coverage.rs -> store::coverage, ops/verify/mod.rs ->
    ops::verify."""
    found: dict[str, Path] = {}
    for path in sorted(SRC.rglob("*.rs")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] in ("mod", "lib"):
            parts = parts[:-1]
        if parts:
            found["::".join(parts)] = path
    return found


def file_graph() -> dict[str, set[str]]:
    """Which file's module imports which (`crate::a::b`, `super::c`, `use super::{d, e}`,
    `self::f`), each path taken to the longest module it names."""
    mods = file_modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}

    def resolve(parts: list[str]) -> str | None:
        for n in range(len(parts), 0, -1):
            name = "::".join(parts[:n])
            if name in mods:
                return name
        return None

    for name, path in mods.items():
        text = code(path)
        # A file `a/b.rs` (or `a/b/mod.rs`) is module a::b: its `super` is a, `self` a::b.
        here = name.split("::")
        bases = {"crate": [], "super": here[:-1], "self": here}
        for root, rest in re.findall(r"\b(crate|super|self)((?:::\w+)+)", text):
            target = resolve(bases[root] + rest.strip(":").split("::"))
            if target and target != name:
                edges[name].add(target)
        for root, prefix, group in re.findall(
            r"\buse (crate|super|self)((?:::\w+)*)::\{([^}]*)\}", text
        ):
            base = bases[root] + [p for p in prefix.split("::") if p]
            for item in group.split(","):
                item = item.strip().split(" as ")[0]
                if item and item != "self":
                    target = resolve(base + item.split("::"))
                    if target and target != name:
                        edges[name].add(target)
    # A module's own submodules are its parts, not imports.
    return {
        m: {t for t in targets if not t.startswith(m + "::") and not m.startswith(t + "::")}
        for m, targets in edges.items()
    }


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def main() -> int:
    edges = graph()
    n = len(edges)
    print(f"{n} modules in {SRC.relative_to(SRC.parent.parent.parent)}")
    for name in sorted(edges):
        print(f"  {name:12} -> {', '.join(sorted(edges[name])) or '-'}")
    found = cycles(edges)
    print("cycles:", "; ".join(" <-> ".join(c) for c in found) or "none")
    fan_in = {m: sorted(k for k, v in edges.items() if m in v) for m in edges}
    wide = {m: who for m, who in fan_in.items() if len(who) > (n - 1) / 2}
    print(f"imported by more than half of the other {n - 1}:")
    for m, who in sorted(wide.items()):
        mark = "allowed" if m in ALLOWED_WIDE else "TOO WIDE"
        print(f"  {m}: {len(who)} ({mark})")
    if not wide:
        print("  none")
    file_cycles = cycles(file_graph())
    print("cycles between files:", "; ".join(" <-> ".join(c) for c in file_cycles) or "none")
    bad = found or file_cycles or [m for m in wide if m not in ALLOWED_WIDE]
    if "--check" in sys.argv and bad:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
