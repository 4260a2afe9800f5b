"""Hashing losses on relaxed codes u in (-1, 1)^{B x K} and multi-hot labels y in {0, 1}^{B x C}.

Pairs are formed inside the mini-batch (all B^2 ordered pairs, the diagonal included); two images are similar when
they share at least one label. Every loss is an nn.Module `loss(u, y, reduction="mean") -> scalar`; with
reduction="none" it returns each image's term, a B-vector whose mean is the scalar: image i's row of the pair
matrix averaged over the batch, plus its own quantisation term (the per-image loss of the defenses, defend.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from runs.errors import UserError


def similarity(y: torch.Tensor) -> torch.Tensor:
    """s_ij = 1 if images i and j share a label, else 0 (B x B)."""
    return (y @ y.t() > 0).to(y.dtype)


REDUCTIONS = ("mean", "none")


def reduce(terms: torch.Tensor, reduction: str) -> torch.Tensor:
    """The mean of a B x ... tensor of terms ("mean"), or each image's mean over its row ("none": a B-vector)."""
    if reduction == "mean":
        return terms.mean()
    if reduction == "none":
        return terms.flatten(1).mean(1) if terms.dim() > 1 else terms
    raise UserError(f"unknown loss reduction {reduction!r}; use one of {', '.join(REDUCTIONS)}")


def quantization_error(u: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """mean (u - sign(u))^2, the usual quantisation penalty (per image with reduction="none")."""
    return reduce((u - torch.where(u >= 0, 1.0, -1.0)).pow(2), reduction)


def balance_weights(s: torch.Tensor) -> torch.Tensor:
    """HashNet's weights: similar and dissimilar pairs each carry half of the total weight."""
    n = s.numel()
    n_pos = s.sum().clamp(min=1)
    n_neg = (n - s.sum()).clamp(min=1)
    return torch.where(s > 0, n / n_pos, n / n_neg) / 2


class PairwiseLoss(nn.Module):
    """DPH-style pairwise loss (CIBA's default): mean_ij (u_i.u_j / norm - s_ij)^2 + q * quantisation, s in {-1,+1}.

    norm = K ("bits", the formula in the paper) or the batch size ("batch", what the official CIBA code computes).
    """

    def __init__(self, bits: int, norm: str = "bits", quant_weight: float = 0.0):
        super().__init__()
        if norm not in ("bits", "batch"):
            raise UserError(f"unknown pairwise normalisation {norm!r}; use 'bits' or 'batch'")
        self.bits, self.norm, self.quant_weight = bits, norm, quant_weight

    def forward(self, u: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        s = 2 * similarity(y) - 1
        scale = self.bits if self.norm == "bits" else u.shape[0]
        loss = reduce((u @ u.t() / scale - s).pow(2), reduction)
        return loss + self.quant_weight * quantization_error(u, reduction) if self.quant_weight else loss


class DPSHLoss(nn.Module):
    """DPSH (Li et al. 2016): mean_ij log(1 + exp(theta_ij)) - s_ij theta_ij, theta = u_i.u_j / 2, + eta * quant."""

    def __init__(self, bits: int, quant_weight: float = 0.1):
        super().__init__()
        self.quant_weight = quant_weight

    def forward(self, u: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        theta = 0.5 * u @ u.t()
        loss = reduce(F.softplus(theta) - similarity(y) * theta, reduction)
        return loss + self.quant_weight * quantization_error(u, reduction)


class HashNetLoss(nn.Module):
    """HashNet (Cao et al. 2017): weighted pairwise cross-entropy on alpha * u_i.u_j, balancing similar/dissimilar."""

    def __init__(self, bits: int, alpha: float = 0.1):
        super().__init__()
        self.alpha = alpha

    def forward(self, u: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        s = similarity(y)
        dot = self.alpha * u @ u.t()
        return reduce(balance_weights(s) * (F.softplus(dot) - s * dot), reduction)


class DCHLoss(nn.Module):
    """DCH (Cao et al. 2018): Cauchy cross-entropy on d_ij = K/2 (1 - cos(u_i, u_j)), weighted, + Cauchy quantisation.

    similar: log(1 + d/gamma); dissimilar: log(1 + gamma/d); quantisation: log(1 + d(|u|, 1)/gamma).
    """

    def __init__(self, bits: int, gamma: float = 20.0, quant_weight: float = 0.1):
        super().__init__()
        self.bits, self.gamma, self.quant_weight = bits, gamma, quant_weight

    def forward(self, u: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        s = similarity(y)
        un = F.normalize(u, dim=1, eps=1e-8)
        d = (self.bits / 2 * (1 - un @ un.t())).clamp(min=1e-6)
        pair = torch.where(s > 0, torch.log1p(d / self.gamma), torch.log1p(self.gamma / d))
        loss = reduce(balance_weights(s) * pair, reduction)
        cos_q = u.abs().sum(1) / (u.norm(dim=1).clamp(min=1e-8) * math.sqrt(self.bits))
        d_q = self.bits / 2 * (1 - cos_q)
        return loss + self.quant_weight * reduce(torch.log1p(d_q / self.gamma), reduction)


def hash_centers(n_classes: int, bits: int, seed: int = 0) -> torch.Tensor:
    """CSQ's hash centres: rows of a Sylvester-Hadamard matrix (and their negatives) when K is a power of two and
    C <= 2K; otherwise seeded Bernoulli(0.5) codes, the draw with the largest minimum pairwise distance of 20."""
    if bits & (bits - 1) == 0 and n_classes <= 2 * bits:
        h = torch.ones(1, 1)
        while h.shape[0] < bits:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        return torch.cat([h, -h], 0)[:n_classes]
    gen = torch.Generator().manual_seed(seed)
    best, best_min = None, -1.0
    for _ in range(20):
        c = torch.randint(0, 2, (n_classes, bits), generator=gen).float() * 2 - 1
        dist = (bits - c @ c.t()) / 2 + torch.eye(n_classes) * bits
        if dist.min() > best_min:
            best, best_min = c, float(dist.min())
    return best


class CSQLoss(nn.Module):
    """CSQ (Yuan et al. 2020): binary cross-entropy of (u+1)/2 to the image's hash centre, + lambda (|u| - 1)^2.

    A multi-label image's centre is the sign of the sum of its labels' centres (ties to +1).
    """

    def __init__(self, bits: int, n_classes: int, quant_weight: float = 1e-4, seed: int = 0):
        super().__init__()
        self.quant_weight = quant_weight
        self.register_buffer("centers", hash_centers(n_classes, bits, seed))

    def forward(self, u: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        target = torch.where(y @ self.centers >= 0, 1.0, 0.0).to(u.dtype)
        p = ((u + 1) / 2).clamp(1e-6, 1 - 1e-6)
        center_loss = (F.binary_cross_entropy(p, target) if reduction == "mean" else
                       reduce(F.binary_cross_entropy(p, target, reduction="none"), reduction))
        return center_loss + self.quant_weight * reduce((u.abs() - 1).pow(2), reduction)


LOSSES = ("pairwise", "dpsh", "hashnet", "dch", "csq")


def build_loss(name: str, bits: int, n_classes: int, pairwise_norm: str = "bits",
               quant_weight: float | None = None) -> nn.Module:
    """The named hashing loss; `quant_weight` None keeps each loss's usual default."""
    q = {} if quant_weight is None else {"quant_weight": quant_weight}
    if name == "pairwise":
        return PairwiseLoss(bits, norm=pairwise_norm, **q)
    if name == "dpsh":
        return DPSHLoss(bits, **q)
    if name == "hashnet":
        return HashNetLoss(bits)
    if name == "dch":
        return DCHLoss(bits, **q)
    if name == "csq":
        return CSQLoss(bits, n_classes, **q)
    raise UserError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
