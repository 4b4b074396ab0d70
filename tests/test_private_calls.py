"""No object reaches into another's private members: in cli/, core/ and quant/, `x._name` (read, call or
assignment) and `getattr(x, "_name")` are allowed only on self, cls or super(); a module calls its own
private functions by their bare names. What one object needs from another is a public method
(Request.take / Request.finish for the scheduler). The exceptions are other libraries' members that only exist
under an underscore name, each with the reason."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("cli", "core", "quant")

ALLOWED = {
    "_parameters": "torch.nn.Module's parameter dict: loading swaps a meta parameter for the loaded one in place",
    "_buffers": "torch.nn.Module's own buffers (no recursion into children, None entries kept)",
    "_non_persistent_buffers_set": "torch.nn.Module: which buffers a state dict leaves out (no public accessor)",
    "_weight_int8pack_mm": "torch's CPU int8 weight-only matmul, public only under this name",
    "_mmap": "numpy.memmap's mmap object: madvise drops the pages of tensors already decoded",
}
OWN = {"self", "cls"}
ACCESSORS = {"getattr", "setattr", "hasattr", "delattr"}


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _own(node: ast.expr) -> bool:
    if isinstance(node, ast.Name):
        return node.id in OWN
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "super"


def violations(source: str, filename: str = "<source>") -> list[tuple[int, str]]:
    """(line, expression) for every private member reached on an object other than self, cls or super()."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Attribute):
            obj, name = node.value, node.attr
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ACCESSORS
              and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
            obj, name = node.args[0], node.args[1].value
        else:
            continue
        if _private(name) and not _own(obj) and name not in ALLOWED:
            found.append((node.lineno, ast.unparse(node)))
    return sorted(found)


def _sources() -> dict[str, str]:
    return {str(f.relative_to(ROOT)): f.read_text(encoding="utf-8")
            for folder in FOLDERS for f in sorted((ROOT / folder).rglob("*.py"))}


def test_no_private_members_reached_across_objects():
    bad = [f"{path}:{line}: {expr}" for path, source in _sources().items() for line, expr in violations(source, path)]
    assert not bad, "private members reached on another object (give it a public method):\n" + "\n".join(bad)


def test_every_exception_is_still_needed():
    """An allowed name no code uses any more leaves the list."""
    text = "\n".join(_sources().values())
    assert [name for name in ALLOWED if name not in text] == []


def test_the_check_finds_what_it_forbids():
    source = '''
import torch
from .helpers import _helper

def _local():
    return 1

class A(Base):
    def f(self, req, other):
        req._finish("stop")           # a private method of another object
        other._state = 1              # assigning one
        x = other.inner._cache        # reading one through a chain
        getattr(req, "_events", None) # the same by name
        self._mine()
        type(self)._table
        super()._base()
        _local()
        _helper()
        req.__class__, req.finish()
        torch._weight_int8pack_mm

    @classmethod
    def g(cls):
        return cls._registry
'''
    assert [expr for _, expr in violations(source)] == [
        "req._finish", "other._state", "other.inner._cache", "getattr(req, '_events', None)", "type(self)._table"]
