"""Compiled Triton reads only constexpr globals; the interpreter reads any. Catch the difference on CPU.

A plain ``FLT_MAX = 3.4e38`` read inside a ``@triton.jit`` function runs in the interpreter and fails
to compile on a GPU ("Cannot access global variable ... from within @jit'ed function"), as the first
H100 run of the allocator kernel showed. This test walks every jit function in ``adalora_fast.kernels``
and checks each global it names.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import textwrap
import types

import pytest
import triton
import triton.language as tl
from triton.runtime.jit import KernelInterface

kernels = pytest.importorskip("adalora_fast.kernels")


def _python_function(obj):
    """The Python function under a jit/interpreted function, an Autotuner or a Heuristics wrapper."""
    while not isinstance(obj, types.FunctionType):
        obj = getattr(obj, "fn", None)
        if obj is None:
            return None
    return obj


def jit_functions() -> list[tuple[str, types.FunctionType]]:
    found = []
    for info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"{kernels.__name__}.{info.name}")
        for name, obj in vars(module).items():
            if isinstance(obj, KernelInterface):
                fn = _python_function(obj)
                if fn is not None and fn.__module__ == module.__name__:
                    found.append((f"{info.name}.{name}", fn))
    return found


def _allowed(value) -> bool:
    return (
        isinstance(value, (types.ModuleType, tl.constexpr, KernelInterface, tl.dtype))
        or value is None
        or getattr(value, "__module__", "").startswith("triton")
    )


def test_the_walk_finds_the_kernels():
    names = {name for name, _ in jit_functions()}
    assert {"importance_ema._nonfinite_kernel", "orth_defect._defect_grad_kernel"} <= names


def global_reads(fn: types.FunctionType) -> set[str]:
    """Names the function's body reads as bare names (``x``, not the attribute in ``tl.x``) that are
    not its own arguments or locals: the globals it reads."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    func = tree.body[0]
    local = {a.arg for a in func.args.args + func.args.kwonlyargs}
    loads = set()
    body = ast.Module(body=func.body, type_ignores=[])  # not the decorators: they run on the host
    for node in ast.walk(body):
        if isinstance(node, ast.Name):
            (local if isinstance(node.ctx, ast.Store) else loads).add(node.id)
    return loads - local


@pytest.mark.parametrize("name,fn", jit_functions(), ids=[n for n, _ in jit_functions()])
def test_jit_functions_read_only_constexpr_globals(name, fn):
    bad = {
        g: type(fn.__globals__[g]).__name__
        for g in global_reads(fn)
        if g in fn.__globals__ and not _allowed(fn.__globals__[g])
    }
    assert not bad, f"{name} reads non-constexpr globals {bad}; wrap them in tl.constexpr(...)"


def _kernel_like(x):
    return tl.cdiv(x, 2) <= LIMIT  # noqa: F821


def test_the_check_catches_a_plain_float_and_not_attributes():
    fn = types.FunctionType(_kernel_like.__code__, {"LIMIT": 3.4e38, "cdiv": max, "tl": tl, "triton": triton})
    reads = global_reads(fn)
    assert "LIMIT" in reads and "tl" in reads and "cdiv" not in reads  # tl.cdiv is an attribute
    assert not _allowed(fn.__globals__["LIMIT"])
