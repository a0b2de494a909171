"""kernels/dropout_mask.py: the counter-based dropout mask (keep rate, seeding, independence of the shape
it is drawn in)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import kernel_devices

dropout_mask = pytest.importorskip("adalora_fast.kernels.dropout_mask").dropout_mask
DEVICES = kernel_devices()


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_mask_statistics_and_seeding(device):
    s1 = torch.tensor([7], device=device)
    s2 = torch.tensor([8], device=device)
    m1 = dropout_mask(s1, 96, 80, 0.3)
    assert abs(m1.float().mean().item() - 0.7) < 0.02
    assert torch.equal(m1, dropout_mask(s1, 96, 80, 0.3))
    assert not torch.equal(m1, dropout_mask(s2, 96, 80, 0.3))
    # the mask of an element does not depend on the shape it is drawn in (rows/cols are the counters)
    assert torch.equal(m1[:50, :33], dropout_mask(s1, 50, 33, 0.3))
