"""MAP@R against hand-computed cases and a per-query NumPy reference."""
import math

import numpy as np
import pytest
import torch

import retrieval.metrics as metrics
from bench.map_at_r import per_query_map
from retrieval import hamming_distance, hamming_rank, mean_average_precision

A, B, C = [1, 0, 0], [0, 1, 0], [0, 0, 1]
# database for the query q = (1, 1, 1, 1); distances 0, 4, 1, 2, 1
DB_CODES = torch.tensor([[1, 1, 1, 1], [-1, -1, -1, -1], [1, 1, 1, -1], [1, 1, -1, -1], [1, 1, 1, -1]])
DB_LABELS = torch.tensor([A, A, B, A, A])
Q = torch.tensor([[1, 1, 1, 1]])


def test_hamming_distance_from_inner_products():
    assert hamming_distance(Q, DB_CODES).tolist() == [[0, 4, 1, 2, 1]]


def test_ranking_breaks_ties_in_the_scrambled_index_order():
    # d2 and d4 are both at distance 1; keys 2 * 2654435761 mod 2^32 = 1013904226 < 4 * ... mod 2^32 = 2027808452
    assert metrics.tie_order(5).tolist() == [0, 2, 4, 1, 3]  # keys 0, 2654435761, 1013904226, 3668339987, 2027808452
    assert hamming_rank(Q, DB_CODES, 5).tolist() == [[0, 2, 4, 3, 1]]
    assert hamming_rank(Q, DB_CODES[[0, 4, 2, 3, 1]], 5).tolist() == [[0, 2, 1, 3, 4]]  # d4 now at 1, before d2 at 2


def test_a_list_sorted_by_class_does_not_favour_the_first_classes():
    """Equal codes everywhere: the plain index would fill the top with the first class; here the classes share it."""
    database = torch.ones(1000, 8)
    labels = torch.nn.functional.one_hot(torch.arange(1000) // 250, 4)  # four classes in contiguous blocks
    top = hamming_rank(torch.ones(1, 8), database, 100)[0]
    assert all(23 <= n <= 27 for n in torch.bincount(top // 250, minlength=4).tolist())  # (plain index: 100, 0, 0, 0)
    p = metrics.precision_at_k(torch.ones(4, 8), torch.eye(4, dtype=torch.long), database, labels, [100])
    assert p.item() == pytest.approx(0.25)


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


def reference(qc, ql, dc, dl, topk):
    """The benchmark's per-query NumPy form: (MAP@R, top-R lists) from full stable argsorts."""
    return per_query_map(*(t.numpy().astype(np.float64) for t in (qc, dc, ql, dl)), topk)


def class_structured(bits, n, n_classes, g, multi=False, flip=0.3):
    centres = torch.randint(0, 2, (n_classes, bits), generator=g) * 2 - 1
    y = torch.randint(0, n_classes, (n,), generator=g)
    codes = torch.where(torch.rand(n, bits, generator=g) < flip, -centres[y], centres[y])
    labels = torch.nn.functional.one_hot(y, n_classes)
    if multi:
        labels = (labels + (torch.rand(n, n_classes, generator=g) < 0.2)).clamp(max=1)
    return codes, labels


@pytest.mark.parametrize("bits,n_db,topk,multi", [(16, 700, 100, False), (48, 1500, 1000, False),
                                                  (8, 300, 50, True), (64, 2000, 2500, False),
                                                  (300, 900, 40, True), (12, 6000, 30, False),
                                                  (127, 900, 60, False), (128, 900, 60, False),
                                                  (20, 333, 40, False)])
def test_matches_per_query_reference_on_random_codes(monkeypatch, bits, n_db, topk, multi):
    monkeypatch.setattr(metrics, "_BLOCK_ELEMENTS", 20000)  # several chunks of queries
    monkeypatch.setattr(metrics, "_DATABASE_BLOCK", 256)  # several database blocks per chunk
    g = torch.Generator().manual_seed(bits + n_db)
    codes, labels = class_structured(bits, 120 + n_db, 60 if multi else 6, g, multi)
    qc, ql, dc, dl = codes[:120], labels[:120], codes[120:], labels[120:]
    ours = mean_average_precision(qc, ql, dc, dl, topk)["map_empty_zero"]
    ref_map, ref_top = reference(qc, ql, dc, dl, topk)
    assert math.isclose(ours, ref_map, rel_tol=0, abs_tol=1e-12)
    assert np.array_equal(hamming_rank(qc, dc, topk).numpy(), ref_top)


def test_threshold_above_the_rth_value_falls_back_to_the_exact_one(monkeypatch):
    # the strided sample (every 12th item, 167 of them taken) holds the only exact matches: fewer than R pass
    asked, topk = [], torch.topk
    monkeypatch.setattr(torch, "topk", lambda x, k, *a, **kw: asked.append(k) or topk(x, k, *a, **kw))
    g = torch.Generator().manual_seed(0)
    database = torch.randint(0, 2, (100_000, 32), generator=g) * 2 - 1
    query = database[:1].clone()
    database[metrics.tie_order(100_000)[::12][:200]] = query  # every 12th item in tie order, as _nearest sees them
    stride = 100_000 // (metrics._OVERSAMPLE * 4 * 1000)
    assert stride == 12
    _, ref_top = reference(query, torch.ones(1, 1), database, torch.ones(100_000, 1), 1000)
    assert np.array_equal(hamming_rank(query, database, 1000).numpy(), ref_top)
    assert asked == [167, 1000]  # the sample's threshold, then the exact 1000th value


def test_rows_short_of_r_are_redone_alone_and_merge_in_order(monkeypatch):
    # query 0's exact matches sit on the sampled items only (too few pass its threshold); queries 1-3 are ordinary.
    # Several database blocks, so each row's candidates come from several blocks and must stay in index order.
    monkeypatch.setattr(metrics, "_DATABASE_BLOCK", 4096)
    calls = []
    original = metrics._candidates
    monkeypatch.setattr(metrics, "_candidates", lambda q, d, t: calls.append(len(q)) or original(q, d, t))
    g = torch.Generator().manual_seed(1)
    database = torch.randint(0, 2, (20_000, 24), generator=g) * 2 - 1
    queries = database[:4].clone()
    stride = 20_000 // (metrics._OVERSAMPLE * 4 * 300)
    database[metrics.tie_order(20_000)[::stride][:200]] = queries[0]  # > the 75 the sample ranks, < 300
    labels = torch.randint(0, 2, (20_000, 3), generator=g)
    query_labels = torch.eye(3, dtype=torch.long)[[0, 1, 2, 0]]
    ref_map, ref_top = reference(queries, query_labels, database, labels, 300)
    assert np.array_equal(hamming_rank(queries, database, 300).numpy(), ref_top)
    assert calls == [4, 1]  # all four, then query 0 alone at its exact 300th value
    ours = mean_average_precision(queries, query_labels, database, labels, 300)["map_empty_zero"]
    assert math.isclose(ours, ref_map, rel_tol=0, abs_tol=1e-12)


def test_mass_ties_split_the_queries_and_stay_exact(monkeypatch):
    monkeypatch.setattr(metrics, "_CANDIDATES", 500)
    calls = []
    original = metrics._candidates
    monkeypatch.setattr(metrics, "_candidates", lambda q, d, t: calls.append(len(q)) or original(q, d, t))
    database = torch.ones(400, 16)  # a collapsed model: every item ties with every other
    database[::7, 0] = -1
    queries = torch.ones(10, 16)
    _, ref_top = reference(queries, torch.ones(10, 1), database, torch.ones(400, 1), 50)
    assert np.array_equal(hamming_rank(queries, database, 50).numpy(), ref_top)
    assert max(calls) == 1  # every query alone: 400 candidates each


def test_label_bits_packs_more_labels_than_one_word(monkeypatch):
    monkeypatch.setattr(metrics, "_LABEL_CHUNK", 240)  # two rows at a time: four chunks
    labels = (torch.rand(7, 120, generator=torch.Generator().manual_seed(0)) < 0.3).to(torch.uint8)
    packed = metrics.label_bits(labels)
    expected = [[sum(1 << (j % 52) for j in range(120) if labels[i, j] and j // 52 == w) for w in range(3)]
                for i in range(7)]
    assert packed.tolist() == expected


def test_input_errors():
    with pytest.raises(ValueError, match="bits"):
        mean_average_precision(Q, torch.tensor([A]), DB_CODES[:, :3], DB_LABELS)
    with pytest.raises(ValueError, match="classes"):
        mean_average_precision(Q, torch.tensor([[1, 0]]), DB_CODES, DB_LABELS)
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


def test_precision_at_k_by_hand():
    # ranking 0,2,4,3,1 -> relevance 1,0,1,1,1; k = 10 is capped at the 5 database items
    p = metrics.precision_at_k(Q, torch.tensor([A]), DB_CODES, DB_LABELS, [1, 2, 3, 5, 10])
    assert p.tolist() == pytest.approx([1, 1 / 2, 2 / 3, 4 / 5, 4 / 5], abs=1e-12)
    # a second query (all -1, label B): ranking 1,3,2,4,0 -> relevance 0,0,1,0,0
    two = metrics.precision_at_k(torch.cat([Q, -Q]), torch.tensor([A, B]), DB_CODES, DB_LABELS, [1, 3])
    assert two.tolist() == pytest.approx([(1 + 0) / 2, (2 / 3 + 1 / 3) / 2], abs=1e-12)
    with pytest.raises(ValueError, match="every k must be at least 1"):
        metrics.precision_at_k(Q, torch.tensor([A]), DB_CODES, DB_LABELS, [0])


def test_precision_recall_by_radius_by_hand():
    # q1 = +1s, label A: distances 0,4,1,2,1, relevant d0 d1 d3 d4
    # q2 = -1s, label B: distances 4,0,3,2,3, relevant d2
    # q3, label C: distances 2,2,1,2,1, nothing relevant (left out of recall), nothing within radius 0
    queries = torch.cat([Q, -Q, torch.tensor([[1, -1, 1, -1]])])
    curve = metrics.precision_recall_by_radius(queries, torch.tensor([A, B, C]), DB_CODES, DB_LABELS)
    assert curve["radius"].tolist() == [0, 1, 2, 3, 4]
    assert curve["queries_retrieving"].tolist() == [2, 3, 3, 3, 3]
    assert curve["precision"].tolist() == pytest.approx([(1 + 0) / 2, (2 / 3 + 0 + 0) / 3, (3 / 4 + 0 + 0) / 3,
                                                         (3 / 4 + 1 / 4 + 0) / 3, (4 / 5 + 1 / 5 + 0) / 3], abs=1e-12)
    assert curve["recall"].tolist() == pytest.approx([(1 / 4 + 0) / 2, (2 / 4 + 0) / 2, (3 / 4 + 0) / 2,
                                                      (3 / 4 + 1) / 2, 1.0], abs=1e-12)


def test_precision_curves_agree_with_ranking_on_random_codes():
    """P@k from the ranking equals the precision of the Hamming ball whose size is exactly k (no ties cut)."""
    g = torch.Generator().manual_seed(3)
    queries = torch.randint(0, 2, (7, 12), generator=g) * 2 - 1
    database = torch.randint(0, 2, (60, 12), generator=g) * 2 - 1
    q_labels = torch.nn.functional.one_hot(torch.randint(0, 3, (7,), generator=g), 3)
    d_labels = torch.nn.functional.one_hot(torch.randint(0, 3, (60,), generator=g), 3)
    curve = metrics.precision_recall_by_radius(queries, q_labels, database, d_labels)
    distance = hamming_distance(queries, database)
    relevant = (q_labels.float() @ d_labels.float().t()) > 0
    for radius in range(13):
        inside = distance <= radius
        some = inside.any(1)
        per_query = (inside & relevant).sum(1) / inside.sum(1).clamp(min=1)
        assert curve["precision"][radius] == pytest.approx(float(per_query[some].sum() / max(1, int(some.sum()))))
        assert curve["recall"][radius] == pytest.approx(float(((inside & relevant).sum(1) / relevant.sum(1)).mean()))
    assert metrics.precision_at_k(queries, q_labels, database, d_labels, [60]).item() == pytest.approx(
        float(relevant.float().mean(1).mean()))


def test_tie_order_refuses_a_database_beyond_its_range():
    with pytest.raises(ValueError, match="beyond the tie order's 2"):
        metrics.tie_order((1 << 32) + 1)


def test_target_labels_rejects_a_class_that_does_not_exist():
    assert metrics.target_labels(2, 1, DB_LABELS).tolist() == [[0, 1, 0], [0, 1, 0]]
    with pytest.raises(ValueError, match="target 3 is not one of the 3 classes"):
        metrics.target_labels(2, 3, DB_LABELS)
