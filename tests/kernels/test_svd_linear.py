"""The fused SVD linear op (kernels/svd_linear.py): forward and every gradient against float64.

Runs the Triton kernels in the interpreter on the CPU (``TRITON_INTERPRET=1``, the default of the
test suite) or compiled on CUDA when the suite runs with ``TRITON_INTERPRET=0`` on a GPU. Inputs are
fresh random values, outputs are poisoned before the kernels run, dropout is checked against the
kernel's own mask applied in the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adalora_fast.testing import max_rel_err
from tests.helpers import kernel_devices

kernels = pytest.importorskip("adalora_fast.kernels.svd_linear")
from adalora_fast.kernels.dropout_mask import dropout_mask  # noqa: E402

svd_linear = kernels.svd_linear
DEVICES = kernel_devices()
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
ALPHA = 8.0
INIT_R_EXTRA = 2  # ranknum = r + 2: the scale uses ranknum, not r (as after pruning)


@dataclass
class Case:
    rows: int
    d_in: int
    d_out: int
    r: int
    dtype: torch.dtype = torch.float32
    adapter_dtype: torch.dtype = torch.float32
    lead: tuple[int, ...] = ()
    bias: bool = True
    fiff: bool = False
    masked: bool = False
    p: float = 0.0
    noncontig: bool = False

    def __str__(self) -> str:
        flags = [n for n in ("bias", "fiff", "masked", "noncontig") if getattr(self, n)]
        return (
            f"{self.lead}x{self.rows}x{self.d_in}->{self.d_out} r{self.r} {str(self.dtype)[6:]}"
            f"/{str(self.adapter_dtype)[6:]} p{self.p} {'+'.join(flags)}"
        )


def make_inputs(case: Case, device: str, seed: int = 0) -> dict:
    """Random non-zero inputs; x requires grad and may be a non-contiguous view."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, dtype=torch.float32, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    shape = (*case.lead, case.rows, case.d_in)
    if case.noncontig:  # every other column of a wider tensor
        x = randn(*shape[:-1], 2 * case.d_in, dtype=case.dtype)[..., ::2]
    else:
        x = randn(*shape, dtype=case.dtype)
    x.requires_grad_(True)
    w_shape = (case.d_in, case.d_out) if case.fiff else (case.d_out, case.d_in)
    weight = randn(*w_shape, dtype=case.dtype, scale=case.d_in**-0.5)
    bias = randn(case.d_out, dtype=case.dtype) if case.bias else None
    A = randn(case.r, case.d_in, dtype=case.adapter_dtype)
    E = randn(case.r, 1, dtype=case.adapter_dtype)
    B = randn(case.d_out, case.r, dtype=case.adapter_dtype)
    if case.masked:
        E[::2] = 0.0  # masked ranks: lambda = 0, still trained
    for t in (A, E, B):
        t.requires_grad_(True)
    ranknum = torch.full((1,), float(case.r + INIT_R_EXTRA), device=device)
    return {"x": x, "weight": weight, "bias": bias, "lora_A": A, "lora_E": E, "lora_B": B, "ranknum": ranknum}


def _call(inp, **kw):
    keys = ("x", "weight", "bias", "lora_A", "lora_E", "lora_B", "ranknum")
    return svd_linear(*(inp[k] for k in keys), ALPHA, **kw)


def run_fused(case: Case, inp: dict, seed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    y = svd_linear(
        inp["x"], inp["weight"], inp["bias"], inp["lora_A"], inp["lora_E"], inp["lora_B"], inp["ranknum"],
        ALPHA, dropout_p=case.p, fan_in_fan_out=case.fiff, seed=seed,
    )  # fmt: skip
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(99)).to(y)
    y.backward(dy)
    return y, dy


def reference(case: Case, inp: dict, dy: torch.Tensor, keep: torch.Tensor | None) -> dict:
    """float64 forward and gradients of the same inputs (dropout = the kernel's mask)."""
    x, A, E, B = (inp[k].detach().double().requires_grad_(True) for k in ("x", "lora_A", "lora_E", "lora_B"))
    W = inp["weight"].double()
    W = W.T if case.fiff else W
    xd = x if keep is None else torch.where(keep, x / (1.0 - case.p), 0.0)
    scale = ALPHA / (inp["ranknum"].double() + 1e-5)
    y = x @ W.T + (xd @ (A * E).T @ B.T) * scale
    if inp["bias"] is not None:
        y = y + inp["bias"].double()
    y.backward(dy.double())
    return {"y": y.detach(), "x": x.grad, "lora_A": A.grad, "lora_E": E.grad, "lora_B": B.grad}


def check_case(case: Case, device: str, seed: int = 0) -> None:
    inp = make_inputs(case, device, seed)
    frozen = inp["weight"].clone()
    dseed = torch.tensor([1000 + seed], dtype=torch.int64, device=device)
    y, dy = run_fused(case, inp, dseed if case.p > 0 else None)
    keep = None
    if case.p > 0:
        keep = dropout_mask(dseed, y.numel() // case.d_out, case.d_in, case.p).reshape(inp["x"].shape)
    ref = reference(case, inp, dy, keep)
    tol = TOL[case.dtype]
    assert y.dtype == case.dtype and y.shape == ref["y"].shape
    errs = {"y": max_rel_err(y, ref["y"])}
    for k in ("x", "lora_A", "lora_E", "lora_B"):
        grad = inp[k].grad
        assert grad is not None and grad.dtype == inp[k].dtype and grad.shape == inp[k].shape, k
        errs[k] = max_rel_err(grad, ref[k])
    # The adapter gradients are sums over the rows (tokens). Where such a sum cancels (its result far
    # below its terms), no fp32 summation order holds 1e-5 of the result: PyTorch's own fp32 path
    # misses it too (rows 43, d_in = d_out = r = 1: dA 1.1e-5). Their error is therefore measured
    # against the larger of max |ref| and the typical size of a random-sign sum of those terms,
    # sum |terms| / sqrt(rows) (the float64 gradients of the same problem with |inputs|). Without
    # cancellation the two are of one size and the check is the plain relative one.
    absolute = {k: v.abs() if torch.is_tensor(v) else v for k, v in inp.items()}
    magnitude = reference(case, absolute, dy.abs(), keep)
    rows = max(1, y.numel() // case.d_out)
    for k in ("lora_A", "lora_E", "lora_B"):
        scale = max(ref[k].abs().max().item(), magnitude[k].max().item() / rows**0.5)
        assert scale > 0, k
        errs[k] = (inp[k].grad.double() - ref[k]).abs().max().item() / scale
    # adapter grads come out in the adapter dtype: judge them by its tolerance when it is coarser
    for k in ("lora_A", "lora_E", "lora_B"):
        assert errs[k] <= max(tol, TOL.get(case.adapter_dtype, tol)), (case, errs)
    assert errs["y"] <= tol and errs["x"] <= tol, (str(case), errs)
    # the frozen base is untouched: no gradient, same values
    assert inp["weight"].grad is None and torch.equal(inp["weight"], frozen)
    assert inp["bias"] is None or inp["bias"].grad is None


def grid() -> list[Case]:
    """rows x r over the issue's grid; the other options rotate so each appears several times."""
    dims = [(45, 29), (70, 96), (17, 130), (100, 33)]
    cases = []
    for i, (rows, r) in enumerate((rows, r) for rows in (1, 7, 33, 129) for r in (1, 3, 12, 64)):
        d_in, d_out = dims[i % 4]
        cases.append(
            Case(
                rows, d_in, d_out, r,
                lead=(2,) if i % 3 == 0 else (),
                bias=i % 2 == 0,
                fiff=i % 4 == 1,
                masked=r > 1 and i % 2 == 1,
                p=0.3 if i % 4 in (2, 3) else 0.0,
                noncontig=i % 5 == 0,
            )
        )  # fmt: skip
    return cases


GRID = grid()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", GRID, ids=str)
def test_fp32_forward_and_gradients(case, device, poison_empty):
    check_case(case, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", GRID[1::2], ids=str)
def test_fp16_forward_and_gradients(case, device, poison_empty):
    case = Case(**{**case.__dict__, "dtype": torch.float16})
    check_case(case, device)


@pytest.mark.parametrize("device", DEVICES)
def test_adapters_in_the_base_dtype(device):
    check_case(Case(33, 40, 24, 12, dtype=torch.float16, adapter_dtype=torch.float16, p=0.2), device)


@pytest.mark.gpu
@pytest.mark.skipif("cuda" not in DEVICES, reason="bf16 numerics need compiled kernels on CUDA")
@pytest.mark.parametrize("case", GRID[::3], ids=str)
def test_bf16_forward_and_gradients_on_gpu(case):
    check_case(Case(**{**case.__dict__, "dtype": torch.bfloat16}), "cuda")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [*GRID[2::3], Case(33, 40, 24, 12, dtype=torch.float16, p=0.2)], ids=str)
def test_backward_with_the_lambda_gradient_folded(case, device, poison_empty):
    """ADALORA_FAST_FOLD_DLAMBDA (opt-in): d(lambda) reduced in the dQ kernel, every gradient against
    float64 as on the default path."""
    with mock.patch.object(kernels.xt_s_module, "FOLD_DLAMBDA", True):
        check_case(case, device)


TMA_GRID = [  # rows of 16-byte aligned width (d_in, d_out multiples of 8 in fp16 / bf16)
    Case(1, 16, 8, 1),
    Case(33, 64, 96, 12, p=0.3),
    Case(7, 40, 24, 3, lead=(2,), fiff=True, bias=False),
    Case(129, 72, 48, 64, masked=True, p=0.2),
    Case(20, 32, 136, 12, fiff=True, masked=True),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", TMA_GRID, ids=str)
def test_fp16_forward_and_gradients_on_the_tma_gemm(case, device, poison_empty):
    """ADALORA_FAST_TMA_GEMM (opt-in): the forward's y and the backward's dx on the persistent TMA GEMM
    (the shapes whose rows are 16-byte aligned), every output against float64 as on the default path."""
    calls = []
    real = kernels.xw_plus_sb_tma.launch_xw_plus_sb_tma

    def counted(*args):
        calls.append(1)
        return real(*args)

    case = Case(**{**case.__dict__, "dtype": torch.float16})
    with mock.patch.object(kernels.xw_plus_sb_tma, "TMA_GEMM", True), \
            mock.patch.object(kernels.xw_plus_sb_tma, "launch_xw_plus_sb_tma", counted):  # fmt: skip
        check_case(case, device)
    assert len(calls) == 2  # y and dx


@pytest.mark.gpu
@pytest.mark.skipif("cuda" not in DEVICES, reason="bf16 numerics need compiled kernels on CUDA")
@pytest.mark.parametrize("case", TMA_GRID, ids=str)
def test_bf16_forward_and_gradients_on_the_tma_gemm_on_gpu(case):
    with mock.patch.object(kernels.xw_plus_sb_tma, "TMA_GEMM", True):
        check_case(Case(**{**case.__dict__, "dtype": torch.bfloat16}), "cuda")


@pytest.mark.gpu
@pytest.mark.skipif("cuda" not in DEVICES, reason="bf16 numerics need compiled kernels on CUDA")
@pytest.mark.parametrize("case", GRID[::3], ids=str)
def test_bf16_backward_with_the_lambda_gradient_folded_on_gpu(case):
    with mock.patch.object(kernels.xt_s_module, "FOLD_DLAMBDA", True):
        check_case(Case(**{**case.__dict__, "dtype": torch.bfloat16}), "cuda")


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=12, deadline=None)
@given(
    rows=st.integers(1, 70),
    d_in=st.integers(1, 80),
    d_out=st.integers(1, 80),
    r=st.integers(1, 20),
    bias=st.booleans(),
    fiff=st.booleans(),
    p=st.sampled_from([0.0, 0.25]),
    seed=st.integers(0, 2**16),
)
def test_random_shapes(device, rows, d_in, d_out, r, bias, fiff, p, seed):
    check_case(Case(rows, d_in, d_out, r, bias=bias, fiff=fiff, p=p), device, seed)


# ---- edge cases ---------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_zero_tokens(device):
    inp = make_inputs(Case(0, 20, 24, 3, lead=(2,)), device)
    y, _ = run_fused(Case(0, 20, 24, 3), inp, None)
    assert y.shape == (2, 0, 24)
    assert inp["x"].grad.shape == (2, 0, 20)
    for k in ("lora_A", "lora_E", "lora_B"):
        assert torch.equal(inp[k].grad, torch.zeros_like(inp[k])), k


@pytest.mark.parametrize("device", DEVICES)
def test_trainable_bias_gets_its_gradient(device):
    case = Case(7, 20, 24, 3)
    inp = make_inputs(case, device)
    inp["bias"].requires_grad_(True)
    _, dy = run_fused(case, inp, None)
    assert max_rel_err(inp["bias"].grad, dy.double().sum(0)) <= 1e-6


@pytest.mark.parametrize("device", DEVICES)
def test_only_requested_gradients(device):
    case = Case(7, 20, 24, 3)
    inp = make_inputs(case, device)
    inp["x"].requires_grad_(False)
    inp["lora_A"].requires_grad_(False)
    run_fused(case, inp, None)
    assert inp["x"].grad is None and inp["lora_A"].grad is None
    assert inp["lora_E"].grad is not None and inp["lora_B"].grad is not None


@pytest.mark.parametrize("device", DEVICES)
def test_inference_runs_one_forward_only_op(device):
    case = Case(33, 40, 24, 12, masked=True)
    inp = make_inputs(case, device)
    no_training = AssertionError("the training forward ran")
    with (
        torch.no_grad(),
        mock.patch.object(kernels, "svd_linear_fwd", side_effect=no_training),
        mock.patch.object(kernels, "_forward_impl", side_effect=no_training),
    ):
        y = _call(inp)
    assert y.grad_fn is None
    inp["x"].grad = None
    ref = reference(case, inp, torch.zeros_like(y), None)["y"]
    assert max_rel_err(y, ref) <= TOL[torch.float32]


@pytest.mark.parametrize("device", DEVICES)
def test_no_dropout_draws_no_random_numbers(device):
    case = Case(7, 20, 24, 3)
    inp = make_inputs(case, device)
    state = torch.random.get_rng_state()
    run_fused(case, inp, None)
    assert torch.equal(state, torch.random.get_rng_state())


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_seed_follows_manual_seed(device):
    case = Case(7, 20, 24, 3, p=0.5)
    outs = []
    for _ in range(2):
        inp = make_inputs(case, device)
        torch.manual_seed(3)
        with torch.no_grad():
            outs.append(_call(inp, dropout_p=0.5))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("device", DEVICES)
def test_custom_ops_pass_opcheck(device):
    case = Case(9, 20, 24, 3)
    inp = make_inputs(case, device)
    args = [inp[k] for k in ("x", "weight", "bias", "lora_A", "lora_E", "lora_B", "ranknum")]
    seed = torch.tensor([5], device=device)
    torch.library.opcheck(kernels.svd_linear_fwd, (*args, seed, 0.2, ALPHA, False))
    detached = [a.detach() if a is not None else None for a in args]
    torch.library.opcheck(kernels.svd_linear_infer, (*detached, ALPHA, False))


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs_raise_clear_errors(device):
    inp = make_inputs(Case(7, 20, 24, 3), device)
    with pytest.raises(ValueError, match="x has 19 features"):
        _call({**inp, "x": inp["x"][..., :19]})
    with pytest.raises(ValueError, match="x is torch.float16"):
        _call({**inp, "x": inp["x"].half()})
    with pytest.raises(ValueError, match="lora_B"):
        _call({**inp, "lora_B": inp["lora_B"][:, :2]})
    with pytest.raises(ValueError, match="freeze the base weight"):
        _call({**inp, "weight": inp["weight"].clone().requires_grad_(True)})
    with pytest.raises(ValueError, match="dropout_p"):
        _call(inp, dropout_p=1.0)
    with pytest.raises(ValueError, match="bias"):
        _call({**inp, "bias": inp["bias"][:5]})
    big = make_inputs(Case(2, 20, 24, 129), device)
    with pytest.raises(ValueError, match="rank 129"):
        _call(big)
