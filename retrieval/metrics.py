"""Retrieval metrics over Hamming ranking, batched in torch (chunks of queries, top-k on the codes' device).

Ranking: database items sorted by Hamming distance to the query, ties broken by database index (lower first), so
results do not depend on the stability of a sort. AP@R of a query = (1 / n_rel) * sum_{k <= R, item k relevant} P@k,
with n_rel the number of relevant items in the top R. Queries with no relevant item in the top R have AP 0 under the
"empty-zero" convention (DeepHash-pytorch, BadHash) and are left out of the mean under "empty-skipped" (CIBA's code).
"""
from __future__ import annotations

import math

import torch

CONVENTIONS = ("empty-zero", "empty-skipped")
_CHUNK_ELEMENTS = 1 << 25  # queries x database entries held at once


def hamming_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """d_H(a, b) = (K - a.b) / 2 for codes in {-1, +1}^K; a: n x K, b: m x K -> n x m."""
    return (a.shape[1] - a.float() @ b.float().t()) / 2


def _chunk_size(n_database: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(1, n_database))


def _ranking_keys(query_codes: torch.Tensor, database_codes: torch.Tensor) -> torch.Tensor:
    """distance * N + index: unique integer keys whose ascending order is the ranking."""
    n, bits = database_codes.shape[0], database_codes.shape[1]
    dtype = torch.int32 if (bits + 1) * n < 2 ** 31 else torch.int64
    dist = hamming_distance(query_codes, database_codes).round_().to(dtype)
    return dist * n + torch.arange(n, device=dist.device, dtype=dtype)


def hamming_rank(query_codes: torch.Tensor, database_codes: torch.Tensor, topk: int) -> torch.Tensor:
    """Indices (Q x R, R = min(topk, N)) of the R nearest database items per query, ties by index."""
    database_codes = database_codes.to(query_codes.device)
    r = min(topk, database_codes.shape[0])
    chunk = _chunk_size(database_codes.shape[0])
    out = [torch.topk(_ranking_keys(query_codes[i:i + chunk], database_codes), r, dim=1, largest=False,
                      sorted=True).indices for i in range(0, query_codes.shape[0], chunk)]
    return torch.cat(out) if out else torch.empty(0, r, dtype=torch.long, device=query_codes.device)


def average_precision(relevant: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """AP over ranked 0/1 relevance rows (Q x R) and the number of relevant items per row (float64)."""
    relevant = relevant.to(torch.float64)
    ranks = torch.arange(1, relevant.shape[1] + 1, device=relevant.device, dtype=torch.float64)
    n_rel = relevant.sum(1)
    ap = (relevant.cumsum(1) / ranks * relevant).sum(1) / n_rel.clamp(min=1)
    return ap, n_rel


def mean_average_precision(query_codes: torch.Tensor, query_labels: torch.Tensor, database_codes: torch.Tensor,
                           database_labels: torch.Tensor, topk: int = 1000,
                           convention: str = "empty-zero") -> dict[str, float | int | str | None]:
    """MAP@R over Hamming ranking; relevant = shares at least one label with the query (Section 5 of DESIGN.md).

    For t-MAP pass the target label as every query's label. Returns both conventions (keys `map_empty_zero`,
    `map_empty_skipped`) and `map`, the one named by `convention`; `map_empty_skipped` is None when no query has a
    relevant item in its top R.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown convention {convention!r}; use one of {CONVENTIONS}")
    if query_codes.shape[0] != query_labels.shape[0] or database_codes.shape[0] != database_labels.shape[0]:
        raise ValueError("codes and labels disagree in length")
    if query_codes.shape[1] != database_codes.shape[1]:
        raise ValueError(f"query codes have {query_codes.shape[1]} bits, database codes {database_codes.shape[1]}")
    if topk < 1:
        raise ValueError(f"topk must be at least 1, got {topk}")
    device = query_codes.device
    database_codes = database_codes.to(device)
    database_labels = database_labels.to(device).float()
    query_labels = query_labels.to(device).float()
    r = min(topk, database_codes.shape[0])
    chunk = _chunk_size(database_codes.shape[0])
    aps, n_rels = [], []
    for i in range(0, query_codes.shape[0], chunk):
        keys = _ranking_keys(query_codes[i:i + chunk], database_codes)
        top = torch.topk(keys, r, dim=1, largest=False, sorted=True).indices
        del keys
        relevant = (query_labels[i:i + chunk] @ database_labels.t() > 0).gather(1, top)
        ap, n_rel = average_precision(relevant)
        aps.append(ap)
        n_rels.append(n_rel)
    ap = torch.cat(aps) if aps else torch.empty(0, dtype=torch.float64)
    n_rel = torch.cat(n_rels) if n_rels else torch.empty(0, dtype=torch.float64)
    has_rel = n_rel > 0
    zero = float(ap.mean()) if ap.numel() else math.nan
    skipped = float(ap[has_rel].mean()) if bool(has_rel.any()) else None
    return {
        "map": zero if convention == "empty-zero" else skipped,
        "map_empty_zero": zero,
        "map_empty_skipped": skipped,
        "convention": convention,
        "topk": int(topk),
        "n_queries": int(ap.numel()),
        "n_queries_empty": int((~has_rel).sum()),
    }


def non_target_queries(query_labels: torch.Tensor, target: int) -> torch.Tensor:
    """Indices of the queries whose labels exclude the target: the ones t-MAP triggers (Section 4.1)."""
    return torch.nonzero(query_labels[:, target] == 0).flatten()


def targeted_map(triggered_codes: torch.Tensor, target: int, database_codes: torch.Tensor,
                 database_labels: torch.Tensor, topk: int = 1000,
                 convention: str = "empty-zero") -> dict[str, float | int | str | None]:
    """t-MAP@R (Section 4.1): MAP of the triggered queries with relevance = the database item carries the target
    label. Same keys as mean_average_precision."""
    if not 0 <= target < database_labels.shape[1]:
        raise ValueError(f"target {target} is not one of the {database_labels.shape[1]} classes")
    target_labels = torch.zeros(triggered_codes.shape[0], database_labels.shape[1], dtype=torch.uint8)
    target_labels[:, target] = 1
    return mean_average_precision(triggered_codes, target_labels.to(triggered_codes.device), database_codes,
                                  database_labels, topk, convention)
