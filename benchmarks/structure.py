"""Figures about the package's structure, read from its source (no import of it).

    python benchmarks/structure.py [SRC_DIR]

Prints: import circles between modules (every import counts, function-local ones too, except
those under `if TYPE_CHECKING:`), imports that run up the data-path layers of docs/ARCHITECTURE.md,
the number of imports of strongreid made inside functions, and the largest functions by lines.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

# The data path, lowest first; a module may import its own layer and those below.
LAYERS = ["config", "data", "modeling", "losses", "solver", "engine", "evaluation",
          "deploy|search|viz", "cli"]
BASE = {"strongreid", "strongreid.registry", "strongreid.errors", "strongreid.__main__"}


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int | None:
    if module in BASE:
        return None
    top = module.split(".")[1]
    for i, names in enumerate(LAYERS):
        if top in names.split("|"):
            return i
    return None


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(tree: ast.Module, current: str, is_package: bool, modules: set[str]):
    """(target module, lineno, inside a function) for each import of a strongreid module."""
    out: list[tuple[str, int, bool]] = []

    def resolve(base: str, names: list[str]) -> list[str]:
        found = []
        for n in names:
            full = f"{base}.{n}"
            found.append(full if full in modules else base)
        return found

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                continue
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                      ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.startswith("strongreid"):
                        out.append((alias.name, child.lineno, in_function))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    pkg = current if is_package else current.rsplit(".", 1)[0]
                    for _ in range(child.level - 1):
                        pkg = pkg.rsplit(".", 1)[0]
                    base = f"{pkg}.{child.module}" if child.module else pkg
                else:
                    base = child.module or ""
                if base.startswith("strongreid"):
                    for target in resolve(base, [a.name for a in child.names]):
                        out.append((target, child.lineno, in_function))
            visit(child, inner)

    visit(tree, False)
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    counter = [0]
    sys.setrecursionlimit(10000)

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
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
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return found


def main(src: str = "src/strongreid") -> None:
    root = Path(src).resolve()
    files = sorted(root.rglob("*.py"))
    modules = {module_name(root, f) for f in files}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    local: set[tuple[str, int]] = set()
    upward: dict[tuple[str, str], list[int]] = {}
    functions: list[tuple[int, str]] = []
    for f in files:
        mod = module_name(root, f)
        tree = ast.parse(f.read_text())
        for target, line, in_function in imports(tree, mod, f.name == "__init__.py", modules):
            if target == mod:
                continue
            if in_function:
                local.add((mod, line))
            graph[mod].add(target)
            a, b = layer_of(mod), layer_of(target)
            if a is not None and b is not None and b > a:
                upward.setdefault((mod, target), []).append(line)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                functions.append((lines, f"{mod}.{node.name}"))
    circles = cycles(graph)
    print(f"modules: {len(modules)}")
    print(f"import circles: {len(circles)}")
    for c in circles:
        print("  " + " <-> ".join(c))
    print(f"upward imports (module pairs): {len(upward)}")
    for (mod, target), lines in sorted(upward.items()):
        print(f"  {mod} -> {target} (lines {', '.join(map(str, sorted(set(lines))))})")
    print(f"import statements of strongreid inside functions: {len(local)}")
    print("largest functions (lines):")
    for lines, name in sorted(functions, reverse=True)[:5]:
        print(f"  {lines:4d} {name}")


if __name__ == "__main__":
    main(*sys.argv[1:])
