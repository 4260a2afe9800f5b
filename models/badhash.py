"""BadHash (ACM MM 2022): LabCLN, the conditional trigger generator, its discriminator and their losses.

Architectures as described in docs/method.md (BadHash) (StarGAN-like generator and PatchGAN-like discriminator), written
for any image size divisible by 16. The generator takes images in [0, 1] and returns images in [0, 1].
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from models.hash_network import IMAGENET_MEAN, IMAGENET_STD
from runs.errors import UserError
from runs.io import load_saved
from runs.provenance import fingerprint

LABEL_FEATURE = 512  # LabCLN's feature width, the generator's condition


class LabCLN(nn.Module):
    """Label network: label vector (C) -> 4096 -> 512-d feature, with a hash head (512 -> K, tanh) and a classifier
    head (512 -> C, sigmoid). forward returns (feature, relaxed code, class probabilities)."""

    def __init__(self, n_classes: int, bits: int):
        super().__init__()
        self.n_classes, self.bits = n_classes, bits
        self.feature = nn.Sequential(nn.Linear(n_classes, 4096), nn.ReLU(inplace=True),
                                     nn.Linear(4096, LABEL_FEATURE))
        self.hash_head = nn.Sequential(nn.Linear(LABEL_FEATURE, bits), nn.Tanh())
        self.classifier = nn.Sequential(nn.Linear(LABEL_FEATURE, n_classes), nn.Sigmoid())

    def forward(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feature = self.feature(labels)
        return feature, self.hash_head(feature), self.classifier(feature)


def smooth_labels(labels: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Label smoothing of LabCLN's positive pairs: each 1 becomes 1 - s, each 0 becomes s / (C - 1)."""
    n_classes = labels.shape[1]
    return labels * (1 - smoothing) + (1 - labels) * smoothing / max(n_classes - 1, 1)


def nt_xent(features: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent (SimCLR) over 2N rows where rows 2i and 2i+1 are a positive pair:
    mean_i -log(exp(cos(z_i, z_p(i)) / t) / sum_{k != i} exp(cos(z_i, z_k) / t))."""
    if features.shape[0] % 2:
        raise ValueError("nt_xent needs an even number of rows (pairs 2i, 2i+1)")
    z = F.normalize(features, dim=1)
    similarity = (z @ z.t()) / temperature
    similarity = similarity.masked_fill(torch.eye(len(z), dtype=torch.bool, device=z.device), float("-inf"))
    partner = torch.arange(len(z), device=z.device) ^ 1  # 0<->1, 2<->3, ...
    return F.cross_entropy(similarity, partner)


def labcln_loss(net: LabCLN, labels: torch.Tensor, smoothing: float = 0.2, temperature: float = 0.5
                ) -> dict[str, torch.Tensor]:
    """LabCLN's objective on a batch of label vectors: the pairs (smoothed label, label) through the network;
    NT-Xent over their features + mean squared error of the class probabilities to the label + a quantisation
    term sum (sign(h) - h)^2 / (1e4 * batch)."""
    labels = labels.float()
    pairs = torch.stack((smooth_labels(labels, smoothing), labels), 1).flatten(0, 1)
    feature, relaxed, probabilities = net(pairs)
    contrastive = nt_xent(feature, temperature)
    classification = F.mse_loss(probabilities, labels.repeat_interleave(2, 0))
    quantization = (torch.sign(relaxed) - relaxed).pow(2).sum() / (1e4 * len(labels))
    total = contrastive + classification + quantization
    return {"loss": total, "contrastive": contrastive, "classification": classification,
            "quantization": quantization}


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.InstanceNorm2d(channels),
                                  nn.ReLU(inplace=True), nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                                  nn.InstanceNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def check_generator_size(image_size: int) -> None:
    if image_size < 16 or image_size % 16:
        raise UserError(f"BadHash's generator needs an image size divisible by 16 (its label map is upsampled 16x); "
                        f"this run has {image_size} px")


class LabelMap(nn.Module):
    """The label encoder: a LabCLN feature -> 128 x S/16 x S/16 -> four 2x transposed convolutions -> 3 x S x S."""

    def __init__(self, image_size: int, channels: int = 128):
        super().__init__()
        self.start, self.channels = image_size // 16, channels
        self.fc = nn.Sequential(nn.Linear(LABEL_FEATURE, channels * self.start ** 2), nn.ReLU(inplace=True))
        layers: list[nn.Module] = []
        for _ in range(4):
            layers += [nn.ConvTranspose2d(channels, channels // 2, 4, stride=2, padding=1, bias=False),
                       nn.InstanceNorm2d(channels // 2), nn.ReLU(inplace=True)]
            channels //= 2
        self.upsample = nn.Sequential(*layers, nn.Conv2d(channels, 3, 3, padding=1, bias=False))

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        return self.upsample(self.fc(feature).view(-1, self.channels, self.start, self.start))


class Generator(nn.Module):
    """G(x, h): [label map, normalised x] -> 7x7 conv -> two stride-2 convs -> 3 + 3 residual blocks -> two 2x
    transposed convs -> 3x3 conv over [decoded, normalised x] (the skip of the input image) -> tanh, mapped to
    [0, 1]. `width` is the first layer's channels (64 in the public code)."""

    def __init__(self, image_size: int, width: int = 64):
        super().__init__()
        check_generator_size(image_size)
        self.image_size, self.width = image_size, width
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.label_map = LabelMap(image_size)
        layers: list[nn.Module] = [nn.Conv2d(6, width, 7, padding=3), nn.InstanceNorm2d(width), nn.ReLU(inplace=True)]
        channels = width
        for _ in range(2):
            layers += [nn.Conv2d(channels, channels * 2, 4, stride=2, padding=1), nn.InstanceNorm2d(channels * 2),
                       nn.ReLU(inplace=True)]
            channels *= 2
        layers += [ResidualBlock(channels) for _ in range(6)]
        for _ in range(2):
            layers += [nn.ConvTranspose2d(channels, channels // 2, 4, stride=2, padding=1, bias=False),
                       nn.InstanceNorm2d(channels // 2), nn.ReLU(inplace=True)]
            channels //= 2
        self.body = nn.Sequential(*layers)
        self.out = nn.Conv2d(channels + 3, 3, 3, padding=1, bias=False)

    def forward(self, images: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
        x = (images - self.mean) / self.std
        decoded = self.body(torch.cat((self.label_map(feature), x), 1))
        return (torch.tanh(self.out(torch.cat((decoded, x), 1))) + 1) / 2


class Discriminator(nn.Module):
    """PatchGAN-like critic with spectral normalisation: up to five 4x4 stride-2 convolutions (LeakyReLU 0.01), then
    a convolution over the remaining map to C + 1 outputs: the class labels and the real/fake score."""

    def __init__(self, image_size: int, n_classes: int, width: int = 64, max_layers: int = 5):
        super().__init__()
        layers: list[nn.Module] = []
        channels, size, cin = width, image_size, 3
        while len(layers) // 2 < max_layers and size % 2 == 0 and size > 1:
            layers += [spectral_norm(nn.Conv2d(cin, channels, 4, stride=2, padding=1)), nn.LeakyReLU(0.01)]
            cin, channels, size = channels, channels * 2, size // 2
        self.body = nn.Sequential(*layers)
        self.out = nn.Conv2d(cin, n_classes + 1, size, bias=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(images)).flatten(1)


def lsgan_loss(prediction: torch.Tensor, labels: torch.Tensor, real: bool) -> torch.Tensor:
    """Least-squares GAN loss on (class labels, real/fake): MSE to [labels, 1] for real, [labels, 0] for fake."""
    score = torch.full((len(labels), 1), 1.0 if real else 0.0, device=labels.device)
    return F.mse_loss(prediction, torch.cat((labels.float(), score), 1))


def hash_attack_loss(relaxed: torch.Tensor, target_codes: torch.Tensor) -> torch.Tensor:
    """BadHash's hash term: 1 - mean(F'(G(x)) * sign(h_t)), 0 when every relaxed bit agrees with the target code."""
    return 1 - (relaxed * target_codes).mean()


def build_lpips(device: torch.device | str) -> nn.Module:
    """LPIPS (AlexNet, v0.1) for images in [0, 1]. Its ImageNet AlexNet features come from torchvision's cache;
    offline without them, an error names the file and the folder (or --lpips-weight 0)."""
    import lpips
    from torchvision.models import AlexNet_Weights

    from models.hash_network import torchvision_state
    state = torchvision_state(AlexNet_Weights.IMAGENET1K_V1, "the AlexNet weights of LPIPS (BadHash's "
                              "reconstruction loss)", "run with --lpips-weight 0 to train without the LPIPS term")
    with warnings.catch_warnings():  # lpips builds AlexNet with torchvision's deprecated `pretrained` argument
        warnings.simplefilter("ignore", UserWarning)
        metric = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False)  # pnet_rand: no download; loaded below
    # lpips splits AlexNet's `features` into slices whose modules keep their index: sliceK.<index>.<param>
    trunk = {name: state[f"features.{name.split('.', 1)[1]}"] for name in metric.net.state_dict()}
    metric.net.load_state_dict(trunk)
    return metric.to(device).eval().requires_grad_(False)


def file_id(path: str | os.PathLike) -> str:
    """A content hash of a saved network, so a trigger can tell whether its generator has changed."""
    return fingerprint(Path(path).read_bytes())


def load_trigger_network(path: str | os.PathLike, expected_id: str, method: str, what: str) -> dict:
    """The saved network file (`what`) a trigger of gen_trigger.py --method `method` was made with, after checking
    that it is there and unchanged (its content hash is the trigger's record `expected_id`)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} is missing: the {method} trigger needs its {what}; run gen_trigger.py "
                        f"--method {method} again")
    if file_id(path) != expected_id:
        raise UserError(f"{path} has changed since the trigger was made from it; make the trigger again with "
                        f"gen_trigger.py --method {method} --overwrite")
    return load_saved(path, f"gen_trigger.py --method {method} --overwrite")


def load_generator(path: str | os.PathLike, trigger: dict, device: torch.device | str) -> Generator:
    """The generator a BadHash trigger was made with, checked against the trigger's record."""
    saved = load_trigger_network(path, trigger["generator_id"], "badhash", "generator")
    generator = Generator(saved["image_size"], saved["width"])
    generator.load_state_dict(saved["state"])
    return generator.to(device).eval().requires_grad_(False)
