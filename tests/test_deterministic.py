"""--deterministic: PyTorch's deterministic mode, and pools whose CUDA backward is deterministic."""
import json
import os

import pytest
import torch
from torch import nn

from models import build_model
from models.hash_network import DeterministicAvgPool, replace_adaptive_pools
from runs import make_deterministic, provenance
from tests.conftest import run_script, tiny_train_args


@pytest.fixture
def deterministic_mode():
    """Turn the process-wide switches on for one test, then back to what they were."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
             torch.backends.cudnn.deterministic, os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    make_deterministic(True)
    yield
    torch.use_deterministic_algorithms(saved[0])
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[1], saved[2]
    if saved[3] is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


@pytest.mark.parametrize("output,size", [(1, 9), ((7, 7), 14), ((7, 7), 7), ((2, 3), 5)])
def test_deterministic_pool_computes_the_adaptive_pool(output, size):
    x = torch.randn(2, 3, size, size + 1 if output == (2, 3) else size, requires_grad=True)
    ours, reference = DeterministicAvgPool(output)(x), nn.AdaptiveAvgPool2d(output)(x)
    assert ours.shape == reference.shape
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)
    grad_ours, = torch.autograd.grad(ours.sum(), x)
    grad_reference, = torch.autograd.grad(reference.sum(), x)
    torch.testing.assert_close(grad_ours, grad_reference, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arch,size", [("small", 32), ("resnet18", 64), ("vgg11", 224)])
def test_replacing_the_pools_keeps_the_outputs(arch, size):
    torch.manual_seed(0)
    model = build_model(arch, 16).eval()
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        before = model(x)
        replace_adaptive_pools(model)
        after = model(x)
    assert not any(isinstance(m, nn.AdaptiveAvgPool2d) for m in model.modules())
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_make_deterministic_sets_the_switches_and_is_recorded(deterministic_mode):
    assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
    assert not torch.backends.cudnn.benchmark and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert not any(isinstance(m, nn.AdaptiveAvgPool2d) for m in build_model("small", 16).modules())
    assert provenance("cpu")["deterministic"] is True


def test_a_deterministic_training_runs_and_records_it(tiny_data, tmp_path):
    done = run_script("train_hash.py", *tiny_train_args(tiny_data, tmp_path / "run", "--epochs", "1",
                                                        "--deterministic"))
    assert done.returncode == 0, done.stderr[-2000:]
    config = json.loads((tmp_path / "run" / "clean" / "config.json").read_text())
    assert config["deterministic"] is True and config["provenance"]["deterministic"] is True
    assert provenance("cpu")["deterministic"] is False  # this process was not switched
