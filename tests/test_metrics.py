"""MAP@R against hand-computed cases and a per-query NumPy reference."""
import math

import numpy as np
import pytest
import torch

import retrieval.metrics as metrics
from retrieval import hamming_distance, hamming_rank, mean_average_precision

A, B, C = [1, 0, 0], [0, 1, 0], [0, 0, 1]
# database for the query q = (1, 1, 1, 1); distances 0, 4, 1, 2, 1
DB_CODES = torch.tensor([[1, 1, 1, 1], [-1, -1, -1, -1], [1, 1, 1, -1], [1, 1, -1, -1], [1, 1, 1, -1]])
DB_LABELS = torch.tensor([A, A, B, A, A])
Q = torch.tensor([[1, 1, 1, 1]])


def test_hamming_distance_from_inner_products():
    assert hamming_distance(Q, DB_CODES).tolist() == [[0, 4, 1, 2, 1]]


def test_ranking_breaks_ties_by_database_index():
    # d2 and d4 are both at distance 1: the lower index comes first
    assert hamming_rank(Q, DB_CODES, 5).tolist() == [[0, 2, 4, 3, 1]]


def test_single_label_ap_by_hand():
    # ranking 0,2,4,3,1 -> relevance 1,0,1,1,1 -> AP = (1 + 2/3 + 3/4 + 4/5) / 4
    r = mean_average_precision(Q, torch.tensor([A]), DB_CODES, DB_LABELS, topk=5)
    assert r["map"] == pytest.approx((1 + 2 / 3 + 3 / 4 + 4 / 5) / 4, abs=1e-12)
    # top 3: relevance 1,0,1 -> (1 + 2/3) / 2; with the other tie order it would be 1.0
    r3 = mean_average_precision(Q, torch.tensor([A]), DB_CODES, DB_LABELS, topk=3)
    assert r3["map"] == pytest.approx(5 / 6, abs=1e-12)


def test_multi_label_relevance_is_any_shared_label():
    labels = torch.tensor([[1, 1, 0], [0, 1, 0]])  # A+B: everything relevant; B: only rank 2
    r = mean_average_precision(Q.repeat(2, 1), labels, DB_CODES, DB_LABELS, topk=5)
    assert r["map"] == pytest.approx((1.0 + 0.5) / 2, abs=1e-12)
    multi_db = torch.tensor([[1, 0, 1], A, B, [0, 1, 1], A])  # query C: relevant at ranks 1 and 4
    r = mean_average_precision(Q, torch.tensor([C]), DB_CODES, multi_db, topk=5)
    assert r["map"] == pytest.approx((1 + 2 / 4) / 2, abs=1e-12)


def test_both_conventions_for_queries_without_relevant_items():
    queries = torch.tensor([[1, 1, 1, 1], [-1, -1, -1, -1]])
    labels = torch.tensor([A, C])  # nothing in the database carries C
    ap_a = (1 + 2 / 3 + 3 / 4 + 4 / 5) / 4
    r = mean_average_precision(queries, labels, DB_CODES, DB_LABELS, topk=5)
    assert r["map_empty_zero"] == pytest.approx(ap_a / 2, abs=1e-12)
    assert r["map_empty_skipped"] == pytest.approx(ap_a, abs=1e-12)
    assert r["n_queries_empty"] == 1 and r["map"] == r["map_empty_zero"]
    r = mean_average_precision(queries, labels, DB_CODES, DB_LABELS, topk=5, convention="empty-skipped")
    assert r["map"] == r["map_empty_skipped"]
    only_empty = mean_average_precision(queries[1:], labels[1:], DB_CODES, DB_LABELS, topk=5)
    assert only_empty["map_empty_zero"] == 0.0 and only_empty["map_empty_skipped"] is None


def test_topk_larger_than_database_uses_the_whole_database():
    r_big = mean_average_precision(Q, torch.tensor([A]), DB_CODES, DB_LABELS, topk=1000)
    r_all = mean_average_precision(Q, torch.tensor([A]), DB_CODES, DB_LABELS, topk=5)
    assert r_big["map"] == r_all["map"] and r_big["topk"] == 1000


def reference_map(qc, ql, dc, dl, topk):
    """Per-query NumPy form: full stable argsort of Hamming distances, AP over the top R, empty queries as 0."""
    qc, ql, dc, dl = (t.numpy().astype(np.float64) for t in (qc, ql, dc, dl))
    aps = []
    for i in range(len(qc)):
        dist = (qc.shape[1] - dc @ qc[i]) / 2
        order = np.argsort(dist, kind="stable")[:topk]
        rel = (dl[order] @ ql[i] > 0).astype(np.float64)
        n = rel.sum()
        aps.append(0.0 if n == 0 else float(np.mean(np.arange(1, n + 1) / (np.flatnonzero(rel) + 1))))
    return float(np.mean(aps))


@pytest.mark.parametrize("bits,n_db,topk,multi", [(16, 700, 100, False), (48, 1500, 1000, False),
                                                  (8, 300, 50, True), (64, 2000, 2500, False)])
def test_matches_per_query_reference_on_random_codes(monkeypatch, bits, n_db, topk, multi):
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 5000)  # several chunks of queries
    g = torch.Generator().manual_seed(bits + n_db)
    n_classes = 6
    centres = torch.randint(0, 2, (n_classes, bits), generator=g) * 2 - 1

    def sample(n):
        y = torch.randint(0, n_classes, (n,), generator=g)
        flips = torch.rand(n, bits, generator=g) < 0.3
        codes = torch.where(flips, -centres[y], centres[y])
        labels = torch.nn.functional.one_hot(y, n_classes)
        if multi:
            labels = (labels + (torch.rand(n, n_classes, generator=g) < 0.2)).clamp(max=1)
        return codes, labels

    qc, ql = sample(120)
    dc, dl = sample(n_db)
    ours = mean_average_precision(qc, ql, dc, dl, topk)["map_empty_zero"]
    assert math.isclose(ours, reference_map(qc, ql, dc, dl, topk), rel_tol=0, abs_tol=1e-12)


def test_input_errors():
    with pytest.raises(ValueError, match="bits"):
        mean_average_precision(Q, torch.tensor([A]), DB_CODES[:, :3], DB_LABELS)
    with pytest.raises(ValueError, match="convention"):
        mean_average_precision(Q, torch.tensor([A]), DB_CODES, DB_LABELS, convention="mean")


def test_targeted_map_by_hand():
    # two triggered queries, target class B (index 1); relevance = the item carries B, whatever the query's own label
    triggered = torch.tensor([[1, 1, 1, -1], [-1, -1, 1, 1]])
    # query 1: distances 1,3,0,1,0 -> ranking 2,4,0,3,1 -> relevance 1,0,0,0,0 -> AP 1
    # query 2: distances 2,2,3,4,3 -> ranking 0,1,2,4,3 -> relevance 0,0,1,0,0 -> AP 1/3
    r = metrics.targeted_map(triggered, 1, DB_CODES, DB_LABELS, topk=5)
    assert r["map"] == pytest.approx((1 + 1 / 3) / 2, abs=1e-12) and r["n_queries"] == 2
    # R = 2: query 2 has no target item in its top 2 (AP 0, or left out)
    r2 = metrics.targeted_map(triggered, 1, DB_CODES, DB_LABELS, topk=2)
    assert r2["map_empty_zero"] == pytest.approx(0.5) and r2["map_empty_skipped"] == pytest.approx(1.0)
    assert r2["n_queries_empty"] == 1
    with pytest.raises(ValueError, match="target 3 is not one of the 3 classes"):
        metrics.targeted_map(triggered, 3, DB_CODES, DB_LABELS)


def test_non_target_queries_leave_out_every_query_that_carries_the_target():
    labels = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.uint8)
    assert metrics.non_target_queries(labels, 1).tolist() == [0, 3]
    assert metrics.non_target_queries(labels, 0).tolist() == [1, 3]
