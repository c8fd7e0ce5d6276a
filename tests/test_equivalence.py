"Cross-library equivalence: peers' random weights, converted and loaded into ours, give the same logits to 1e-5 relative"

import math, warnings
import pytest, torch
from torch import nn
from effnet_fastai.factories import efficientnet
from helpers import TOL, randomize_, rel_diff
from effnet_fastai.convert import convert_state_dict

warnings.filterwarnings("ignore", message=".*torch.jit.script.*")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    "These convolutions are small: one thread is faster than two, ~10x on a loaded 2-core machine (no spinning threads)"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def converted(peer, source, variant, **kwargs):
    "Our `variant` with `peer`'s weights, loaded with `strict=True`"
    ours = efficientnet(variant, **kwargs)
    ours.load_state_dict(convert_state_dict(peer.state_dict(), source, model=ours), strict=True)
    return ours.eval()


def make_peer(source, variant):
    "`source`'s `variant` with random weights (MONAI's in 3D), and the arguments that make our model its twin"
    if source == "lukemelas":
        from efficientnet_pytorch import EfficientNet as LukeNet

        return LukeNet.from_name(f"efficientnet-{variant}"), {}
    if source == "monai":
        from monai.networks.nets import EfficientNetBN

        return (
            EfficientNetBN(f"efficientnet-{variant}", pretrained=False, spatial_dims=3, in_channels=1, num_classes=2),
            dict(ndim=3, ni=1, num_classes=2),
        )
    if source == "timm":
        import timm

        return timm.create_model(f"tf_efficientnet_{variant}"), {}
    import torchvision

    return getattr(torchvision.models, f"efficientnet_{variant}")(), {}


def stride2_sizes(sz):
    "Input size of each stride-2 layer (stem, stages 2, 3, 4, 6) for an input of size `sz` with SAME padding"
    out = [sz]
    for _ in range(4):
        out.append(math.ceil(out[-1] / 2))
    return out


# efficientnet-pytorch fixes its padding for `image_size`: we feed that size. Together the sizes give an odd and an
# even input to every stride-2 layer (33: all odd, 32: all even), so a padding error cannot hide.
LUKE = [("b0", 33), ("b1", 32), ("b2", 26), ("b3", 22)]


def test_lukemelas_cases_cover_both_parities():
    parities = [{s % 2 for s in col} for col in zip(*[stride2_sizes(sz) for _, sz in LUKE])]
    assert parities == [{0, 1}] * 5


def batch(ni, sz, ndim=2, n=2):
    return torch.randn(n, ni, *(sz,) * ndim)


def lukemelas(variant, x, silu=True):
    """efficientnet-pytorch's `variant` with its padding fixed for `x`'s size, randomised on `x`. Its swish
    `x * sigmoid(x)` differs from the fused `nn.SiLU` (ours, and MONAI's, timm's, torchvision's) by an ulp here and
    there, which random blocks on these small inputs amplify to up to ~1e-5 relative: with `silu` it gets `nn.SiLU`,
    so the comparison is about weights and padding (and all four peers then agree with ours to the last bit)"""
    from efficientnet_pytorch import EfficientNet as LukeNet

    m = LukeNet.from_name(f"efficientnet-{variant}", image_size=x.shape[-1])
    for o in m.modules():
        if silu and hasattr(o, "_swish"):
            o._swish = nn.SiLU()
    return randomize_(m, x)


@pytest.mark.parametrize("variant,sz", LUKE)
def test_lukemelas(variant, sz):
    x = batch(3, sz)
    peer = lukemelas(variant, x)
    assert rel_diff(peer, converted(peer, "lukemelas", variant, ndim=2, num_classes=1000), x) < TOL


def test_lukemelas_as_is():
    "With its own swish, at its native 224 pixels, efficientnet-pytorch's b0 agrees to ~1.5e-6 (measured)"
    x = batch(3, 224)
    peer = lukemelas("b0", x, silu=False)
    assert rel_diff(peer, converted(peer, "lukemelas", "b0", ndim=2, num_classes=1000), x) < TOL


def test_padding_error_is_caught():
    "Negative control: torchvision's symmetric padding instead of SAME fails the tolerance by far (on even sizes)"
    x = batch(3, 32)
    peer = lukemelas("b0", x)
    assert (
        rel_diff(peer, converted(peer, "lukemelas", "b0", ndim=2, num_classes=1000, padding="symmetric"), x) > 100 * TOL
    )
    assert rel_diff(peer, converted(peer, "lukemelas", "b0", ndim=2, num_classes=1000), x) < TOL


# MONAI fixes its padding at construction for the variant's image size (224 for b0, 240 for b1): compare at an input
# with the same parity at every stride-2 layer (checked below)
MONAI = [("b0", 64, 2), ("b1", 48, 2), ("b0", 32, 3), ("b1", 48, 3)]


@pytest.mark.parametrize("variant,sz,ndim", MONAI)
def test_monai(variant, sz, ndim):
    from monai.networks.nets import EfficientNetBN, get_efficientnet_image_size

    native = get_efficientnet_image_size(f"efficientnet-{variant}")
    assert [s % 2 for s in stride2_sizes(sz)] == [s % 2 for s in stride2_sizes(native)]
    x = batch(1, sz, ndim)
    peer = EfficientNetBN(f"efficientnet-{variant}", pretrained=False, spatial_dims=ndim, in_channels=1, num_classes=10)
    peer = randomize_(peer, x)
    assert rel_diff(peer, converted(peer, "monai", variant, ndim=ndim, ni=1, num_classes=10), x) < TOL


TV = dict(padding="symmetric", bn_eps=1e-5, bn_momentum=0.1)  # torchvision's b0-b4 (b5-b7 keep TF's BatchNorm)


@pytest.mark.parametrize(
    "name,sz,kwargs",
    [("tf_efficientnet_b0", 32, {}), ("tf_efficientnet_b0", 33, {}), ("efficientnet_b0", 32, TV)],
    ids=["tf-even", "tf-odd", "torchvision-like"],
)
def test_timm(name, sz, kwargs):
    "timm's `tf_` models pad like TensorFlow at run time (odd and even sizes); its other models like torchvision's"
    import timm

    x = batch(3, sz)
    peer = randomize_(timm.create_model(name, pretrained=False), x)
    assert rel_diff(peer, converted(peer, "timm", "b0", ndim=2, num_classes=1000, **kwargs), x) < TOL


def test_torchvision_b0():
    import torchvision

    x = batch(3, 32)
    peer = randomize_(torchvision.models.efficientnet_b0(weights=None), x)
    assert rel_diff(peer, converted(peer, "torchvision", "b0", ndim=2, num_classes=1000, **TV), x) < TOL
    # negative control: TensorFlow's BatchNorm eps (1e-3) instead of torchvision's 1e-5
    assert (
        rel_diff(peer, converted(peer, "torchvision", "b0", ndim=2, num_classes=1000, padding="symmetric"), x)
        > 100 * TOL
    )


def test_torchvision_b5():
    import torchvision

    x = batch(3, 32)
    peer = randomize_(torchvision.models.efficientnet_b5(weights=None), x)
    assert peer.features[0][1].eps == 1e-3  # b5-b7 use TensorFlow's BatchNorm eps in torchvision
    assert rel_diff(peer, converted(peer, "torchvision", "b5", ndim=2, num_classes=1000, padding="symmetric"), x) < TOL


@pytest.mark.parametrize("source", ["lukemelas", "timm"])
def test_wrong_variant_fails_before_loading(source):
    with torch.device("meta"):
        peer, _ = make_peer(source, "b1")
    ours = efficientnet("b0", ndim=2, num_classes=1000)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(
        ValueError, match=r"does not fit this EfficientNet \(variant 'b0'\): \d+ unexpected keys: stage1\.1\."
    ):
        convert_state_dict(peer.state_dict(), source, model=ours)
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in before.items())


def test_wrong_ndim_lists_shapes():
    with torch.device("meta"):
        sd = make_peer("lukemelas", "b0")[0].state_dict()
    with pytest.raises(
        ValueError, match=r"shape mismatches: stem\.0\.weight \(32, 3, 3, 3\) \(model: \(32, 3, 3, 3, 3\)\)"
    ):
        convert_state_dict(sd, "lukemelas", model=efficientnet("b0", ndim=3, num_classes=1000))


def test_bad_source():
    with torch.device("meta"):
        sd = make_peer("timm", "b0")[0].state_dict()
    with pytest.raises(
        ValueError, match=r"unknown `source` 'keras'; expected one of \['lukemelas', 'monai', 'timm', 'torchvision'\]"
    ):
        convert_state_dict(sd, "keras")
    with pytest.raises(
        ValueError, match=r"keys not in the 'lukemelas' layout \(is `source` right\?\): conv_stem\.weight"
    ):
        convert_state_dict(sd, "lukemelas")


@pytest.mark.parametrize(
    "variant",
    ["b0", "b1", "b2", "b3"] + [pytest.param(v, marks=pytest.mark.slow) for v in ("b4", "b5", "b6", "b7", "b8", "l2")],
)
def test_every_variant_converts(variant):
    "Every variant of every source (torchvision stops at b7) converts to exactly our keys and shapes, in our order"
    for source in ("lukemelas", "monai", "timm", "torchvision"):
        if source == "torchvision" and variant in ("b8", "l2"):
            continue
        with torch.device("meta"):
            peer, kw = make_peer(source, variant)
            ours = efficientnet(variant, **{"ndim": 2, "num_classes": 1000, **kw})
        sd = convert_state_dict(peer.state_dict(), source, model=ours)
        assert list(sd) == list(ours.state_dict())
