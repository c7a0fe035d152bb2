"""Structure facts about bughunt's source, counted from the code: import circles between modules, the longest
function, the function with the most parameters, the largest module, and the limits they are held to.

    python benchmarks/structure.py            # the figures
    python benchmarks/structure.py --check    # exit 1 when a limit is broken (tests/test_structure.py runs it)
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bughunt", "reference_impls")
MAX_FUNCTION_LINES = 80
MAX_PARAMETERS = 8


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the packages checked."""
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _resolve(name: str, level: int, module: str, is_package: bool) -> str:
    if level == 0:
        return name
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the project modules it imports (at any depth of the file: a lazy import inside a function is still an
    import, and still makes a circle)."""
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for module, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        is_package = path.name == "__init__.py"
        type_only = {id(n) for stmt in ast.walk(tree) if isinstance(stmt, ast.If) and _is_type_checking(stmt.test)
                     for n in ast.walk(stmt)}
        for node in ast.walk(tree):
            targets = []
            if id(node) in type_only:  # `if TYPE_CHECKING:` imports never run
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(node.module or "", node.level, module, is_package)
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != module and not module.startswith(t + "."):  # a package's own __init__ is not a circle
                    graph[module].add(t)
    return graph


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
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

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def functions(mods: dict[str, Path]) -> list[dict]:
    """Every function and method: where, its length in lines (decorators excluded) and its parameter count (self and
    cls not counted; *args and **kwargs count one each)."""
    out = []
    for module, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
                names = [n for n in names if n not in ("self", "cls")]
                count = len(names) + (a.vararg is not None) + (a.kwarg is not None)
                out.append({"function": f"{module}.{node.name}", "line": node.lineno,
                            "lines": node.end_lineno - node.lineno + 1, "parameters": count})
    return out


def probe_files(name: str = "logit_lens") -> list[str]:
    """The files of the package (source, templates, schemas) whose name or text names probe `name`: what adding that
    probe touched. For the logit lens, a probe added as the example of a plug-in: its module, its registration line,
    its report template."""
    files = [p for p in (ROOT / "bughunt").rglob("*") if p.suffix in (".py", ".html", ".json") and p.is_file()]
    pattern = re.compile(rf"\b{name}\b")
    return sorted(str(p.relative_to(ROOT)) for p in files if pattern.search(p.name) or pattern.search(p.read_text()))


def facts() -> dict:
    mods = modules()
    graph = imports(mods)
    funcs = functions(mods)
    sizes = {m: len(p.read_text().splitlines()) for m, p in mods.items()}
    largest = max(sizes, key=sizes.get)
    longest = max(funcs, key=lambda f: f["lines"])
    widest = max(funcs, key=lambda f: f["parameters"])
    return {
        "modules": len(mods),
        "source_lines": sum(sizes.values()),
        "import_circles": circles(graph),
        "longest_function": longest,
        "most_parameters": widest,
        "largest_module": {"module": largest, "lines": sizes[largest]},
        "functions_over_line_limit": sorted((f for f in funcs if f["lines"] > MAX_FUNCTION_LINES), key=lambda f: -f["lines"]),
        "functions_over_parameter_limit": sorted((f for f in funcs if f["parameters"] > MAX_PARAMETERS),
                                                 key=lambda f: -f["parameters"]),
        "limits": {"function_lines": MAX_FUNCTION_LINES, "parameters": MAX_PARAMETERS},
        "probe_files": probe_files(),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 when a limit is broken")
    ap.add_argument("--json", action="store_true", help="print the facts as JSON")
    args = ap.parse_args(argv)
    f = facts()
    if args.json:
        print(json.dumps(f, indent=1))
    else:
        print(f"modules: {f['modules']}, source lines: {f['source_lines']}")
        print(f"import circles: {len(f['import_circles'])}" + "".join(f"\n  {' <-> '.join(c)}" for c in f["import_circles"]))
        lf, mp, lm = f["longest_function"], f["most_parameters"], f["largest_module"]
        print(f"longest function: {lf['function']} ({lf['lines']} lines)")
        print(f"most parameters: {mp['function']} ({mp['parameters']})")
        print(f"largest module: {lm['module']} ({lm['lines']} lines)")
        print(f"files a new probe touched (logit_lens): {len(f['probe_files'])}: {', '.join(f['probe_files'])}")
        print(f"functions over {MAX_FUNCTION_LINES} lines: {len(f['functions_over_line_limit'])}"
              + "".join(f"\n  {x['function']}:{x['line']} {x['lines']}" for x in f["functions_over_line_limit"]))
        print(f"functions over {MAX_PARAMETERS} parameters: {len(f['functions_over_parameter_limit'])}"
              + "".join(f"\n  {x['function']}:{x['line']} {x['parameters']}" for x in f["functions_over_parameter_limit"]))
    broken = f["import_circles"] or f["functions_over_line_limit"] or f["functions_over_parameter_limit"]
    return 1 if args.check and broken else 0


if __name__ == "__main__":
    sys.exit(main())
