"""The fused orthogonal regulariser (kernels/orth_defect.py): value and every gradient against float64.

Runs the Triton kernels in the interpreter on the CPU (``TRITON_INTERPRET=1``, the default of the
test suite) or compiled on CUDA when the suite runs with ``TRITON_INTERPRET=0`` on a GPU. Inputs are
fresh random factors of mixed shapes (repeated shapes, rank 0, r > d_in, r up to 128), outputs are
poisoned before the kernels run. Also: the pointer-table cache, launch counts independent of the
number of layers, dispatch and fallbacks, opcheck, torch.compile, and GPU-only sync / bf16 checks.
"""

from __future__ import annotations

import warnings
from collections import Counter

import pytest
import torch

import adalora_fast as af
from adalora_fast import backend
from adalora_fast.testing import max_rel_err
from tests.helpers import MIXED, float64_value_and_grads, kernel_devices, orthonormal_factors, random_factors

od = pytest.importorskip("adalora_fast.kernels.orth_defect")
DEVICES = kernel_devices()
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}

SHAPES = {
    "mixed": MIXED,
    "mixed_r64": MIXED + [(64, 80, 70)],
    "mixed_r128": MIXED + [(128, 40, 130), (64, 80, 70)],  # r > d_in at r = 128
    "same": [(12, 32, 32)] * 5,
    "one": [(3, 7, 5)],
    "empty_dims": [(3, 0, 5), (2, 7, 0), (0, 0, 0), (2, 7, 5)],  # d_in = 0, d_out = 0, both
}


def factors(shapes, seed, device, dtype=torch.float32):
    As, Bs = random_factors(shapes, seed, dtype=dtype)
    As = [a.to(device).requires_grad_() for a in As]
    Bs = [b.to(device).requires_grad_() for b in Bs]
    return As, Bs


def check(shapes, seed, device, dtype=torch.float32, call=None):
    """R and every gradient of ``call`` (default: the kernel entry point) against float64."""
    As, Bs = factors(shapes, seed, device, dtype)
    call = call or od.orth_regularization
    value = call(As, Bs)
    assert value.dtype == dtype and value.dim() == 0 and value.device.type == device
    grads = torch.autograd.grad(value, As + Bs)
    ref_value, ref_grads = float64_value_and_grads(As, Bs)
    tol = TOL[dtype]
    assert max_rel_err(value, ref_value) <= tol
    for i, (got, exp) in enumerate(zip(grads, ref_grads, strict=True)):
        which = f"{'A' if i < len(As) else 'B'}[{i % len(As)}] {shapes[i % len(As)]}"
        assert got.shape == exp.shape and got.dtype == dtype, which
        if exp.numel() == 0:
            continue
        if exp.abs().max() == 0:
            assert torch.count_nonzero(got) == 0, which
            continue
        assert max_rel_err(got, exp) <= tol, which
    return value, grads


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("shapes", list(SHAPES.values()), ids=list(SHAPES))
def test_fp32_value_and_gradients(shapes, seed, device, poison_empty):
    check(shapes, seed, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shapes", ["mixed_r64", "same"])
def test_fp16_value_and_gradients(shapes, device, poison_empty):
    check(SHAPES[shapes], 3, device, torch.float16)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_value_and_gradients(device, poison_empty):
    # On the CPU this runs the interpreter's path (bf16 upcast to fp32 before the dot, as its bf16
    # dot is wrong); compiled GPU numerics are checked by test_bf16_on_gpu.
    check(SHAPES["mixed"], 4, device, torch.bfloat16)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_factors(device):
    # views with non-unit strides: the kernels read through the table's strides
    As, Bs = factors([(5, 40, 24), (12, 33, 17)], 5, device)
    As = [a[:, ::2] for a in As]  # (r, d_in / 2), column stride 2
    Bs = [b.t().contiguous().t() for b in Bs]  # (d_out, r) column-major
    value = od.orth_regularization(As, Bs)
    grads = torch.autograd.grad(value, As + Bs)
    ref_value, ref_grads = float64_value_and_grads(As, Bs)
    assert max_rel_err(value, ref_value) <= 1e-5
    for got, exp in zip(grads, ref_grads, strict=True):
        assert max_rel_err(got, exp) <= 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_only_rank_zero_layers(device, poison_empty):
    As = [torch.zeros(0, 9, device=device, requires_grad=True), torch.zeros(0, 4, device=device)]
    Bs = [torch.zeros(6, 0, device=device, requires_grad=True), torch.zeros(3, 0, device=device)]
    value = od.orth_regularization(As, Bs)
    assert value.item() == 0.0
    gA, gB = torch.autograd.grad(value, [As[0], Bs[0]])
    assert gA.shape == (0, 9) and gB.shape == (6, 0)


@pytest.mark.parametrize("device", DEVICES)
def test_orthonormal_factors_give_zero_and_zero_gradients(device):
    # ||D||_F == 0 exactly (identity blocks): zero gradient, not NaN, as PyTorch's norm backward
    A = torch.eye(3, 7, device=device).requires_grad_()
    B = torch.eye(5, 3, device=device).requires_grad_()
    (A2,), (B2,) = factors([(3, 7, 5)], 13, device)
    grads = torch.autograd.grad(od.orth_regularization([A, A2], [B, B2]), [A, B, A2, B2])
    assert all(torch.isfinite(g).all() for g in grads)
    assert torch.count_nonzero(grads[0]) == 0 and torch.count_nonzero(grads[1]) == 0
    _, (_, ref_dA2, _, ref_dB2) = float64_value_and_grads([A, A2], [B, B2])
    assert max_rel_err(grads[2], ref_dA2) <= 1e-5 and max_rel_err(grads[3], ref_dB2) <= 1e-5
    # nearly orthonormal factors: a small positive value, equal to the reference
    shapes = [s for s in MIXED if 0 < s[0] <= min(s[1], s[2])]
    As, Bs = orthonormal_factors(shapes, seed=5)
    value = od.orth_regularization([a.to(device) for a in As], [b.to(device) for b in Bs])
    assert 0 <= value.item() < 1e-6


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_accumulate_and_are_separate(device):
    As, Bs = factors(MIXED, 6, device)
    for p in As + Bs:
        p.grad = None
    od.orth_regularization(As, Bs).backward()
    first = [p.grad.clone() for p in As + Bs]
    od.orth_regularization(As, Bs).backward()
    for p, g in zip(As + Bs, first, strict=True):
        assert torch.allclose(p.grad, 2 * g, rtol=1e-6, atol=0)
    # every gradient is its own region: writing one leaves the others alone
    for p in As + Bs:
        p.grad = None
    od.orth_regularization(As, Bs).backward()
    before = [p.grad.clone() for p in As + Bs]
    As[0].grad.fill_(123.0)
    assert all(torch.equal(p.grad, g) for p, g in zip(As[1:] + Bs, before[1:], strict=True))


# ---- the pointer table --------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_table_cached_and_rebuilt_when_storage_changes(device):
    od.clear_table_cache()
    As, Bs = factors(MIXED, 7, device)
    As = [torch.nn.Parameter(a.detach()) for a in As]
    Bs = [torch.nn.Parameter(b.detach()) for b in Bs]
    builds = od.TABLE_BUILDS["orth_defect"]
    od.orth_regularization(As, Bs).backward()
    assert od.TABLE_BUILDS["orth_defect"] == builds + 1
    for _ in range(2):  # steady state: same parameters, no rebuild (no host-to-device copy)
        for p in As + Bs:
            p.grad = None
        od.orth_regularization(As, Bs).backward()
    assert od.TABLE_BUILDS["orth_defect"] == builds + 1
    # in-place updates (optimizer steps) keep the storage: still cached, new values are read
    with torch.no_grad():
        As[0].mul_(1.5)
    check_against_reference(As, Bs)
    assert od.TABLE_BUILDS["orth_defect"] == builds + 1
    # a parameter's storage replaced (e.g. loading a checkpoint with .data =): rebuilt, right values
    keep_alive = Bs[3].data
    Bs[3].data = Bs[3].data.clone() * 0.5
    check_against_reference(As, Bs)
    assert od.TABLE_BUILDS["orth_defect"] == builds + 2
    # a shape change (resized ranks): rebuilt again
    As[0].data = As[0].data[:5].clone()
    Bs[0].data = Bs[0].data[:, :5].clone()
    check_against_reference(As, Bs)
    assert od.TABLE_BUILDS["orth_defect"] == builds + 3
    del keep_alive


def check_against_reference(As, Bs):
    value = od.orth_regularization(As, Bs)
    grads = torch.autograd.grad(value, As + Bs)
    ref_value, ref_grads = float64_value_and_grads(As, Bs)
    assert max_rel_err(value, ref_value) <= 1e-5
    for got, exp in zip(grads, ref_grads, strict=True):
        if exp.numel() and exp.abs().max() > 0:
            assert max_rel_err(got, exp) <= 1e-5


# ---- launch counts ------------------------------------------------------------------------------
# ops that only make views or touch metadata (no kernel): excluded from the count
VIEW_OPS = {
    "aten::alias", "aten::as_strided", "aten::detach", "aten::expand", "aten::narrow", "aten::reshape",
    "aten::_reshape_alias", "aten::select", "aten::slice", "aten::split", "aten::split_with_sizes",
    "aten::squeeze", "aten::t", "aten::transpose", "aten::unsqueeze", "aten::view", "aten::_unsafe_view",
    "aten::lift_fresh",
}  # fmt: skip


def counted_ops(fn) -> tuple[Counter, Counter]:
    """(ATen ops other than views, Triton launches) of ``fn()``."""
    from torch.profiler import ProfilerActivity, profile

    launches = Counter(od.LAUNCHES)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    aten = Counter(e.name for e in prof.events() if e.name.startswith("aten::") and e.name not in VIEW_OPS)
    return aten, Counter(od.LAUNCHES) - launches


def llama_like(layers: int, device: str):
    """``layers`` adapted layers, cycling through Llama's projection kinds (16 -> 16, 16 -> 24, 24 -> 16)."""
    kinds = [(4, 16, 16)] * 4 + [(4, 16, 24)] * 2 + [(4, 24, 16)]
    shapes = [kinds[i % len(kinds)] for i in range(layers)]
    As, Bs = factors(shapes, 8, device)
    return [torch.nn.Parameter(a.detach()) for a in As], [torch.nn.Parameter(b.detach()) for b in Bs]


@pytest.mark.parametrize("device", DEVICES)
def test_launch_count_independent_of_layers(device):
    counts = {}
    for layers in (2, 16):
        As, Bs = llama_like(layers, device)
        params = As + Bs
        af.orth_regularization(As, Bs, backend="triton").backward()  # builds the table
        for p in params:
            p.grad = None
        box = {}
        fwd = counted_ops(lambda: box.update(v=af.orth_regularization(As, Bs, backend="triton")))  # noqa: B023
        bwd = counted_ops(lambda: box["v"].backward())  # noqa: B023
        assert all(p.grad is not None for p in params)
        counts[layers] = (fwd, bwd)
    (fwd2, bwd2), (fwd16, bwd16) = counts[2], counts[16]
    assert fwd2 == fwd16, (fwd2, fwd16)
    assert bwd2 == bwd16, (bwd2, bwd16)
    assert sum(fwd2[1].values()) == 2 and sum(bwd2[1].values()) == 1  # Triton launches
    # no ATen compute on our side: allocations (plus, in the interpreter, its argument copies) and,
    # in the backward, the engine's seed gradient (ones_like)
    compute = {"aten::empty", "aten::empty_like", "aten::empty_strided", "aten::ones_like", "aten::fill_"}
    interpreter = {"aten::copy_", "aten::set_", "aten::new_empty"} if device == "cpu" else set()
    extra = (set(fwd2[0]) | set(bwd2[0])) - {"aten::unflatten_dense_tensors"}
    assert extra <= compute | interpreter, extra


# ---- dispatch, fallbacks, errors ----------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_dispatch(device):
    assert backend.resolve("orth_reg", "auto", torch.device("cpu")) == "torch"
    assert backend.resolve("orth_reg", "triton", torch.device(device)) == "triton"
    if device == "cuda":
        assert backend.resolve("orth_reg", "auto", torch.device("cuda")) == "triton"
    As, Bs = factors(MIXED, 9, device)
    before = od.LAUNCHES["_gram_defect_kernel"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning: the kernels really run
        value = af.orth_regularization(As, Bs, backend="triton")
    assert od.LAUNCHES["_gram_defect_kernel"] == before + 1
    assert max_rel_err(value, af.orth_regularization(As, Bs, backend="torch")) <= 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["fp64", "mixed_dtype", "rank129"])
def test_unsupported_inputs_fall_back_to_torch(device, case, monkeypatch):
    backend.reset_warnings()
    As, Bs = factors([(3, 7, 5), (4, 9, 6)], 10, device)
    if case == "fp64":
        As, Bs = [a.double() for a in As], [b.double() for b in Bs]
    elif case == "mixed_dtype":
        Bs[1] = Bs[1].half()
    else:
        As[1] = torch.randn(129, 9, device=device) * 0.1
    before = od.LAUNCHES["_gram_defect_kernel"]
    with pytest.warns(UserWarning, match="fused orth_reg cannot run"):
        value = af.orth_regularization(As, Bs, backend="triton")
    assert od.LAUNCHES["_gram_defect_kernel"] == before
    assert torch.equal(value, af.orth_regularization(As, Bs, backend="torch"))


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs_raise_clear_errors(device):
    As, Bs = factors([(3, 7, 5), (4, 9, 6)], 11, device)
    with pytest.raises(ValueError, match="2 lora_A but 1 lora_B"):
        od.orth_regularization(As, Bs[:1])
    with pytest.raises(ValueError, match="at least one"):
        od.orth_regularization([], [])
    with pytest.raises(ValueError, match=r"lora_B\[1\] must be 2-D"):
        od.orth_regularization(As, [Bs[0], Bs[1].flatten()])
    with pytest.raises(od.UnsupportedInputs, match=r"lora_A\[1\] has rank 129 > 128"):
        od.orth_regularization([As[0], torch.randn(129, 9, device=device)], Bs)


# ---- torch.library ------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_custom_ops_pass_opcheck(device):
    As, Bs = factors([(3, 7, 5), (0, 4, 6), (5, 3, 9)], 12, device)
    torch.library.opcheck(od.orth_defect_fwd, (As, Bs))
    detached = ([a.detach() for a in As], [b.detach() for b in Bs])
    _, unit = od.orth_defect_fwd(*detached)
    grad = torch.tensor(0.7, device=device)
    torch.library.opcheck(od.orth_defect_bwd, (grad, *detached, unit))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    As, Bs = factors(MIXED, 14, device)

    def reg(As, Bs):
        return af.orth_regularization(As, Bs, backend="triton")

    compiled = torch.compile(reg, fullgraph=True)  # fullgraph: any graph break is an error
    before = Counter(od.LAUNCHES)
    value = 0.5 * compiled(As, Bs)
    grads = torch.autograd.grad(value, As + Bs)
    launched = Counter(od.LAUNCHES) - before
    assert launched == {"_gram_defect_kernel": 1, "_mean_kernel": 1, "_defect_grad_kernel": 1}
    ref_value, ref_grads = float64_value_and_grads(As, Bs)
    assert max_rel_err(value, 0.5 * ref_value) <= 1e-5
    for got, exp in zip(grads, ref_grads, strict=True):
        if exp.numel():
            assert max_rel_err(got, 0.5 * exp) <= 1e-5


# ---- GPU only -----------------------------------------------------------------------------------
needs_cuda = pytest.mark.skipif("cuda" not in DEVICES, reason="needs compiled kernels on CUDA")


@pytest.mark.gpu
@needs_cuda
def test_no_host_sync_in_steady_state_on_gpu():
    As, Bs = llama_like(4, "cuda")
    params = As + Bs
    af.orth_regularization(As, Bs).backward()  # "auto" picks the kernels on CUDA; builds the table
    torch.cuda.synchronize()
    before = Counter(od.LAUNCHES)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            for p in params:
                p.grad = None
            af.orth_regularization(As, Bs).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert (Counter(od.LAUNCHES) - before)["_gram_defect_kernel"] == 3
    check_against_reference(As, Bs)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("shapes", ["mixed", "mixed_r128"])
def test_bf16_on_gpu(shapes):
    check(SHAPES[shapes], 15, "cuda", torch.bfloat16)


@pytest.mark.gpu
@needs_cuda
def test_llama_sized_factors_on_gpu():
    # long rows (11008) and many tiles per matrix, fp32 against float64
    check([(12, 4096, 11008), (12, 11008, 4096), (12, 4096, 4096), (0, 4096, 4096)], 16, "cuda")


# ---- compiled for sm_90 (no GPU needed) ---------------------------------------------------------
AOT_SCRIPT = """
import triton.language as tl
from adalora_fast.kernels import orth_defect as od
from tests.kernels.sm90 import resource_usage

common = {"DTYPE": tl.float32, "COLS": od.TABLE_COLUMNS}
fwd_sig = {"table_ptr": "*i64", "unit_ptr": "*fp32", "norm_ptr": "*fp32", "R_MAX": "i32"}
bwd_sig = {"table_ptr": "*i64", "work_ptr": "*i64", "unit_ptr": "*fp32", "g_ptr": "*fp32",
           "out_ptr": "*fp32", "R_MAX": "i32", "coef": "fp32"}
for r_pad in (16, 32, 64, 128):
    variants = [
        ("fwd", od._gram_defect_kernel, fwd_sig, 3, {**common, "UPCAST": False, "PREC": "ieee",
         "R_PAD": r_pad, "BLOCK_L": od._block_l(r_pad, False)}),
        ("bwd", od._defect_grad_kernel, bwd_sig, 2, {**common, "R_PAD": r_pad,
         "BLOCK_R": od._block_r(r_pad), "BLOCK_L": od._block_l(r_pad, True)}),
    ]
    for name, fn, sig, stages, consts in variants:
        usage = resource_usage(fn, sig, consts, num_warps=od._num_warps(r_pad), num_stages=stages)
        print(name, r_pad, usage)
        assert "STACK:0 " in usage, (name, r_pad, usage)
"""


@pytest.mark.slow
def test_fp32_kernels_compile_for_sm90_without_spills():
    """ptxas (shipped with Triton) compiles the IEEE fp32 variants, the spill-prone ones, for sm_90."""
    from tests.kernels.sm90 import run_script, skip_without_tools

    skip_without_tools()
    out = run_script(AOT_SCRIPT)
    assert out.count("STACK:0 ") == 8, out
