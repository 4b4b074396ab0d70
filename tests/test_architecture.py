"""The layering rules, checked on the source: the package order, no import cycles, no borrowed private names,
cli/core/quant boundaries, modules importable alone."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"cli": "llm_torch.cli", "core": "llm_torch.core", "quant": "llm_torch.quant"}
# Lower packages never import higher ones (low -> high); imports within one package are free.
ORDER = (
    "llm_torch.core",  # its top modules only: errors, openmp, files, phases
    "llm_torch.core.kernels",
    "llm_torch.core.model",
    "llm_torch.core.tokenizer",
    "llm_torch.core.checkpoint",
    "llm_torch.core.engine",
    "llm_torch.core.placement",
    "llm_torch.core.tasks",
    "llm_torch.core.serving",
    "llm_torch.core.tools",
    "llm_torch.quant",
    "llm_torch.cli",
)


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package __init__)."""
    out = {}
    for folder, package in PACKAGES.items():
        for f in sorted((ROOT / folder).rglob("*.py")):
            parts = [p for p in f.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
            out[".".join([package, *parts])] = (f, f.name == "__init__.py")
    return out


MODULES = _modules()


def _imports(module: str, *, annotations: bool = False, source: str | None = None,
             is_package: bool = False) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import statement of `module` (its file, or
    `source`), lazy ones included; those under `if TYPE_CHECKING:` only with `annotations`."""
    if source is None:
        path, is_package = MODULES[module]
        source = path.read_text(encoding="utf-8")
    tree = ast.parse(source)
    # Imports under `if TYPE_CHECKING:` never run: annotations only.
    typing_only = set() if annotations else {
        id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
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


def _graph(sources: dict[str, str] | None = None, *, annotations: bool) -> dict[str, set[str]]:
    """Module -> the modules of ours it imports: ours from MODULES, or made-up ones from `sources`
    (dotted name -> source text, no packages)."""
    known = MODULES.keys() if sources is None else sources.keys()
    graph = {}
    for module in known:
        deps = set()
        source = None if sources is None else sources[module]
        for target, names, _ in _imports(module, annotations=annotations, source=source):
            submodules = {f"{target}.{name}" for name in names} & known  # `from . import gguf`
            deps |= submodules
            if target in known and not (submodules and len(submodules) == len(names)):
                deps.add(target)
        # A module's own packages are imported before it in any case: not a dependency it adds.
        deps -= {module.rsplit(".", i)[0] for i in range(1, module.count("."))}
        deps.discard(module)
        graph[module] = deps
    return graph


def _package(module: str) -> str:
    """The ORDER entry `module` belongs to: the innermost one that is it or holds it."""
    return max((p for p in ORDER if module == p or module.startswith(p + ".")), key=len)


def _order_violations(graph: dict[str, set[str]]) -> list[str]:
    """'module imports target (lower package < higher package)' for every import of a higher package."""
    rank = {p: i for i, p in enumerate(ORDER)}
    return sorted(
        f"{module} imports {target} ({_package(module)} < {_package(target)})"
        for module, deps in graph.items()
        for target in deps
        if rank[_package(module)] < rank[_package(target)]
    )


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
    # Lazy (function-level) and annotation-only (TYPE_CHECKING) imports count too: a cycle through them is
    # still two modules that need each other, which is what makes a change in one break the other.
    assert _cycles(_graph(annotations=True)) == []


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_cycle_check_sees_a_cycle_through_lazy_and_annotation_only_imports():
    # One module imports the other inside a function, the other imports it back for its annotations.
    sources = {"llm_torch.core.tasks.a": "def run():\n    from .b import step\n",
               "llm_torch.core.tasks.b": "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from .a import run\n"}
    assert _cycles(_graph(sources, annotations=True)) == [sorted(sources)]


def test_lower_packages_never_import_higher_ones():
    # Annotation-only imports are left out here: they never run, so the lower package never loads the higher.
    assert _order_violations(_graph(annotations=False)) == []


def test_the_order_check_finds_a_lower_package_importing_a_higher_one():
    sources = {
        "llm_torch.core.model.a": "def f():\n    from llm_torch.core.engine import b\n",  # lazy, absolute
        "llm_torch.core.engine.b": "from ..tasks.c import g\n",  # relative, up a level
        # a command line in a string is no import; the lower package is
        "llm_torch.core.tasks.c": "import sys\nCOMMAND = [sys.executable, '-c', 'from llm_torch.cli.app import main']\n"
                                  "from llm_torch.core.model import a\n",
        "llm_torch.core.tasks.d": "from . import c\n",  # the same package
        "llm_torch.core.errors": "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from llm_torch.core.tasks import d\n",
        "llm_torch.cli.app": "",
    }
    assert _order_violations(_graph(sources, annotations=False)) == [
        "llm_torch.core.engine.b imports llm_torch.core.tasks.c (llm_torch.core.engine < llm_torch.core.tasks)",
        "llm_torch.core.model.a imports llm_torch.core.engine.b (llm_torch.core.model < llm_torch.core.engine)",
    ]


def test_every_sub_package_has_its_place_in_the_order():
    # A new package under core/ must be placed in ORDER, not pass as one of core's top modules.
    unplaced = [m for m, (_, is_package) in MODULES.items() if is_package and m not in ORDER and m.count(".") == 2]
    assert unplaced == []


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
