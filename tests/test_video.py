"Per-axis strides and kernels for clips, the clip preset, and `model_summary`"

import math, warnings
import pytest, torch
from effnet_fastai.model import num_params, EfficientNet
from effnet_fastai.factories import efficientnet_b0
from effnet_fastai.video import video_preset, VIDEO_KWARGS, model_summary


def _stage_shapes(m, x):
    "Real (not meta) output shape of each top-level layer"
    shapes, hooks = (
        {},
        [
            o.register_forward_hook(lambda o, i, out, n=n: shapes.__setitem__(n, tuple(out.shape[1:])))
            for n, o in m.named_children()
        ],
    )
    with torch.no_grad():
        m.eval()(x)
    for h in hooks:
        h.remove()
    return shapes


def test_preset_keeps_the_frames():
    m = efficientnet_b0(num_classes=7, **VIDEO_KWARGS)
    shapes = _stage_shapes(m, torch.randn(1, 3, 16, 32, 32))
    assert [shapes[f"stage{i}"][1] for i in range(1, 8)] == [16, 16, 16, 8, 8, 4, 4]
    assert shapes["stem"] == (32, 16, 16, 16) and shapes["fc"] == (7,)
    assert m.stem[0].stride == (1, 2, 2) and m.stage2[0].depthwise[0].kernel_size == (1, 3, 3)
    assert m.stage5[0].depthwise[0].kernel_size == (3, 5, 5)


def test_strides_one_argument_per_axis():
    "Any frame count survives with temporal stride 1 everywhere, odd ones included"
    m = efficientnet_b0(num_classes=3, **video_preset(time_strides=(1,) * 8))
    for t in (1, 5, 16):
        assert _stage_shapes(m, torch.randn(1, 3, t, 32, 32))["head"][1] == t


def test_preset_arguments():
    with pytest.raises(ValueError, match="`time_strides` needs one entry for the stem and one per stage"):
        video_preset(time_strides=(1,) * 7)
    with pytest.raises(ValueError, match="`time_kernels` must be ints >= 1"):
        video_preset(time_kernels=(1, 1, 1, 3, 3, 3, 0))
    kw = video_preset(time_kernels=(1,) * 7, time_strides=(2,) * 8)
    assert kw["stem_stride"] == (2, 2, 2) and kw["strides"][0] == (2, 1, 1) and kw["kernels"][2] == (1, 5, 5)


def test_summary_matches_a_real_forward():
    m = efficientnet_b0(num_classes=5, **VIDEO_KWARGS)
    x = torch.randn(1, 3, 8, 40, 48)
    real = _stage_shapes(m, x)
    s = model_summary(m, (3, 8, 40, 48)).set_index("layer")
    assert {k: s.loc[k, "output"] for k in real} == real
    assert s.loc["total", "params"] == num_params(m)
    assert m.training is False  # `_stage_shapes` put it in eval; the summary keeps the mode it found
    m.train()
    model_summary(m, (1, 3, 8, 40, 48))
    assert m.training


def test_macs_by_hand():
    m = EfficientNet(ni=2, num_classes=4, ndim=3, stem_stride=(1, 2, 2), kernels=[(1, 3, 3)] + [3] * 6)
    with pytest.warns(
        UserWarning, match="axis D .4 at the input. collapses to 1 at `stage3`"
    ):  # true: 4 frames, 3 strides
        s = model_summary(m, (2, 4, 16, 16)).set_index("layer")
    assert s.loc["stem", "MACs"] == 32 * 4 * 8 * 8 * 2 * 27  # output elements x input channels x kernel volume
    # stage1: depthwise (1,3,3) on 32 channels, SE (32->8->32 on one voxel), project 32->16 (1x1x1)
    assert s.loc["stage1", "MACs"] == 32 * 4 * 8 * 8 * 9 + 32 * 8 + 8 * 32 + 16 * 4 * 8 * 8 * 32
    assert s.loc["fc", "MACs"] == 1280 * 4
    b0 = efficientnet_b0(ndim=2, num_classes=1000)
    assert math.isclose(model_summary(b0, (3, 224, 224)).MACs.iloc[-1] / 1e9, 0.39, abs_tol=0.01)  # the paper's 0.39B


def test_collapse_warning():
    with pytest.warns(
        UserWarning, match=r"axis D \(16 at the input\) collapses to 1 at `stage4`, yet `stage6` still strides"
    ):
        model_summary(efficientnet_b0(ndim=3), (3, 16, 64, 64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model_summary(efficientnet_b0(**VIDEO_KWARGS), (3, 16, 64, 64))
        model_summary(efficientnet_b0(ndim=2), (3, 32, 32))  # 1 pixel only after the last strided stage: not early
        model_summary(efficientnet_b0(ndim=3), (3, 1, 64, 64))  # an axis of 1 at the input did not collapse
    with pytest.warns(UserWarning, match="axis W"):
        model_summary(efficientnet_b0(ndim=2), (3, 224, 8))
    with pytest.raises(ValueError, match="`input_shape` must be"):
        model_summary(efficientnet_b0(ndim=2), (3, 32))


def test_pretrained_clip_is_the_2d_network_per_frame(tmp_path):
    torch.manual_seed(0)
    b0 = efficientnet_b0(ndim=2, num_classes=1000).eval()
    f = tmp_path / "b0.pth"
    torch.save(b0.state_dict(), f)
    img = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = b0(img)
    m = efficientnet_b0(pretrained=f, num_classes=1000, **VIDEO_KWARGS).eval()
    with torch.no_grad():
        out = m(img.unsqueeze(2).expand(-1, -1, 12, -1, -1))
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert torch.equal(m.stage2[0].depthwise[0].weight[:, :, 0], b0.stage2[0].depthwise[0].weight)  # (1,3,3): as it is
