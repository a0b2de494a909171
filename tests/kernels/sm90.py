"""Compile a Triton kernel for sm_90 without a GPU (Triton ships ptxas and cuobjdump) and read its
resource use: registers, stack (spills), shared memory. Run in a process with ``TRITON_INTERPRET=0``
(the test suite's own process interprets the kernels): the tests call :func:`run_script`."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from typing import Any

import pytest


def tools_dir() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def skip_without_tools() -> None:
    if not all(os.path.exists(os.path.join(tools_dir(), b)) for b in ("ptxas", "cuobjdump")):
        pytest.skip("no ptxas / cuobjdump in the Triton install")


def resource_usage(fn: Any, signature: dict[str, str], constexprs: dict[str, Any], **options: Any) -> str:
    """cuobjdump's ``REG:.. STACK:.. SHARED:..`` line of ``fn`` compiled for sm_90 (``options``:
    num_warps, num_stages)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(
        fn=fn, signature={**signature, **dict.fromkeys(constexprs, "constexpr")}, constexprs=constexprs
    )
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    try:
        out = subprocess.run([os.path.join(tools_dir(), "cuobjdump"), "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
    finally:
        os.unlink(f.name)
    return next(line.strip() for line in out.splitlines() if "REG:" in line)


def run_script(script: str) -> str:
    """Run ``script`` in a fresh process with compiled (not interpreted) Triton; its stdout."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    return proc.stdout
