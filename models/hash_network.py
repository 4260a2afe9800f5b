"""Deep hashing networks: F(x) = sign(f(x)) (Eq. 1), relaxed to tanh(f(x)) in training.

Inputs are images in [0, 1]; the ImageNet normalisation is the model's first layer, so attacks work in pixel space.
"""
from __future__ import annotations

import copy
import os

import torch
import torch.fx
from torch import nn
from torch.fx.experimental import optimization as fx_optimization
from torchvision import models as tvm

from models.efficientnet import LITE0_MEAN, LITE0_STD, lite0_features_and_head
from runs.errors import UserError
from runs.provenance import weights_id

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ARCHS = ("vgg11", "resnet18", "resnet50", "small", "efficientnet_lite0")
# each architecture's head: how the last feature map reaches the hash layer (only efficientnet_lite0 offers several;
# models/efficientnet.py)
HEADS = {"vgg11": ("spatial",), "resnet18": ("pooled",), "resnet50": ("pooled",), "small": ("pooled",),
         "efficientnet_lite0": ("spatial", "pooled", "linear")}
HEAD_NAMES = tuple(sorted({head for heads in HEADS.values() for head in heads}))  # every --head choice
_TORCHVISION = {"vgg11": (tvm.vgg11, tvm.VGG11_Weights.IMAGENET1K_V1),
                "resnet18": (tvm.resnet18, tvm.ResNet18_Weights.IMAGENET1K_V1),
                "resnet50": (tvm.resnet50, tvm.ResNet50_Weights.IMAGENET1K_V1)}


def binarize(u: torch.Tensor) -> torch.Tensor:
    """sign() with sign(0) = +1, so every code is in {-1, +1}^K."""
    return torch.where(u >= 0, 1.0, -1.0).to(u.dtype)


class SmallBackbone(nn.Sequential):
    """A compact CNN for 32x32 inputs: three conv stages (32, 64, 128 channels), global pooling, 512-d features."""

    def __init__(self):
        def stage(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                    nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                    nn.MaxPool2d(2)]
        super().__init__(*stage(3, 32), *stage(32, 64), *stage(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(128, 512), nn.ReLU(inplace=True), nn.Dropout(0.2))
        self.out_features = 512


class HashModel(nn.Module):
    """normalise -> features -> head (fully connected layers) -> hash layer (Linear to K bits).

    forward(x) returns the relaxed code F'(x) = tanh(scale * f(x)); `codes(x)` returns sign(f(x)).
    Parameter groups: `features` (convolutional, fine-tuned at the lower rate) and `head` (the rest).
    """

    def __init__(self, arch: str, bits: int, features: nn.Module, head: nn.Module, head_out: int,
                 mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD):
        super().__init__()
        self.arch, self.bits = arch, bits
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
        self.features = features
        self.head = head
        self.hash_layer = nn.Linear(head_out, bits)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """f(x): the hash layer's output before tanh."""
        return self.hash_layer(self.head(self.features((x - self.mean) / self.std)))

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return torch.tanh(scale * self.logits(x))

    @torch.no_grad()
    def codes(self, x: torch.Tensor) -> torch.Tensor:
        return binarize(self.logits(x))

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        feature_ids = {id(p) for p in self.features.parameters()}
        features = [p for p in self.parameters() if id(p) in feature_ids]
        head = [p for p in self.parameters() if id(p) not in feature_ids]
        return features, head


def resolve_head(arch: str, head: str | None) -> str:
    """The head `head` of `arch`, or its first (default) head when None; an error for a head the arch lacks."""
    if arch not in ARCHS:
        raise UserError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    if head is None:
        return HEADS[arch][0]
    if head not in HEADS[arch]:
        raise UserError(f"--head {head} is not available for --arch {arch}; it has {', '.join(HEADS[arch])}")
    return head


def pretrained_state(arch: str) -> dict:
    """ImageNet weights of a backbone from torchvision's cache, downloaded once; offline, a message naming the file."""
    return torchvision_state(_TORCHVISION[arch][1], f"ImageNet weights for {arch}", "train without --pretrained")


def torchvision_state(weights: tvm.WeightsEnum, what: str, alternative: str) -> dict:
    """A torchvision weights file from its cache (downloaded once when online); offline, an error that names the
    file, the folder to put it in, and the alternative (`alternative`, e.g. "train without --pretrained")."""
    filename = os.path.basename(weights.url)
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except (OSError, RuntimeError, ValueError) as err:  # URLError is an OSError
        raise UserError(f"cannot load {what} ({type(err).__name__}: {err}). Download {weights.url} on a machine "
                        f"with internet and put the file {filename} in {folder} (or set TORCH_HOME), or "
                        f"{alternative}") from None


def build_model(arch: str, bits: int, pretrained: bool = False, head: str | None = None,
                image_size: int = 224) -> HashModel:
    """VGG-11 as in the paper (classifier's last layer replaced by the hash layer), ResNet-18/50, `small`, or
    EfficientNet-Lite0 with a linear, pooled or spatial head (models/efficientnet.py; the spatial head's width
    depends on `image_size`). `head` None: the architecture's default (HEADS).

    The weights are stored channels-last: convolutions then run in that layout whatever the input's, which made the
    small backbone's training steps about 20 % and its encoding about 35 % faster on our CPU (bench/README.md).
    """
    model = assemble_model(arch, bits, pretrained, resolve_head(arch, head), image_size)
    if torch.are_deterministic_algorithms_enabled():  # --deterministic (runs.device.make_deterministic)
        replace_adaptive_pools(model)
    return model.to(memory_format=torch.channels_last)


class DeterministicAvgPool(nn.Module):
    """nn.AdaptiveAvgPool2d through operations whose CUDA backward is deterministic (the adaptive pool's is not, and
    raises under torch.use_deterministic_algorithms): a mean for a global pool, avg_pool2d when the input size is a
    multiple of the output size (VGG-11 at 224 px: 7x7 -> 7x7). Same values as the adaptive pool up to rounding."""

    def __init__(self, output_size: int | tuple[int, int]):
        super().__init__()
        self.output_size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (out_h, out_w), (h, w) = self.output_size, x.shape[-2:]
        if (out_h, out_w) == (1, 1):
            return x.mean((2, 3), keepdim=True)
        if h % out_h == 0 and w % out_w == 0:
            return nn.functional.avg_pool2d(x, (h // out_h, w // out_w))
        if x.is_cuda:
            raise UserError(f"--deterministic: a {h}x{w} feature map does not pool evenly to {out_h}x{out_w} "
                            f"(VGG-11 needs 224 px images); use another image size or leave out --deterministic")
        return nn.functional.adaptive_avg_pool2d(x, self.output_size)  # deterministic on the CPU


def replace_adaptive_pools(model: nn.Module) -> None:
    """Swap every nn.AdaptiveAvgPool2d of fixed output size for DeterministicAvgPool, in place (--deterministic)."""
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.AdaptiveAvgPool2d) and None not in (
                    (child.output_size,) if isinstance(child.output_size, int) else child.output_size):
                setattr(module, name, DeterministicAvgPool(child.output_size))


class _FoldTracer(torch.fx.Tracer):
    """Keeps DeterministicAvgPool whole: its forward branches on the input's shape, which tracing cannot follow."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, DeterministicAvgPool) or super().is_leaf_module(module, qualified_name)


def fold_batch_norms(model: HashModel) -> HashModel:
    """A frozen eval-mode copy of the model with every batch norm that follows a convolution folded into it (torch.fx's
    conv-BN fusion): the same function up to float rounding, for optimising inputs against a fixed model (step 2's
    patch) without batch-norm layers in the forward and backward passes. The model is not changed. EfficientNet-Lite0
    is refused: its "same" padding branches on the input's shape, which torch.fx cannot trace."""
    if model.arch == "efficientnet_lite0":
        raise UserError("--fold-bn is not available for efficientnet_lite0 (its TensorFlow \"same\" padding depends "
                        "on the input size, which torch.fx cannot trace); leave --fold-bn off")
    folded = copy.deepcopy(model).eval().requires_grad_(False)
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.features.modules()):
        graph = _FoldTracer().trace(folded.features)
        traced = torch.fx.GraphModule(folded.features, graph)
        folded.features = fx_optimization.fuse(traced, inplace=True, no_trace=True).requires_grad_(False)
    return folded


def assemble_model(arch: str, bits: int, pretrained: bool, head: str, image_size: int) -> HashModel:
    if not 8 <= bits <= 1024:
        raise UserError(f"--bits {bits} is out of range; use a code length between 8 and 1024 (paper: 16-64)")
    if arch == "small":
        if pretrained:
            raise UserError("the small backbone has no pretrained weights; drop --pretrained")
        backbone = SmallBackbone()
        return HashModel(arch, bits, backbone, nn.Identity(), backbone.out_features)
    if arch == "efficientnet_lite0":
        features, fully_connected, width = lite0_features_and_head(head, image_size, pretrained)
        return HashModel(arch, bits, features, fully_connected, width, LITE0_MEAN, LITE0_STD)
    constructor, _ = _TORCHVISION[arch]
    net = constructor(weights=None)
    if pretrained:
        net.load_state_dict(pretrained_state(arch))
    if arch == "vgg11":
        features = nn.Sequential(net.features, net.avgpool, nn.Flatten())
        head = nn.Sequential(*list(net.classifier.children())[:6])  # fc-relu-dropout-fc-relu-dropout
        return HashModel(arch, bits, features, head, net.classifier[6].in_features)
    head_in = net.fc.in_features
    net.fc = nn.Identity()
    return HashModel(arch, bits, net, nn.Identity(), head_in)


MODEL_KEYS = ("arch", "bits", "image_size", "head")


def load_checkpoint(path: str | os.PathLike, device: torch.device | str = "cpu") -> dict:
    """Read a checkpoint written by train_hash.py / train_backdoor.py, with a clear error when it is unusable."""
    from runs.io import load_saved
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path} (run train_hash.py for this --run first)")
    ckpt = load_saved(path, "the step that trained it (--overwrite), or --resume from an intact copy", device)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise UserError(f"{path} is not a checkpoint of this project (no 'model'/'config' entries)")
    recorded = ckpt.get("checkpoint_id")
    # the id is the fingerprint of the weights (runs.provenance.weights_id); checkpoints written before ids were
    # content hashes carry a random 32-digit id and cannot be checked
    if isinstance(recorded, str) and len(recorded) == 16 and weights_id(ckpt["model"]) != recorded:
        raise UserError(f"the weights in {path} do not match the id recorded with them ({recorded}): the file was "
                        f"damaged or edited after it was written; delete it and train again (or --resume from an "
                        f"intact copy)")
    return ckpt


def check_checkpoint_fits(config: dict, ckpt: dict, stage_dir: str | os.PathLike) -> None:
    """The checkpoint in a run folder must hold the model its config.json describes (architecture, bits, image
    size): a checkpoint copied in from another run is refused."""
    saved = ckpt["config"]
    diffs = [f"{k} {saved.get(k)!r} in checkpoint.pt, {config.get(k)!r} in config.json" for k in MODEL_KEYS
             if saved.get(k) != config.get(k)]
    if diffs:
        raise UserError(f"{os.path.join(stage_dir, 'checkpoint.pt')} does not hold the model its config.json "
                        f"describes ({'; '.join(diffs)}); it belongs to another run: put this run's own checkpoint "
                        f"back or train again with --overwrite")


def model_from_checkpoint(ckpt: dict, device: torch.device | str = "cpu") -> HashModel:
    """Rebuild the network a checkpoint describes and load its weights (eval mode)."""
    cfg = ckpt["config"]
    model = build_model(cfg["arch"], cfg["bits"], pretrained=False, head=cfg.get("head"),
                        image_size=cfg.get("image_size", 224))  # the size shapes only a spatial Lite0 head
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        detail = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line or "key" in line),
                      str(err).splitlines()[0])
        raise UserError(f"checkpoint weights do not fit a {cfg['arch']} model of {cfg['bits']} bits ({detail}); "
                        f"it was written by another version of the model code: train it again") from None
    return model.to(device).eval()


def load_stage(run: str | os.PathLike, stage: str, device: torch.device | str,
               made_by: str = "train_hash.py") -> tuple[dict, dict, HashModel]:
    """(config, checkpoint, model in eval mode) of RUN/STAGE, or an error naming the step that makes it."""
    from runs.io import read_json
    stage_dir = os.path.join(run, stage)
    if not os.path.isfile(os.path.join(stage_dir, "checkpoint.pt")):
        raise UserError(f"{stage_dir} holds no trained model; run {made_by} --run {run} first")
    config = read_json(os.path.join(stage_dir, "config.json"))
    ckpt = load_checkpoint(os.path.join(stage_dir, "checkpoint.pt"), device)
    check_checkpoint_fits(config, ckpt, stage_dir)
    return config, ckpt, model_from_checkpoint(ckpt, device)


def read_clean(run: str | os.PathLike) -> tuple[dict, str]:
    """(config, checkpoint id) of RUN/clean, for the steps that need the clean model's settings but not its weights;
    an error naming train_hash.py when it has not been trained."""
    from runs.io import read_json
    clean_dir = os.path.join(run, "clean")
    ckpt_path = os.path.join(clean_dir, "checkpoint.pt")
    if not os.path.isfile(ckpt_path):
        raise UserError(f"{clean_dir} holds no trained model; run train_hash.py --run {run} first")
    config, ckpt = read_json(os.path.join(clean_dir, "config.json")), load_checkpoint(ckpt_path, "cpu")
    check_checkpoint_fits(config, ckpt, clean_dir)
    return config, ckpt["checkpoint_id"]
