"""PSNR and SSIM against hand-computed values."""
import math

import pytest
import torch

from data.quality import psnr, ssim


def test_psnr_by_hand():
    a = torch.zeros(1, 3, 4, 4)
    b = torch.full((1, 3, 4, 4), 0.1)
    assert psnr(a, b).item() == pytest.approx(20.0)  # MSE 0.01 -> 10 log10(100)
    assert math.isinf(psnr(a, a).item())


def test_ssim_of_constant_images_by_hand():
    a = torch.full((1, 1, 16, 16), 0.2)
    b = torch.full((1, 1, 16, 16), 0.6)
    c1 = 0.01 ** 2
    # no variance: SSIM = (2 mu_a mu_b + c1) / (mu_a^2 + mu_b^2 + c1)
    assert ssim(a, b).item() == pytest.approx((2 * 0.2 * 0.6 + c1) / (0.04 + 0.36 + c1))
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(ssim(x, x), torch.ones(2, dtype=torch.float64))
    noisy = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    assert (ssim(x, noisy) < 0.95).all() and (ssim(x, noisy) > ssim(x, torch.rand_like(x))).all()
