"Property-based tests of the building blocks (hypothesis), with independent implementations as oracles"

import math
import pytest, torch
from hypothesis import given, settings, strategies as st, HealthCheck
from effnet_fastai import *

hsettings = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
axis = st.tuples(
    st.integers(1, 5), st.integers(1, 3), st.integers(1, 2), st.integers(1, 12)
)  # ks, stride, dilation, size


@hsettings
@given(st.integers(1, 3), st.lists(axis, min_size=3, max_size=3))
def test_same_output_size(ndim, axes):
    "Every axis of a SAME conv outputs ceil(in / stride), for any kernel (odd or even), stride, dilation and size"
    ks, stride, dil, szs = zip(*axes[:ndim])
    conv = ConvLayerDynamicPadding(2, 3, ks, stride=stride, dilation=dil, ndim=ndim, act_cls=None, norm_type=None)
    out = conv(torch.randn(1, 2, *szs))
    assert tuple(out.shape[2:]) == tuple(math.ceil(s / st_) for s, st_ in zip(szs, stride))


@hsettings
@given(
    st.integers(1, 5),
    st.integers(1, 5),
    st.integers(1, 3),
    st.integers(1, 3),
    st.integers(1, 2),
    st.integers(1, 13),
    st.integers(1, 13),
)
def test_same_matches_timm_2d(kh, kw, sh, sw, d, h, w):
    "2D SAME conv equals timm's Conv2dSame (an independent implementation of TensorFlow's rule)"
    from timm.layers import Conv2dSame as TimmConv2dSame

    ref = TimmConv2dSame(3, 4, (kh, kw), stride=(sh, sw), dilation=d)
    ours = Conv2dSame(3, 4, (kh, kw), stride=(sh, sw), dilation=d)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, h, w)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


@hsettings
@given(
    st.integers(1, 4),
    st.integers(1, 3),
    st.integers(1, 4),
    st.integers(1, 3),
    st.integers(1, 9),
    st.integers(1, 9),
    st.integers(1, 9),
)
def test_same_3d_separable(kd, sd, k, s, D, H, W):
    "A 3D SAME conv with a (kd,1,1) or (1,k,k) kernel equals 1D/2D SAME convs applied along those axes"
    from timm.layers import Conv2dSame as TimmConv2dSame

    x = torch.randn(1, 2, D, H, W)
    c3 = Conv3dSame(2, 3, (1, k, k), stride=(1, s, s), bias=False)
    ref = TimmConv2dSame(2, 3, k, stride=s, bias=False)
    ref.weight.data = c3.weight.data[:, :, 0].clone()
    per_slice = torch.stack([ref(x[:, :, i]) for i in range(D)], 2)
    torch.testing.assert_close(c3(x), per_slice, rtol=1e-5, atol=1e-5)
    cd = Conv3dSame(2, 3, (kd, 1, 1), stride=(sd, 1, 1), bias=False)
    c1 = Conv1dSame(2, 3, kd, stride=sd, bias=False)
    c1.weight.data = cd.weight.data[..., 0, 0].clone()
    along_d = c1(x.permute(0, 3, 4, 1, 2).reshape(H * W, 2, D)).reshape(1, H, W, 3, -1).permute(0, 3, 4, 1, 2)
    torch.testing.assert_close(cd(x), along_d, rtol=1e-5, atol=1e-5)


@hsettings
@given(st.floats(0.05, 0.9), st.integers(1, 3))
def test_dropconnect_expectation(p, ndim):
    "Whole samples are dropped with probability p; survivors are scaled by 1/(1-p), so the mean is preserved"
    dc = DropConnect(p).train()
    x = torch.ones(20000, 2, *([2] * ndim))
    y = dc(x).flatten(1)
    kept = torch.isclose(y, torch.tensor(1 / (1 - p)), rtol=1e-6).all(1)
    assert (kept | (y == 0).all(1)).all()
    n = len(x)
    assert abs(kept.float().mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    assert abs(y.mean().item() - 1) < 5 * math.sqrt(p / (1 - p) / n) + 1e-6
    assert torch.equal(dc.eval()(x), x)


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_dropconnect_rejects(p):
    with pytest.raises(ValueError, match=r"`p` must be a number in \[0, 1\)"):
        DropConnect(p)


@hsettings
@given(
    st.integers(1, 3),
    st.integers(1, 24),
    st.integers(1, 24),
    st.sampled_from([1, 2, 3, 4, 5]),
    st.integers(1, 2),
    st.sampled_from([1, 3, 6]),
    st.sampled_from([0.0, 0.25]),
    st.booleans(),
    st.integers(1, 7),
)
def test_block_shapes(ndim, n_inp, n_out, k, stride, expand, se, id_skip, sz):
    blk = MBConvBlock(n_inp, n_out, k, stride, se, id_skip, expand, ndim=ndim).eval()
    out = blk(torch.randn(2, n_inp, *([sz] * ndim)))
    assert out.shape == (2, n_out, *([math.ceil(sz / stride)] * ndim))
    assert blk.has_skip == (id_skip and stride == 1 and n_inp == n_out)
    assert ("expand" in blk._modules) == (expand != 1)
    if se:
        assert blk.se.reduce.out_channels == max(1, int(n_inp * se))


@hsettings
@given(st.integers(1, 2000), st.floats(0.1, 5.0), st.sampled_from([4, 8, 16]))
def test_round_filters_matches_reference(filters, width, divisor):
    "Channel rounding equals efficientnet-pytorch's `round_filters` (the port of the TF reference)"
    from efficientnet_pytorch.utils import round_filters as ref, GlobalParams

    gp = GlobalParams(width_coefficient=width, depth_divisor=divisor, min_depth=None)
    assert round_filters(filters, width, divisor) == ref(filters, gp)
    assert round_filters(filters, width, divisor) >= 0.9 * filters * width


@hsettings
@given(st.integers(1, 10), st.floats(0.1, 6.0))
def test_round_repeats_matches_reference(repeats, depth):
    from efficientnet_pytorch.utils import round_repeats as ref, GlobalParams

    assert round_repeats(repeats, depth) == ref(repeats, GlobalParams(depth_coefficient=depth))


@pytest.mark.parametrize("ndim", [1, 2, 3])
@pytest.mark.parametrize("sz", [1, 7, 16])
def test_model_any_size(ndim, sz):
    "Any input size >= 1 goes through (a 1-voxel volume, an odd size, a 16-frame clip)"
    m = EfficientNet(ni=2, num_classes=3, width_coefficient=0.25, depth_coefficient=0.3, ndim=ndim).eval()
    assert m(torch.randn(1, 2, *([sz] * ndim))).shape == (1, 3)


def test_drop_connect_ramp():
    "The drop-connect rate grows linearly with the global block index, as in the reference"
    m = efficientnet_b2(ndim=2, drop_connect_rate=0.3)
    blocks = [b for s in m.stages for b in s]
    for i, b in enumerate(blocks):
        if b.has_skip:
            assert b.drop_connect.p == pytest.approx(0.3 * i / len(blocks))
