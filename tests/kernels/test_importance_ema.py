"""kernels/importance_ema.py: score EMAs and triplet scores of all layers against the per-layer reference."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import kernel_devices

mod = pytest.importorskip("adalora_fast.kernels.importance_ema")
from adalora_fast import reference as ref  # noqa: E402

DEVICES = kernel_devices()
B1, B2 = 0.85, 0.9


class Factors:
    """Random A, E, B (+ grads) of layers with mixed shapes, E as rows of one buffer (as the allocator)."""

    def __init__(self, shapes, r, device, seed=0):
        g = torch.Generator().manual_seed(seed)
        rand = lambda *s: torch.randn(*s, generator=g).to(device)  # noqa: E731
        self.M, self.r = len(shapes), r
        flat_E = rand(self.M, r)
        self.params = (
            [rand(r, d_in) for d_in, _ in shapes]
            + [flat_E[i].view(r, 1) for i in range(self.M)]
            + [rand(d_out, r) for _, d_out in shapes]
        )
        self.grads = [torch.empty_like(p) for p in self.params]
        self.gen = g
        self.layout = mod.layout_table(self.params, r).to(device)
        self.p_table = mod.pointer_table(self.params).to(device)
        self.g_table = mod.pointer_table(self.grads).to(device)
        self.numel = torch.tensor([p.numel() for p in self.params], device=device)
        n = sum(p.numel() for p in self.params)
        self.ema_ipt = torch.zeros(n, device=device)
        self.ema_unc = torch.zeros(n, device=device)
        self.ref_ipt = [torch.zeros_like(p) for p in self.params]
        self.ref_unc = [torch.zeros_like(p) for p in self.params]

    def new_grads(self):
        for t in self.grads:
            t.copy_(torch.randn(t.shape, generator=self.gen))

    def run(self, flag=None):
        return mod.importance_scores_(
            self.p_table, self.g_table, self.layout, self.ema_ipt, self.ema_unc, self.r, B1, B2,
            numel_table=self.numel if flag is not None else None, nonfinite_flag=flag,
        )  # fmt: skip

    def run_reference(self):
        for p, g, i, u in zip(self.params, self.grads, self.ref_ipt, self.ref_unc, strict=True):
            ref.update_importance_(p, g, i, u, B1, B2)
        M = self.M
        s = [i * u for i, u in zip(self.ref_ipt, self.ref_unc, strict=True)]
        return torch.stack([ref.triplet_scores(s[m], s[M + m], s[2 * M + m]) for m in range(M)])

    def flat_reference(self, bufs):
        return torch.cat([t.reshape(-1) for t in bufs])


SHAPES = [(30, 20), (30, 20), (17, 41), (64, 8), (5, 300)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("r", [1, 5, 12, 64])
def test_emas_bitwise_and_scores_match_reference(device, r):
    f = Factors(SHAPES, r, device, seed=r)
    for _ in range(3):
        f.new_grads()
        scores = f.run()
        expected = f.run_reference()
        # same formulas, same fp32 roundings (no FMA contraction): EMAs are bitwise PyTorch's
        assert torch.equal(f.ema_ipt, f.flat_reference(f.ref_ipt))
        assert torch.equal(f.ema_unc, f.flat_reference(f.ref_unc))
        assert scores.shape == (len(SHAPES), r)
        torch.testing.assert_close(scores, expected, rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_grad_skips_the_update_for_all_layers(device, bad):
    f = Factors(SHAPES, 4, device)
    f.new_grads()
    first = f.run()
    ipt, unc = f.ema_ipt.clone(), f.ema_unc.clone()
    f.new_grads()
    f.grads[-2][7, 1] = bad  # one element of one B
    flag = torch.zeros((), dtype=torch.int32, device=device)
    again = f.run(flag)
    assert flag.item() == 1
    assert torch.equal(f.ema_ipt, ipt) and torch.equal(f.ema_unc, unc) and torch.equal(again, first)
    f.grads[-2][7, 1] = 0.5
    flag.zero_()
    f.run(flag)
    assert flag.item() == 0 and not torch.equal(f.ema_ipt, ipt)


def test_layout_rejects_wrong_shapes():
    with pytest.raises(ValueError, match="matrix 1"):
        mod.layout_table([torch.zeros(3, 4), torch.zeros(2, 1), torch.zeros(5, 3)], 3)
