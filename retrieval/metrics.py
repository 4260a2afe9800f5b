"""Retrieval metrics over Hamming ranking, batched in torch (chunks of queries, top-k on the codes' device).

Ranking: database items sorted by Hamming distance to the query, ties broken by a fixed scrambled order of the
database indices (TIE_BREAK: index i ranks by (i * 2654435761) mod 2^32, Knuth's multiplicative hash), so results do
not depend on the stability of a sort and are the same on every machine. Not by the plain index: lists written class
by class (ours, and most public ones) then put the lower-numbered classes first among equal distances, and the codes
of a hashing model tie massively (CIFAR-10, 48 bits: MAP@1000 0.509 by plain index, 0.656 by the scrambled one, the
clean model's t-MAP of target 2 25.8 % against 7.9 %). The scrambled order spreads each contiguous block of the list
evenly over the tie order. AP@R of a query = (1 / n_rel) * sum_{k <= R, item k relevant} P@k,
with n_rel the number of relevant items in the top R. Queries with no relevant item in the top R have AP 0 under the
"empty-zero" convention (DeepHash-pytorch, BadHash) and are left out of the mean under "empty-skipped" (CIBA's code).
"""
from __future__ import annotations

import math
from typing import Iterator

import torch

CONVENTIONS = ("empty-zero", "empty-skipped")
_BLOCK_ELEMENTS = 1 << 23  # queries x database entries compared at once (16 MiB of bfloat16: cache-sized on a CPU)
_DATABASE_BLOCK = 1 << 15  # database entries per block
_CANDIDATES = 1 << 24  # most (query, item) candidates held at once; more (mass ties) splits the queries
_EXACT_BF16_BITS = 127  # codes of up to 127 bits: every value _candidates forms, |t - 1 - a.b| <= 2K + 1, is an
# integer of magnitude <= 255, exact in bfloat16 (whose integers are exact up to 256)
_OVERSAMPLE = 2  # the candidate threshold aims at the (2R)-th nearest item of a strided sample of the database
_LABEL_BITS = 52  # labels per packed word (float64's exact integers)
_LABEL_CHUNK = 1 << 20  # labels converted to float64 at once by label_bits (8 MiB)
TIE_BREAK = "scrambled-index"  # recorded with every result: results ranked otherwise are not reused
TIE_MULTIPLIER = 2654435761  # odd, close to 2^32 / golden ratio: i -> i * M mod 2^32 is a bijection on 32 bits


def hamming_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """d_H(a, b) = (K - a.b) / 2 for codes in {-1, +1}^K; a: n x K, b: m x K -> n x m."""
    return (a.shape[1] - a.float() @ b.float().t()) / 2


def _matmul_codes(codes: torch.Tensor) -> torch.Tensor:
    """+-1 codes in the dtype whose matmuls give their inner products, and _candidates' shifted ones, exactly and
    fast: bfloat16 (half the memory traffic of float32) up to _EXACT_BF16_BITS bits, float32 above."""
    return codes.to(torch.bfloat16 if codes.shape[1] <= _EXACT_BF16_BITS else torch.float32)


def _query_chunk(n_database: int) -> int:
    return max(1, _BLOCK_ELEMENTS // min(max(1, n_database), _DATABASE_BLOCK))


def _nearest(queries: torch.Tensor, database: torch.Tensor, r: int) -> torch.Tensor:
    """Indices (Q x r) of the r nearest database items per query in Hamming distance, ties by index (lower first).

    queries: codes from _matmul_codes; database: the same with a column of ones appended (_with_ones). Exact without
    sorting the database: a threshold t on the inner product from a strided sample of the database keeps the
    candidates a.b >= t, a superset of the top r whenever at least r items pass (checked; rows where fewer pass take
    the exact r-th largest value instead). Only candidates are sorted, stably by (query, distance); they are gathered
    block by block in index order, so equal distances keep the lower index first.
    """
    n, bits = database.shape[0], database.shape[1] - 1
    codes = database[:, :bits]
    stride = max(1, n // (_OVERSAMPLE * 4 * r))
    sample = queries @ codes[::stride].t()
    k = min(sample.shape[1], -(-_OVERSAMPLE * r // stride))
    threshold = torch.topk(sample, k, dim=1, sorted=False).values.amin(1, keepdim=True)
    if len(queries) > 1 and int((sample >= threshold).sum()) * stride > _CANDIDATES:  # mass ties: fewer queries
        half = len(queries) // 2
        return torch.cat([_nearest(queries[:half], database, r), _nearest(queries[half:], database, r)])
    rows, cols, shifted = _candidates(queries, database, threshold)
    passing = torch.bincount(rows, minlength=len(queries))
    short = torch.nonzero(passing < r).flatten()
    if short.numel():  # the sample put the threshold above the r-th value: those rows again, at that value exactly
        exact = torch.topk(queries[short] @ codes.t(), r, dim=1, sorted=False).values.amin(1, keepdim=True)
        again = _candidates(queries[short], database, exact)
        kept = passing.take(rows) >= r
        rows, cols, shifted = (torch.cat(pair) for pair in zip((rows[kept], cols[kept], shifted[kept]),
                                                               (short.take(again[0]), *again[1:])))
        passing[short] = torch.bincount(again[0], minlength=len(short))
    # within a row, (t - 1) - a.b in [-(2K + 1), -1] grows with the distance: the sort key is (row, that value)
    span = 2 * bits + 1
    key_type = torch.int32 if len(queries) * span < 1 << 31 else torch.int64
    key = rows.to(key_type) * span + (shifted.to(key_type) + span)
    order = torch.sort(key, stable=True).indices
    starts = torch.cumsum(passing, 0) - passing
    first_r = starts[:, None] + torch.arange(r, device=starts.device)  # every row has at least r candidates
    return cols.take(order.take(first_r))


def _with_ones(codes: torch.Tensor) -> torch.Tensor:
    """N x (K + 1): the codes and a column of ones, so that one product [-a, t - 1] . [b, 1] forms (t - 1) - a.b."""
    return torch.cat([codes, codes.new_ones(len(codes), 1)], 1)


def _candidates(queries: torch.Tensor, database: torch.Tensor,
                threshold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(query row, database index, (t - 1) - a.b) of every pair with a.b >= the row's threshold t, in block order.

    database: from _with_ones. One matrix product per block forms (t - 1) - a.b, negative exactly for the
    candidates, so the test is the sign bit (on the CPU about half the time of comparing bfloat16 values). Exact for
    codes from _matmul_codes: every partial sum is an integer of magnitude <= 2K + 1, and a zero is +0, never -0
    (the K terms -a_i b_i are +-1, and a float sum that is exactly zero with a nonzero term is +0). The sign bits
    are searched 8 at a time (one int64 word of 8 bools), then within the few words that hold any: most hold none.
    """
    lhs = torch.cat([-queries, (threshold - 1).to(queries.dtype)], 1)
    width = min(_DATABASE_BLOCK, database.shape[0])
    padded = -(-len(queries) * width // 8) * 8
    # one output and one sign-bit buffer for every block: no fresh pages per block on a CPU
    products = torch.empty(len(queries) * width, dtype=queries.dtype, device=queries.device)
    signs = torch.empty(padded, dtype=torch.bool, device=queries.device)
    found = []
    for start in range(0, database.shape[0], _DATABASE_BLOCK):
        block = database[start:start + _DATABASE_BLOCK]
        size = len(queries) * len(block)
        shifted = torch.mm(lhs, block.t(), out=products[:size].view(len(queries), len(block)))
        end = -(-size // 8) * 8
        torch.signbit(products[:size], out=signs[:size])
        signs[size:end] = False  # a shorter last block: the tail of its last word held the previous block's bits
        words = torch.nonzero(signs[:end].view(torch.int64)).squeeze(1)
        bit = torch.nonzero(signs[:end].view(-1, 8).index_select(0, words).view(-1)).squeeze(1)
        flat = words.take(bit >> 3) * 8 + (bit & 7)
        rows = flat // len(block)
        found.append((rows, flat - rows * len(block) + start, shifted.take(flat)))
    return tuple(torch.cat(parts) for parts in zip(*found))


def tie_order(n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The database indices 0..n-1 in the order that breaks distance ties (see TIE_BREAK): sorted by
    (index * TIE_MULTIPLIER) mod 2^32, all distinct for n <= 2^32."""
    if n > 1 << 32:
        raise ValueError(f"a database of {n} items is beyond the tie order's 2^32")
    keys = torch.arange(n, dtype=torch.int64, device=device) * TIE_MULTIPLIER % (1 << 32)
    return torch.argsort(keys)


def _ranked_chunks(query_codes: torch.Tensor, database_codes: torch.Tensor,
                   topk: int) -> Iterator[tuple[slice, torch.Tensor]]:
    """(queries of the chunk, their top-R indices) chunk by chunk, on the queries' device, R = min(topk, N).

    The database is ranked in tie order (_nearest keeps the lower position first among equal distances), and the
    positions are mapped back to database indices."""
    order = tie_order(database_codes.shape[0], query_codes.device)
    database = _with_ones(_matmul_codes(database_codes.to(query_codes.device)[order]))
    queries = _matmul_codes(query_codes)
    r = min(topk, database.shape[0])
    chunk = _query_chunk(database.shape[0])
    for start in range(0, queries.shape[0], chunk):
        rows = slice(start, start + chunk)
        yield rows, order.take(_nearest(queries[rows], database, r))


def hamming_rank(query_codes: torch.Tensor, database_codes: torch.Tensor, topk: int) -> torch.Tensor:
    """Indices (Q x R, R = min(topk, N)) of the R nearest database items per query, ties in tie order."""
    out = [top for _, top in _ranked_chunks(query_codes, database_codes, topk)]
    r = min(topk, database_codes.shape[0])
    return torch.cat(out) if out else torch.empty(0, r, dtype=torch.long, device=query_codes.device)


def label_bits(labels: torch.Tensor) -> torch.Tensor:
    """0/1 label rows (n x C) packed into n x ceil(C / 52) int64 words, so that two items share a label exactly
    when some word of theirs has a common bit. One float64 matmul with a block of powers of two per chunk of rows
    (a cache-sized float64 copy of the labels): every partial sum is an integer below 2^52, exact in float64."""
    c = labels.shape[1]
    column = torch.arange(c, device=labels.device)
    weights = torch.zeros(c, -(-c // _LABEL_BITS), dtype=torch.float64, device=labels.device)
    weights[column, column // _LABEL_BITS] = torch.pow(2.0, (column % _LABEL_BITS).double())
    rows = max(1, _LABEL_CHUNK // max(1, c))
    return torch.cat([((labels[start:start + rows] > 0).double() @ weights).to(torch.int64)
                      for start in range(0, len(labels), rows)] or [weights.new_empty(0, weights.shape[1]).long()])


def _label_words(query_labels: torch.Tensor, database_labels: torch.Tensor,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(query words Q x 1 x W, database words N x W) of label_bits on the device, shaped for _shares_label."""
    return label_bits(query_labels.to(device))[:, None], label_bits(database_labels.to(device))


def _shares_label(query_words: torch.Tensor, item_words: torch.Tensor) -> torch.Tensor:
    """Relevance: whether each item shares a label with its query (packed words, broadcast over the last axis)."""
    return (item_words & query_words).ne(0).any(-1)


def _items(words: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """The rows of `words` (N x W) at the indices `top` (Q x R) -> Q x R x W; index_select is several times faster
    on a CPU than indexing with a 2-D tensor."""
    return words.index_select(0, top.flatten()).view(*top.shape, words.shape[1])


def _check_retrieval(query_codes: torch.Tensor, query_labels: torch.Tensor, database_codes: torch.Tensor,
                     database_labels: torch.Tensor) -> None:
    if query_codes.shape[0] != query_labels.shape[0] or database_codes.shape[0] != database_labels.shape[0]:
        raise ValueError("codes and labels disagree in length")
    if query_codes.shape[1] != database_codes.shape[1]:
        raise ValueError(f"query codes have {query_codes.shape[1]} bits, database codes {database_codes.shape[1]}")
    if query_labels.shape[1] != database_labels.shape[1]:
        raise ValueError(f"query labels have {query_labels.shape[1]} classes, database labels "
                         f"{database_labels.shape[1]}")


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
    """MAP@R over Hamming ranking; relevant = shares at least one label with the query (docs/method.md, Evaluation).

    For t-MAP pass the target label as every query's label. Returns both conventions (keys `map_empty_zero`,
    `map_empty_skipped`) and `map`, the one named by `convention`; `map_empty_skipped` is None when no query has a
    relevant item in its top R.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown convention {convention!r}; use one of {CONVENTIONS}")
    _check_retrieval(query_codes, query_labels, database_codes, database_labels)
    if topk < 1:
        raise ValueError(f"topk must be at least 1, got {topk}")
    query_words, database_words = _label_words(query_labels, database_labels, query_codes.device)
    aps, n_rels = [], []
    for rows, top in _ranked_chunks(query_codes, database_codes, topk):
        ap, n_rel = average_precision(_shares_label(query_words[rows], _items(database_words, top)))
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
        "ties": TIE_BREAK,
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
    return mean_average_precision(triggered_codes, target_labels(len(triggered_codes), target, database_labels),
                                  database_codes, database_labels, topk, convention)


def target_labels(n: int, target: int, database_labels: torch.Tensor) -> torch.Tensor:
    """n one-hot label rows of the target class: as query labels, relevance becomes "carries the target label"
    (t-MAP, and the precision curves of triggered queries)."""
    if not 0 <= target < database_labels.shape[1]:
        raise ValueError(f"target {target} is not one of the {database_labels.shape[1]} classes")
    labels = torch.zeros(n, database_labels.shape[1], dtype=torch.uint8, device=database_labels.device)
    labels[:, target] = 1
    return labels


def precision_at_k(query_codes: torch.Tensor, query_labels: torch.Tensor, database_codes: torch.Tensor,
                   database_labels: torch.Tensor, ks: list[int]) -> torch.Tensor:
    """Mean precision over the queries of the top k items of the Hamming ranking (ties in tie order), for each k in
    `ks` (float64, on the queries' device); relevant = shares a label with the query. k is capped at the database
    size."""
    _check_retrieval(query_codes, query_labels, database_codes, database_labels)
    if not ks or min(ks) < 1:
        raise ValueError(f"every k must be at least 1, got {ks}")
    device = query_codes.device
    ks_capped = torch.tensor([min(k, database_codes.shape[0]) for k in ks], device=device)
    query_words, database_words = _label_words(query_labels, database_labels, device)
    total = torch.zeros(len(ks), dtype=torch.float64, device=device)
    for rows, top in _ranked_chunks(query_codes, database_codes, max(ks)):
        hits = _shares_label(query_words[rows], _items(database_words, top)).to(torch.float64).cumsum(1)
        total += (hits[:, ks_capped - 1] / ks_capped).sum(0)
    return total / max(1, query_codes.shape[0])


def precision_recall_by_radius(query_codes: torch.Tensor, query_labels: torch.Tensor, database_codes: torch.Tensor,
                               database_labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Precision and recall of Hamming-ball retrieval (every item within distance r of the query) for r = 0..K.

    precision[r]: mean over the queries that retrieve at least one item within r of (relevant retrieved) /
    (retrieved); recall[r]: mean over the queries with a relevant item in the database of (relevant retrieved) /
    (relevant); `queries_retrieving[r]`: how many queries retrieve something within r. float64 on the queries'
    device; exact (distances are integers), in chunks of queries against the whole database.
    """
    _check_retrieval(query_codes, query_labels, database_codes, database_labels)
    device = query_codes.device
    bits = query_codes.shape[1]
    database = _matmul_codes(database_codes.to(device))
    queries = _matmul_codes(query_codes)
    query_words, database_words = _label_words(query_labels, database_labels, device)
    retrieved = torch.zeros(len(queries), bits + 1, dtype=torch.float64, device=device)
    relevant = torch.zeros_like(retrieved)
    chunk = _query_chunk(database.shape[0])
    for start in range(0, len(queries), chunk):
        rows = slice(start, start + chunk)
        distance = ((bits - (queries[rows] @ database.t()).to(torch.int64)) // 2)
        is_relevant = _shares_label(query_words[rows], database_words).to(torch.float64)
        retrieved[rows].scatter_add_(1, distance, torch.ones_like(is_relevant))
        relevant[rows].scatter_add_(1, distance, is_relevant)
    retrieved, relevant = retrieved.cumsum(1), relevant.cumsum(1)
    some = retrieved > 0
    precision = torch.where(some, relevant / retrieved.clamp(min=1), 0).sum(0) / some.sum(0).clamp(min=1)
    n_relevant = relevant[:, -1:]
    has = n_relevant[:, 0] > 0
    recall = (relevant[has] / n_relevant[has]).sum(0) / max(1, int(has.sum()))
    return {"radius": torch.arange(bits + 1, device=device), "precision": precision, "recall": recall,
            "queries_retrieving": some.sum(0)}
