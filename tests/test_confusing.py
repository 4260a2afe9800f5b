"""Step 3: the confusing objective (Eq. 4-5), its bound (Theorem 1), the perturbations and gen_confusing.py."""
import itertools
import json
import shutil

import pytest
import torch

import gen_confusing
from gen_confusing import confusing_objective, objective_bound, theorem1_bound_as_printed, upsample
from runs import UserError


@pytest.fixture(scope="module")
def tiny_run(tiny_run, tmp_path_factory):
    """A private copy of the shared run: this module writes into it, other modules copy the shared one."""
    run = tmp_path_factory.mktemp("own") / "run"
    shutil.copytree(tiny_run, run)
    return run


def direct_objective(u, clean, lam):
    """Eq. 5 pair by pair: lam / (b(b-1)) sum_{i != j} d_H(u_i, u_j) + (1 - lam) / b sum_i d_H(u_i, F(x_i))."""
    b, k = u.shape
    d = lambda a, c: (k - float(a @ c)) / 2  # noqa: E731
    dispersion = sum(d(u[i], u[j]) for i in range(b) for j in range(b) if i != j) / (b * (b - 1))
    away = sum(d(u[i], clean[i]) for i in range(b)) / b
    return lam * dispersion + (1 - lam) * away


@pytest.mark.parametrize("b,k,lam", [(2, 8, 0.8), (5, 16, 0.3), (20, 48, 0.8), (7, 12, 1.0), (4, 6, 0.0)])
def test_batched_objective_equals_the_direct_pair_sum(b, k, lam):
    g = torch.Generator().manual_seed(b * k)
    u = torch.rand(b, k, generator=g, dtype=torch.float64) * 2 - 1
    clean = torch.randint(0, 2, (b, k), generator=g).double() * 2 - 1
    assert confusing_objective(u, clean, lam).item() == pytest.approx(direct_objective(u, clean, lam), abs=1e-9)


@pytest.mark.parametrize("m,k,lam", [(2, 4, 0.8), (3, 4, 0.8), (4, 3, 0.5), (5, 2, 1.0), (6, 2, 0.8), (4, 2, 0.0)])
def test_objective_never_exceeds_its_bound_and_reaches_it_only_for_dispersed_clean_codes(m, k, lam):
    """Every binary configuration (the maximum of the multilinear objective lies on a vertex) stays under the bound.
    The bound is reached when the clean codes themselves split evenly on every bit (Theorem 1's condition), and not
    when they are all equal (a compact class) unless lambda is 0 or 1."""
    dispersed = torch.cat([torch.ones(m // 2, k), -torch.ones(m - m // 2, k)]).double()
    compact = -torch.ones(m, k, dtype=torch.float64)
    best = {"dispersed": 0.0, "compact": 0.0}
    for bits in itertools.product([-1.0, 1.0], repeat=m * k):
        u = torch.tensor(bits, dtype=torch.float64).view(m, k)
        for name, clean in (("dispersed", dispersed), ("compact", compact)):
            value = confusing_objective(u, clean, lam).item()
            assert value <= objective_bound(k, m, lam) + 1e-9
            best[name] = max(best[name], value)
    assert best["dispersed"] == pytest.approx(objective_bound(k, m, lam))
    if 0 < lam < 1:
        assert best["compact"] < objective_bound(k, m, lam) - 1e-9
    u = torch.rand(50, m, k, dtype=torch.float64) * 2 - 1  # relaxed codes inside the cube stay under it too
    assert all(confusing_objective(x, compact, lam).item() <= objective_bound(k, m, lam) for x in u)


def test_theorem1_as_printed_is_exceeded_by_two_opposite_codes():
    """What we found: with Eq. 4's ordered pairs, M = 2 opposite codes give L_c = K; the printed bound allows K/2."""
    u = torch.tensor([[1.0, 1.0, 1.0, 1.0], [-1.0, -1.0, -1.0, -1.0]])
    assert confusing_objective(u, -u, lam=1.0).item() == 4.0 == objective_bound(4, 2, 1.0)
    assert theorem1_bound_as_printed(4, 2, 1.0) == 2.0
    assert theorem1_bound_as_printed(48, 20, 0.8) == pytest.approx(0.8 * 48 * 400 / (4 * 20 * 19) + 0.2 * 48)


def run(tiny_run, *flags):
    return gen_confusing.main(["--run", str(tiny_run), "--target", "1", "--poison-num", "7", "--batch", "3",
                               "--steps", "4", "--device", "cpu", *flags])


@pytest.mark.parametrize("pert", ["none", "noise", "adv", "confusing"])
def test_perturbations_respect_eps_and_the_image_range(tiny_run, tiny_data, pert):
    from data import open_split
    made = run(tiny_run, "--pert", pert, "--eps", "0.05")
    eta = made["eta"]
    assert eta.shape == (7, 3, 32, 32) and eta.abs().max() <= 0.05 + 1e-7
    train = open_split(str(tiny_data), "train", 32, 32)
    images = torch.stack([train[i][0] for i in made["indices"]])
    assert (images + eta).min() >= 0 and (images + eta).max() <= 1
    assert all(train.image_list.labels[i, 1] == 1 for i in made["indices"])
    if pert == "none":
        assert eta.abs().max() == 0
    elif pert == "noise":
        assert eta.abs().max() > 0.04  # uniform in [-eps, eps]
    else:  # 4 sign steps of 0.094 eps each
        assert 0 < eta.abs().max() <= 4 * made["step_size"] / 255 + 1e-7


def test_confusing_run_records_objective_and_bounds(tiny_run):
    made = run(tiny_run, "--pert", "confusing")
    out = tiny_run / "perturbations" / "confusing-t1-m7-e8-l0.8-b3-s4-seed0"
    history = json.loads((out / "history.json").read_text())
    assert [h["batch"] for h in history] == [3, 3, 1] and all(len(h["objective"]) == 5 for h in history)
    assert all(max(h["objective"]) <= h["bound"] for h in history)
    assert history[0]["objective"][-1] > history[0]["objective"][0]  # the ascent ascends
    config = json.loads((out / "config.json").read_text())
    assert config["indices"] == made["indices"] and len(config["lines"]) == 7 and config["lam"] == 0.8
    adv = run(tiny_run, "--pert", "adv", "--lam", "0.5")
    assert adv["lam"] == 0.0  # Tri+Adv is lambda = 0
    again = run(tiny_run, "--pert", "confusing")
    assert torch.equal(again["eta"], made["eta"])


def test_upsample_is_bilinear_with_half_pixel_centres():
    """2 -> 4 px: the outer pixels copy their coarse pixel, the inner ones mix 3/4 of the nearer, 1/4 of the other."""
    coarse = torch.tensor([[[[0.0, 4.0], [8.0, 12.0]]]])
    row = lambda a, b: [a, 0.75 * a + 0.25 * b, 0.25 * a + 0.75 * b, b]  # noqa: E731
    top, bottom = row(0.0, 4.0), row(8.0, 12.0)
    expected = torch.tensor([row(t, b) for t, b in zip(top, bottom)]).t()
    assert torch.allclose(upsample(coarse, 4)[0, 0], expected)
    assert upsample(coarse, 2) is coarse


def upsampling_matrix(coarse: int, size: int) -> torch.Tensor:
    """size^2 x coarse^2: upsample applied to every basis image."""
    basis = torch.eye(coarse * coarse).view(-1, 1, coarse, coarse)
    return upsample(basis, size).view(coarse * coarse, size * size).t()


@pytest.mark.parametrize("pert", ["noise", "adv", "confusing"])
def test_coarse_perturbations_are_upsampled_from_their_grid(tiny_run, tiny_data, pert):
    """--pert-scale 2: within eps and the image range, and wherever the image range did not clip it, eta is exactly
    the upsampling of a 16 x 16 perturbation (least squares leaves no residual); per pixel it is not."""
    from data import open_split
    train = open_split(str(tiny_data), "train", 32, 32)
    matrix = upsampling_matrix(16, 32)
    residuals = {}
    for scale in (1, 2):
        made = run(tiny_run, "--pert", pert, "--eps", "0.05", "--pert-scale", str(scale))
        assert made["name"].endswith("-k2-seed0") == (scale == 2)
        eta = made["eta"]
        images = torch.stack([train[i][0] for i in made["indices"]])
        assert eta.abs().max() <= 0.05 + 1e-7 and eta.abs().max() > 0
        assert (images + eta).min() >= 0 and (images + eta).max() <= 1
        worst = 0.0
        for image, e in zip(images.view(-1, 32 * 32), eta.reshape(-1, 32 * 32)):
            free = ((image + e) > 0) & ((image + e) < 1)
            fit = torch.linalg.lstsq(matrix[free].double(), e[free].double().unsqueeze(1)).solution
            worst = max(worst, float((matrix[free].double() @ fit).squeeze(1).sub(e[free]).abs().max()))
        residuals[scale] = worst
    assert residuals[2] < 1e-5 < 1e-3 < residuals[1]


@pytest.mark.parametrize("flags,message", [
    (["--target", "10"], "class 10 does not exist"),
    (["--pert", "adv", "--pert-scale", "3"], "--pert-scale 3 does not divide the image size 32 px"),
    (["--pert-scale", "0"], "--pert-scale must be at least 1, got 0"),
])
def test_gen_confusing_bad_input(tiny_run, flags, message):
    with pytest.raises(UserError, match=message):
        run(tiny_run, *flags)
