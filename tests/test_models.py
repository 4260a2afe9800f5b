"""Hashing losses (hand-computed values, each decreasing on a toy batch) and the networks."""
import math
import urllib.error

import pytest
import torch

from models import LOSSES, binarize, build_loss, build_model
from models.hash_network import fold_batch_norms, load_checkpoint, model_from_checkpoint, replace_adaptive_pools
from models.losses import hash_centers
from runs import UserError, atomic_save

ONE_CLASS = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
TWO_CLASSES = torch.tensor([[1.0, 0.0], [0.0, 1.0]])


def test_pairwise_loss_by_hand():
    u = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
    # same label: s = +1 everywhere; u.u^T / K = [[1, 0], [0, 1]] -> two off-diagonal errors of 1, mean 2/4
    assert build_loss("pairwise", 2, 2)(u, ONE_CLASS).item() == pytest.approx(0.5)
    # different labels: s = [[1,-1],[-1,1]]; the off-diagonal inner products 0 miss -1 by 1 as well
    assert build_loss("pairwise", 2, 2)(u, TWO_CLASSES).item() == pytest.approx(0.5)
    # opposite codes for different labels: u.u^T / K = [[1,-1],[-1,1]] = s -> 0
    opposite = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    assert build_loss("pairwise", 2, 2)(opposite, TWO_CLASSES).item() == pytest.approx(0.0)
    # the official code's normalisation divides by the batch size (2 here, same as K) and adds q * quantisation
    u_half = torch.tensor([[0.5, 0.5], [0.5, -0.5]])
    expected = ((0.25 - 1) ** 2 * 2 + (0 - 1) ** 2 * 2) / 4 + 0.1 * 0.25
    assert build_loss("pairwise", 2, 2, "batch", 0.1)(u_half, ONE_CLASS).item() == pytest.approx(expected)


def test_dpsh_loss_by_hand():
    u = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    sp = math.log1p(math.exp(0.5))
    # diagonal: theta 0.5, s 1; off-diagonal: theta 0, s 0; quantisation: two of four entries off by 1
    expected = (2 * (sp - 0.5) + 2 * math.log(2)) / 4 + 0.1 * 0.5
    assert build_loss("dpsh", 2, 2)(u, TWO_CLASSES).item() == pytest.approx(expected)


def test_hashnet_weights_balance_similar_and_dissimilar_pairs():
    u = torch.zeros(2, 4)
    # dot = 0 everywhere: every term is log 2 whatever s, and the weights average to 1
    assert build_loss("hashnet", 4, 2)(u, TWO_CLASSES).item() == pytest.approx(math.log(2))


def test_dch_prefers_close_similar_and_far_dissimilar_codes():
    loss = build_loss("dch", 4, 2)
    same, opposite = torch.tensor([[1.0, 1, 1, 1], [1, 1, 1, 1]]), torch.tensor([[1.0, 1, 1, 1], [-1, -1, -1, -1]])
    assert loss(same, ONE_CLASS) < loss(opposite, ONE_CLASS)
    assert loss(opposite, TWO_CLASSES) < loss(same, TWO_CLASSES)


def test_csq_centres():
    c = hash_centers(3, 4)  # Hadamard rows: pairwise distance K/2
    assert ((4 - c @ c.t()) / 2 + torch.eye(3) * 2).tolist() == [[2.0] * 3] * 3
    c48 = hash_centers(10, 48)
    assert torch.equal(c48, hash_centers(10, 48)) and c48.abs().eq(1).all()
    assert ((48 - c48 @ c48.t()) / 2 + torch.eye(10) * 48).min() >= 12
    loss = build_loss("csq", 4, 3)
    target = loss.centers[:2]
    assert loss(target * 0.999, torch.eye(3)[:2]) < loss(-target * 0.999, torch.eye(3)[:2])


def test_pairwise_per_image_terms_by_hand():
    # rows of the squared-error matrix of test_pairwise_loss_by_hand, same labels: [0, 1] and [1, 0], each mean 1/2;
    # a third image equal to the first: u.u^T / K rows [1, 0, 1], [0, 1, 0], [1, 0, 1] -> errors [0, 1, 0], [1, 0, 1],
    # [0, 1, 0], row means 1/3, 2/3, 1/3
    u = torch.tensor([[1.0, 1.0], [1.0, -1.0], [1.0, 1.0]])
    terms = build_loss("pairwise", 2, 2)(u, torch.tensor([[1.0, 0.0]] * 3), reduction="none")
    assert terms.tolist() == pytest.approx([1 / 3, 2 / 3, 1 / 3])
    # with quantisation: u = 0.5 everywhere in row 0 adds q * 0.25 to image 0 only
    u_half = torch.tensor([[0.5, 0.5], [1.0, -1.0]])
    terms = build_loss("pairwise", 2, 2, "bits", 0.1)(u_half, ONE_CLASS, reduction="none")
    # u.u^T / K = [[0.25, 0], [0, 1]]: row 0 errors 0.5625, 1 -> mean 0.78125 (+0.025); row 1 errors 1, 0 -> 0.5
    assert terms.tolist() == pytest.approx([0.78125 + 0.025, 0.5])


@pytest.mark.parametrize("name", LOSSES)
def test_per_image_terms_average_to_the_loss(name):
    torch.manual_seed(1)
    u = torch.tanh(torch.randn(12, 16))
    y = torch.nn.functional.one_hot(torch.arange(12) % 3, 4).float()
    y[0, 3] = 1
    loss_fn = build_loss(name, 16, 4)
    terms = loss_fn(u, y, reduction="none")
    assert terms.shape == (12,)
    assert terms.mean().item() == pytest.approx(loss_fn(u, y).item(), rel=1e-6)
    with pytest.raises(UserError, match="unknown loss reduction 'sum'; use one of mean, none"):
        loss_fn(u, y, reduction="sum")


@pytest.mark.parametrize("name", LOSSES)
def test_each_loss_decreases_on_a_toy_batch(name):
    torch.manual_seed(0)
    x = torch.randn(24, 10)
    y = torch.nn.functional.one_hot(torch.arange(24) % 4, 4).float()
    y[0, 1] = 1  # one multi-label image
    layer = torch.nn.Linear(10, 16)
    loss_fn = build_loss(name, 16, 4)
    opt = torch.optim.Adam(layer.parameters(), lr=0.05)
    first = loss_fn(torch.tanh(layer(x)), y).item()
    for _ in range(60):
        loss = loss_fn(torch.tanh(layer(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss_fn(torch.tanh(layer(x)), y).item() < 0.8 * first


def test_unknown_loss_and_architecture():
    with pytest.raises(UserError, match="unknown loss 'triplet'; choose one of pairwise"):
        build_loss("triplet", 16, 4)
    with pytest.raises(UserError, match="unknown architecture 'vgg99'; choose one of vgg11"):
        build_model("vgg99", 16)
    with pytest.raises(UserError, match="--bits 4 is out of range"):
        build_model("small", 4)


@pytest.mark.parametrize("arch,size", [("small", 32), ("resnet18", 64), ("vgg11", 32)])
def test_models_give_relaxed_and_binary_codes(arch, size):
    torch.manual_seed(0)
    model = build_model(arch, 48).eval()
    x = torch.rand(2, 3, size, size)
    u = model(x)
    assert u.shape == (2, 48) and u.abs().max() < 1
    codes = model.codes(x)
    assert set(codes.unique().tolist()) <= {-1.0, 1.0} and torch.equal(codes, binarize(u))
    features, head = model.param_groups()
    assert len(features) + len(head) == len(list(model.parameters()))
    assert any(p is model.hash_layer.weight for p in head)


@pytest.mark.parametrize("arch,size", [("small", 32), ("resnet18", 64), ("vgg11", 32)])
def test_channels_last_weights_compute_what_contiguous_ones_do(arch, size, tmp_path):
    torch.manual_seed(0)
    model = build_model(arch, 48).eval()
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    x = torch.rand(3, 3, size, size)
    reference = build_model(arch, 48).eval().to(memory_format=torch.contiguous_format)
    reference.load_state_dict(model.state_dict())
    assert torch.allclose(model.logits(x), reference.logits(x), atol=1e-4)
    x.requires_grad_(True)  # input gradients (Eq. 5 and 7) come back in the input's shape and values
    model.logits(x).sum().backward()
    grad, x.grad = x.grad, None
    reference.logits(x).sum().backward()
    assert grad.shape == x.shape and torch.allclose(grad, x.grad, atol=1e-4)
    atomic_save({"model": model.state_dict()}, tmp_path / "w.pt")  # a checkpoint loads into either layout
    reference.load_state_dict(torch.load(tmp_path / "w.pt")["model"])

@pytest.mark.parametrize("arch,size,deterministic", [("small", 32, False), ("small", 32, True),
                                                    ("resnet18", 64, False), ("vgg11", 32, False)])
def test_folded_batch_norms_compute_what_the_model_does(arch, size, deterministic):
    torch.manual_seed(0)
    model = build_model(arch, 48)
    if deterministic:  # --deterministic's pools branch on shapes: they stay whole in the traced graph
        replace_adaptive_pools(model)
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):  # statistics far from 0 and 1
        bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.3, 3)
        bn.weight.data.uniform_(0.5, 1.5), bn.bias.data.uniform_(-0.3, 0.3)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_batch_norms(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert not folded.training and not any(p.requires_grad for p in folded.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the model is not changed
    x = torch.rand(3, 3, size, size, requires_grad=True)
    assert torch.allclose(folded.logits(x), model.logits(x), atol=1e-4)
    grad, = torch.autograd.grad(torch.tanh(folded.logits(x)).sum(), x)  # input gradients (Eq. 5 and 7)
    reference, = torch.autograd.grad(torch.tanh(model.logits(x)).sum(), x)
    assert torch.allclose(grad, reference, atol=1e-5, rtol=1e-3)
    assert folded.bits == 48 and torch.equal(folded.codes(x), model.codes(x))


def test_vgg11_hash_layer_replaces_the_last_classifier_layer():
    model = build_model("vgg11", 32)
    assert model.hash_layer.in_features == 4096 and model.hash_layer.out_features == 32
    assert [type(m).__name__ for m in model.head] == ["Linear", "ReLU", "Dropout", "Linear", "ReLU", "Dropout"]


def test_pretrained_offline_names_file_and_cache_folder(monkeypatch, tmp_path):
    from torchvision.models import VGG11_Weights

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(VGG11_Weights.IMAGENET1K_V1.__class__, "get_state_dict", offline)
    with pytest.raises(UserError, match=rf"put the file vgg11-8a719046.pth in {tmp_path}/hub/checkpoints"):
        build_model("vgg11", 48, pretrained=True)


def test_checkpoint_errors(tmp_path):
    with pytest.raises(UserError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "bad.pt").write_bytes(b"\x80\x02truncated")
    with pytest.raises(UserError, match="truncated or corrupted"):
        load_checkpoint(tmp_path / "bad.pt")
    model = build_model("small", 16)
    atomic_save({"model": model.state_dict(), "config": {"arch": "small", "bits": 32}}, tmp_path / "c.pt")
    with pytest.raises(UserError, match="do not fit a small model of 32 bits"):
        model_from_checkpoint(load_checkpoint(tmp_path / "c.pt"))
