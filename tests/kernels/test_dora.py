"""DoRA's row norms ‖W + s·B A‖ from the three small pieces (kernels/dora.py) equal the direct ones."""

import torch

from loraforge.kernels.dora import row_norms
from loraforge.kernels.frozen import FrozenWeight


def _parts(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=g).to(dtype)
    a, b = torch.randn(4, 64, generator=g) * 0.1, torch.randn(48, 4, generator=g) * 0.1
    return w, a, b


def test_row_norms_equal_the_direct_norms():
    w, a, b = _parts()
    direct = (w.double() + 2.0 * b.double() @ a.double()).norm(dim=1)
    torch.testing.assert_close(row_norms(FrozenWeight(w, torch.float32), a, b, 2.0).double(), direct,
                               rtol=1e-5, atol=0)


def test_row_norms_ignore_an_autocast_and_cache_only_the_frozen_part():
    w, a, b = _parts()
    fw = FrozenWeight(w, torch.float32)
    plain = row_norms(fw, a, b, 2.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = row_norms(fw, a, b, 2.0)
    torch.testing.assert_close(under, plain, rtol=1e-6, atol=0)
    # a trained B changes the norms at once (only ‖W_i‖² is cached)
    moved = row_norms(fw, a, b * 3, 2.0)
    direct = (w.double() + 2.0 * 3 * b.double() @ a.double()).norm(dim=1)
    torch.testing.assert_close(moved.double(), direct, rtol=1e-5, atol=0)
