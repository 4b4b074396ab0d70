"""The layering rules, checked on the source: no import cycles, no borrowed private names, cli/core/quant
boundaries, modules importable alone."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"cli": "llm_torch.cli", "core": "llm_torch.core", "quant": "llm_torch.quant"}


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package __init__)."""
    out = {}
    for folder, package in PACKAGES.items():
        for f in sorted((ROOT / folder).rglob("*.py")):
            parts = [p for p in f.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
            out[".".join([package, *parts])] = (f, f.name == "__init__.py")
    return out


MODULES = _modules()


def _imports(module: str) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import statement, lazy ones included."""
    path, is_package = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    # Imports under `if TYPE_CHECKING:` never run: annotations only.
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                   for stmt in node.body for n in ast.walk(stmt)}
    out = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append((target, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            out.extend((a.name, [], node.lineno) for a in node.names)
    return out


def _graph() -> dict[str, set[str]]:
    graph = {}
    for module in MODULES:
        deps = set()
        for target, names, _ in _imports(module):
            submodules = {f"{target}.{name}" for name in names} & MODULES.keys()  # `from . import gguf`
            deps |= submodules
            if target in MODULES and not (submodules and len(submodules) == len(names)):
                deps.add(target)
        # A module's own packages are imported before it in any case: not a dependency it adds.
        deps -= {module.rsplit(".", i)[0] for i in range(1, module.count("."))}
        deps.discard(module)
        graph[module] = deps
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    # Lazy (function-level) imports count too: a cycle through them is still two modules that need
    # each other, which is what makes a change in one break the other.
    assert _cycles(_graph()) == []


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_imports_another_modules_private_names():
    borrowed = [
        f"{module}:{line} imports {name} from {target}"
        for module in MODULES
        for target, names, line in _imports(module)
        if target.startswith("llm_torch.") and target != module
        for name in names
        if name.startswith("_") and not name.startswith("__")
    ]
    assert borrowed == []


def test_layer_boundaries():
    wrong = []
    for module in MODULES:
        for target, _, line in _imports(module):
            top = target.split(".")[0]
            if module.startswith("llm_torch.core") and top in ("typer", "rich", "click", "llm_torch"):
                if top != "llm_torch" or target.startswith("llm_torch.cli"):
                    wrong.append(f"{module}:{line} imports {target} (core never prints or parses argv)")
            if top in ("torchao", "bitsandbytes") and not module.startswith("llm_torch.quant"):
                wrong.append(f"{module}:{line} imports {target} (only quant/ imports quantization libraries)")
    assert wrong == []


def test_every_core_and_quant_module_imports_alone():
    # One interpreter, llm_torch's modules dropped between imports (torch stays loaded): an import that
    # only works after some other module was imported first fails here.
    names = [m for m in MODULES if not m.startswith("llm_torch.cli")]
    code = (
        "import importlib, sys\n"
        f"names = {names!r}\n"
        "failed = []\n"
        "for name in names:\n"
        "    for m in [m for m in sys.modules if m.startswith('llm_torch')]:\n"
        "        del sys.modules[m]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as e:\n"
        "        failed.append(f'{name}: {type(e).__name__}: {e}')\n"
        "print('\\n'.join(failed))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ""


def test_every_import_of_ours_names_a_module_that_exists():
    # Lazy imports only fail when their code path runs: a moved module must not leave one behind.
    missing = [
        f"{module}:{line} imports {target}"
        for module in MODULES
        for target, _, line in _imports(module)
        if target.startswith("llm_torch.") and target not in MODULES
    ]
    assert missing == []
