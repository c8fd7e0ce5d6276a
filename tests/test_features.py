"""EfficientNet as an encoder (issue 12): our feature maps against timm's `features_only` and MONAI's
`EfficientNetBNFeatures` with the same weights, and the features through the paths users take (clips, inflated
pretrained weights, gradient checkpointing, torch.fx, torch.compile, ONNX)."""

import math, warnings
import pytest, torch
from effnet_fastai.factories import efficientnet, efficientnet_b0
from effnet_fastai.model import EfficientNetFeatures
from effnet_fastai.convert import convert_state_dict
from effnet_fastai.video import VIDEO_KWARGS
from helpers import b0_checkpoint, randomize_

warnings.filterwarnings("ignore", message=".*torch.jit.script.*")
TOL = 1e-5


def map_diffs(ref, ours):
    "max|diff| / max|ref| of each pair of feature maps (the maps must depend on the input: checked)"
    assert len(ref) == len(ours)
    for a, b in zip(ref, ours):
        assert a.shape == b.shape and torch.isfinite(a).all()
        assert (a[0] - a[-1]).abs().max() > 0.05 * a.abs().max()
    return [((a - b).abs().max() / a.abs().max()).item() for a, b in zip(ref, ours)]


@pytest.mark.parametrize("sz", [64, 57])
def test_timm_features_only(sz):
    "timm's `tf_efficientnet_b0` with `features_only=True` and ours with its converted weights, at even and odd sizes"
    import timm

    x = torch.randn(2, 3, sz, sz + 6)
    full = randomize_(timm.create_model("tf_efficientnet_b0"), x)
    peer = timm.create_model("tf_efficientnet_b0", features_only=True)
    missing, unexpected = peer.load_state_dict(full.state_dict(), strict=False)
    assert not missing and set(unexpected) == {"conv_head.weight", "classifier.weight", "classifier.bias"} | {
        k for k in unexpected if k.startswith("bn2.")
    }
    ours = efficientnet("b0", ndim=2, num_classes=1000)
    ours.load_state_dict(convert_state_dict(full.state_dict(), "timm", model=ours))
    fe = EfficientNetFeatures(ours).eval()
    assert fe.feature_info.channels() == peer.feature_info.channels()
    assert fe.feature_info.reduction() == peer.feature_info.reduction()
    with torch.no_grad():
        assert max(map_diffs(peer.eval()(x), fe(x))) < TOL


def test_monai_features_3d():
    "MONAI's `EfficientNetBNFeatures` in 3D at a size with the parity of its image size (MONAI fixes its padding)"
    from monai.networks.nets import EfficientNetBNFeatures

    x = torch.randn(2, 1, 32, 32, 32)
    peer = EfficientNetBNFeatures("efficientnet-b0", pretrained=False, spatial_dims=3, in_channels=1, num_classes=10)
    peer = randomize_(_with_head(peer), x)[0]
    ours = efficientnet("b0", ndim=3, ni=1, num_classes=10)
    ours.load_state_dict(convert_state_dict(peer.state_dict(), "monai", model=ours))
    with torch.no_grad():
        ref = peer.eval()(x)
        assert [o.shape[1] for o in ref] == [16, 24, 40, 112, 320]
        assert max(map_diffs(ref, EfficientNetFeatures(ours).eval()(x))) < TOL


def _with_head(features):
    "A module whose forward is the features' last map pooled (so `randomize_` can calibrate it), holding `features`"

    class Wrap(torch.nn.Sequential):
        def forward(self, x):
            return self[0](x)[-1].mean((2, 3, 4))

    return Wrap(features)


@pytest.mark.parametrize("shape", [(2, 3, 16, 64, 64), (2, 3, 9, 37, 50)])
def test_video_reductions(shape):
    "With VIDEO_KWARGS (frames kept by the stem), every map is ceil(input / reduction) on every axis"
    fe = efficientnet("b0", ni=3, features_only=True, **VIDEO_KWARGS).eval()
    red = [r if isinstance(r, tuple) else (r,) * 3 for r in fe.feature_info.reduction()]
    assert red[0] == (1, 2, 2)
    with torch.no_grad():
        maps = fe(torch.randn(*shape))
    assert [tuple(o.shape[2:]) for o in maps] == [tuple(math.ceil(s / r) for s, r in zip(shape[2:], rr)) for rr in red]


def test_inflated_pretrained_features(tmp_path):
    "A 2D checkpoint inflated into a 3D features_only model gives the full inflated model's intermediates"
    f = b0_checkpoint(tmp_path / "b0.pth")
    full = efficientnet_b0(pretrained=f, ndim=3, ni=1, num_classes=1000).eval()
    fe = efficientnet_b0(pretrained=f, ndim=3, ni=1, features_only=True, out_indices=(1, 2, 4)).eval()
    x = torch.randn(2, 1, 24, 24, 24)
    with torch.no_grad():
        assert all(
            torch.equal(a, b) for a, b in zip(full.forward_intermediates(x, [1, 2, 4], intermediates_only=True), fe(x))
        )


def test_gradient_checkpointing_features():
    "Checkpointed stages give the same maps and the same gradients"
    torch.manual_seed(0)
    a = efficientnet("b0", ni=1, ndim=3, drop_connect_rate=0.0, features_only=True)
    b = efficientnet("b0", ni=1, ndim=3, drop_connect_rate=0.0, features_only=True)
    b.load_state_dict(a.state_dict())
    b.set_grad_checkpointing()
    assert all(s.grad_checkpointing for s in b.stages)
    x = torch.randn(2, 1, 20, 20, 20)
    ya, yb = a.train()(x), b.train()(x)
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(ya, yb))
    sum(o.square().mean() for o in ya).backward()
    sum(o.square().mean() for o in yb).backward()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("train", [False, True])
def test_fx_feature_extractor(train):
    "torchvision's `create_feature_extractor` (torch.fx) on a 3D model, in inference and training mode"
    from torchvision.models.feature_extraction import create_feature_extractor

    m = efficientnet("b0", ni=1, ndim=3, num_classes=2, drop_connect_rate=0.0).train(train)
    nodes = {d["module"]: d["module"] for d in m.feature_info}
    fx = create_feature_extractor(m, return_nodes=nodes)
    x = torch.randn(2, 1, 19, 22, 17)
    ref = m.forward_intermediates(x, intermediates_only=True)
    out = fx(x)
    assert all(torch.allclose(a, out[n], atol=1e-6) for a, n in zip(ref, nodes))


@pytest.mark.slow
def test_compile_fullgraph_features():
    "torch.compile(fullgraph=True) captures the features model without a graph break and gives its maps"
    torch._dynamo.reset()
    fe = efficientnet("b0", ni=1, ndim=3, features_only=True).eval()
    x = torch.randn(2, 1, 24, 24, 24)
    with torch.no_grad():
        ref, out = fe(x), torch.compile(fe, fullgraph=True)(x)
    assert max(map_diffs(ref, out)) < TOL


@pytest.mark.slow
def test_onnx_features(tmp_path):
    "A features model exports to ONNX with one output per feature map and runs under onnxruntime"
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from effnet_fastai.export import export_onnx

    fe = efficientnet("b0", ni=1, ndim=3, features_only=True, out_indices=(2, 4)).eval()
    x = torch.randn(2, 1, 32, 32, 32)
    f = export_onnx(fe, tmp_path / "fe.onnx", x)
    sess = ort.InferenceSession(str(f), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["output0", "output1"]
    with torch.no_grad():
        ref = fe(x)
    out = [torch.from_numpy(o) for o in sess.run(None, {"input": x.numpy()})]
    assert max(map_diffs(ref, out)) < 1e-4


def test_bad_indices():
    with pytest.raises(ValueError, match=r"`indices` \[7\] must select feature points among 5"):
        efficientnet("b0", features_only=True, out_indices=(7,))
    with pytest.raises(ValueError, match="expects 1 input channels, got 3"):
        efficientnet("b0", ni=1, features_only=True).eval()(torch.randn(1, 3, 16, 16, 16))
