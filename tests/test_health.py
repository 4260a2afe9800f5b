"""Numerical health: a NaN or inf loss stops training at its epoch and step; NaN weights never become codes."""
import argparse

import pytest
import torch
from torch.utils.data import DataLoader

from models import build_model
from models.training import train_one_epoch
from retrieval import encode
from runs import UserError


class Images(torch.utils.data.Dataset):
    def __len__(self):
        return 40

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return torch.rand(3, 32, 32, generator=g), torch.nn.functional.one_hot(torch.tensor(i % 4), 4).float(), i


class NaNAtCall:
    """A squared-output loss that returns NaN on its n-th call."""

    def __init__(self, n):
        self.n, self.calls = n, 0

    def __call__(self, outputs, labels):
        self.calls += 1
        loss = outputs.pow(2).mean()
        return loss * float("nan") if self.calls == self.n else loss


def test_a_nan_loss_stops_training_naming_epoch_and_step():
    model = build_model("small", 16)
    recipe = argparse.Namespace(seed=0, batch_size=8, workers=0, lr=1e-3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss = NaNAtCall(8)  # 5 steps of 8 images per epoch: the 8th call is epoch 2, step 3
    train_one_epoch(model, loss, optimizer, Images(), recipe, 0, torch.device("cpu"))
    with pytest.raises(UserError, match=r"NaN or inf in epoch 2 at step 3 of 5; .*--lr \(now 0.001\)"):
        train_one_epoch(model, loss, optimizer, Images(), recipe, 1, torch.device("cpu"))


def test_codes_of_a_model_with_nan_weights_are_refused():
    model = build_model("small", 16)
    with torch.no_grad():
        model.hash_layer.weight[0, 0] = float("nan")
    with pytest.raises(UserError, match="encode database: the model's outputs are NaN or inf"):
        encode(model, DataLoader(Images(), batch_size=16), torch.device("cpu"), "encode database", progress=False)
    codes, labels = encode(build_model("small", 16), DataLoader(Images(), batch_size=16), torch.device("cpu"),
                           progress=False)
    assert codes.shape == (40, 16) and set(codes.unique().tolist()) <= {-1, 1}
