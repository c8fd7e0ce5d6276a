"""Hardening: every call either works or raises a clear ValueError/TypeError that names the argument; determinism;
low-precision numerics.

The hypothesis tests draw constructor arguments and input shapes from the ranges the layers support (and from bad
values that must be refused by name). `EDGE_CASES` lists calls that once failed with an internal error from deep inside
torch; each must now raise a clear error naming the argument."""

import math
import pytest, torch
from torch import nn
from hypothesis import given, settings, strategies as st, HealthCheck
from fastai.layers import NormType
from effnet_fastai.layers import *
from effnet_fastai.blocks import *
from effnet_fastai.model import *
from effnet_fastai.factories import *

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
BN_LIMIT = "more than 1 value per channel"  # torch's BatchNorm error: a batch of one value per channel in training


def ceil_div(a, b):
    return -(-a // b)


def per_axis(draw, ndim, lo, hi):
    "An int, or a tuple of `ndim` ints, in [lo, hi]"
    return draw(st.one_of(st.integers(lo, hi), st.tuples(*[st.integers(lo, hi)] * ndim)))


def check_clear(e, *names):
    "`e` is a ValueError/TypeError whose message names one of `names` in backticks"
    assert isinstance(e, (ValueError, TypeError)), f"internal error instead of a clear one: {type(e).__name__}: {e}"
    assert any(f"`{n}`" in str(e) or f" {n}=" in str(e) for n in names), f"message does not name {names}: {e}"


# ---------------------------------------------------------------- ConvLayerDynamicPadding
@st.composite
def conv_case(draw):
    ndim = draw(st.integers(1, 3))
    g = draw(st.sampled_from([1, 1, 2, 3]))
    ni, nf = g * draw(st.integers(1, 3)), g * draw(st.integers(1, 3))
    kw = dict(
        ks=per_axis(draw, ndim, 1, 5),
        stride=per_axis(draw, ndim, 1, 3),
        dilation=draw(st.integers(1, 2)),
        groups=g,
        padding=draw(st.sampled_from([0, "same", "symmetric"])),
        transpose=draw(st.booleans()),
        norm_type=draw(st.sampled_from([NormType.Batch, NormType.Instance, None])),
        ndim=ndim,
    )
    if kw["transpose"]:
        kw.update(padding="same", groups=1, dilation=1)
    sz = draw(st.tuples(*[st.integers(1, 9)] * ndim))
    return ni, nf, kw, draw(st.integers(1, 3)), sz, draw(st.booleans())


@SETTINGS
@given(conv_case())
def test_conv_layer_shapes(case):
    ni, nf, kw, bs, sz, train = case
    layer = ConvLayerDynamicPadding(ni, nf, **kw).train(train)
    x = torch.randn(bs, ni, *sz)
    try:
        y = layer(x)
    except ValueError as e:  # BatchNorm (train) needs 2 values per channel; InstanceNorm 2 per sample
        assert BN_LIMIT in str(e)
        return
    stride = to_tuple(kw["stride"], kw["ndim"], "stride")
    if kw["transpose"]:
        test = tuple(s * st_ for s, st_ in zip(sz, stride))
    elif kw["padding"] == "symmetric":
        test = None  # depends on the kernel parity: only the batch and channels are fixed
    else:
        test = tuple(ceil_div(s, st_) for s, st_ in zip(sz, stride))  # SAME: ceil(in / stride), any size, any kernel
    assert y.shape[:2] == (bs, nf) and (test is None or tuple(y.shape[2:]) == test)
    assert torch.isfinite(y).all()


BAD_CONV = [
    ("ni", dict(ni=0)),
    ("ni", dict(ni=-2)),
    ("nf", dict(nf=0)),
    ("ks", dict(ks=0)),
    ("ks", dict(ks=(3, 3, 3, 3))),
    ("ks", dict(ks=2.5)),
    ("stride", dict(stride=0)),
    ("stride", dict(stride=None)),
    ("dilation", dict(dilation=0)),
    ("groups", dict(groups=3)),
    ("padding", dict(padding="full")),
    ("ndim", dict(ndim=4)),
    ("ndim", dict(ndim=0)),
    ("padding", dict(transpose=True, padding="symmetric")),
]


@SETTINGS
@given(st.sampled_from(BAD_CONV), st.integers(1, 3))
def test_conv_layer_bad_args(bad, ndim):
    name, kw = bad
    args = {**dict(ni=4, nf=4, ndim=ndim), **kw}
    with pytest.raises(Exception) as e:
        ConvLayerDynamicPadding(**args)
    check_clear(e.value, name, "ni", "nf")


# ---------------------------------------------------------------- MBConvBlock
@st.composite
def block_case(draw):
    ndim = draw(st.integers(1, 3))
    return (
        dict(
            n_inp=draw(st.integers(1, 8)),
            n_out=draw(st.integers(1, 8)),
            kernel_size=draw(st.sampled_from([1, 3, 5])),
            stride=per_axis(draw, ndim, 1, 2),
            se_ratio=draw(st.sampled_from([0, 0.25, 1.0])),
            id_skip=draw(st.booleans()),
            expand_ratio=draw(st.integers(1, 4)),
            drop_connect_rate=draw(st.sampled_from([0.0, 0.3])),
            ndim=ndim,
            padding=draw(st.sampled_from(["same", "symmetric"])),
        ),
        draw(st.integers(1, 3)),
        draw(st.tuples(*[st.integers(1, 7)] * ndim)),
        draw(st.booleans()),
    )


@SETTINGS
@given(block_case())
def test_mbconv_shapes(case):
    kw, bs, sz, train = case
    b = MBConvBlock(**kw).train(train)
    x = torch.randn(bs, kw["n_inp"], *sz)
    try:
        y = b(x)
    except ValueError as e:
        assert BN_LIMIT in str(e) and train
        return
    stride = to_tuple(kw["stride"], kw["ndim"], "stride")
    assert y.shape[:2] == (bs, kw["n_out"])
    if kw["padding"] == "same":
        assert tuple(y.shape[2:]) == tuple(ceil_div(s, t) for s, t in zip(sz, stride))
    assert b.has_skip == (kw["id_skip"] and all(s == 1 for s in stride) and kw["n_inp"] == kw["n_out"])
    assert torch.isfinite(y).all()


BAD_BLOCK = [
    ("expand_ratio", dict(expand_ratio=0)),
    ("se_ratio", dict(se_ratio=1.5)),
    ("se_ratio", dict(se_ratio=-0.1)),
    ("ks", dict(kernel_size=0)),
    ("stride", dict(stride=0)),
    ("stride", dict(stride=(1, 1, 1, 1))),
    ("ndim", dict(ndim=5)),
    ("p", dict(drop_connect_rate=1.0)),
    ("ni", dict(n_inp=0)),
]


@SETTINGS
@given(st.sampled_from(BAD_BLOCK))
def test_mbconv_bad_args(bad):
    name, kw = bad
    args = {
        **dict(n_inp=4, n_out=4, kernel_size=3, stride=1, se_ratio=0.25, id_skip=True, expand_ratio=2, ndim=2),
        **kw,
    }
    with pytest.raises(Exception) as e:
        MBConvBlock(**args)
    check_clear(e.value, name)


# ---------------------------------------------------------------- EfficientNet
def tiny(**kw):
    return EfficientNet(**{**dict(width_coefficient=0.1, depth_coefficient=0.1, ndim=2, ni=1, num_classes=3), **kw})


@st.composite
def net_case(draw):
    ndim = draw(st.integers(1, 3))
    hi = {1: 80, 2: 40, 3: 12}[ndim]
    kw = dict(
        ndim=ndim,
        ni=draw(st.integers(1, 4)),
        num_classes=draw(st.integers(0, 5)),
        width_coefficient=draw(st.floats(0.05, 0.3)),
        depth_coefficient=draw(st.floats(0.05, 0.3)),
        stem_stride=draw(st.integers(1, 2)),
        padding=draw(st.sampled_from(["same", "symmetric"])),
        drop_connect_rate=draw(st.sampled_from([0.0, 0.2])),
    )
    return kw, draw(st.integers(1, 2)), draw(st.tuples(*[st.integers(1, hi)] * ndim)), draw(st.booleans())


@SETTINGS
@given(net_case())
def test_efficientnet_shapes(case):
    kw, bs, sz, train = case
    m = EfficientNet(**kw).train(train)
    x = torch.randn(bs, kw["ni"], *sz)
    try:
        y = m(x)
    except ValueError as e:
        # BatchNorm's limit: training on a single sample whose last feature map is a single voxel
        last = [ceil_div(s, kw["stem_stride"] * 16) for s in sz]
        assert train and bs == 1 and math.prod(last) == 1 and BN_LIMIT in str(e), str(e)
        return
    assert y.shape == (bs, kw["num_classes"] or m.num_features)
    assert torch.isfinite(y).all()


def test_batch_of_one_in_training():
    "BatchNorm's limit, said clearly: one sample whose last feature map is one voxel cannot train; eval works"
    m = tiny()
    with pytest.raises(ValueError, match=BN_LIMIT):
        m.train()(torch.randn(1, 1, 32, 32))
    assert m.train()(torch.randn(1, 1, 33, 33)).shape == (1, 3)  # 2x2 last feature map: 4 values per channel
    assert m.train()(torch.randn(2, 1, 1, 1)).shape == (2, 3)  # two samples of one pixel
    assert m.eval()(torch.randn(1, 1, 1, 1)).shape == (1, 3)  # eval: any size


BAD_NET = [
    ("ndim", dict(ndim=4)),
    ("ni", dict(ni=0)),
    ("ni", dict(ni=2.0)),
    ("num_classes", dict(num_classes=-1)),
    ("width_coefficient", dict(width_coefficient=0)),
    ("width_coefficient", dict(width_coefficient=float("nan"))),
    ("depth_coefficient", dict(depth_coefficient=-1)),
    ("dropout_rate", dict(dropout_rate=1.0)),
    ("drop_connect_rate", dict(drop_connect_rate=-0.1)),
    ("strides", dict(strides=[1, 2])),
    ("kernels", dict(kernels=[3] * 6)),
    ("stride", dict(stem_stride=0)),
    ("ks", dict(kernels=[0] * 7)),
    ("padding", dict(padding="circular")),
]


@SETTINGS
@given(st.sampled_from(BAD_NET))
def test_efficientnet_bad_args(bad):
    name, kw = bad
    with pytest.raises(Exception) as e:
        tiny(**kw)
    check_clear(e.value, name)


@pytest.mark.parametrize(
    "shape,name", [((2, 1, 8), "ndim"), ((2, 1, 8, 8, 8), "ndim"), ((2, 3, 8, 8), "ni"), ((8, 8), "ndim")]
)
def test_efficientnet_bad_inputs(shape, name):
    with pytest.raises(ValueError, match=f"EfficientNet\\({name}="):
        tiny().eval()(torch.randn(shape))


# Calls that once raised an internal error (ZeroDivisionError, IndexError, a RuntimeError in forward, ...)
EDGE_CASES = {
    "conv groups=0 (ZeroDivisionError)": ("groups", lambda: ConvLayerDynamicPadding(4, 4, groups=0, ndim=2)),
    'conv ni="3" (TypeError without a name)': ("ni", lambda: ConvLayerDynamicPadding("3", 4, ndim=2)),
    'conv ks="a" (int() ValueError)': ("ks", lambda: ConvLayerDynamicPadding(2, 4, ks="a", ndim=2)),
    "conv padding=-1 (RuntimeError in forward)": ("padding", lambda: ConvLayerDynamicPadding(2, 4, padding=-1, ndim=2)),
    "block expand_ratio=1.5 (torch.empty)": ("expand_ratio", lambda: MBConvBlock(4, 4, 3, 1, 0.25, True, 1.5, ndim=2)),
    "net depth_divisor=0 (ZeroDivisionError)": ("depth_divisor", lambda: tiny(depth_divisor=0)),
    "net width_coefficient=inf (OverflowError)": ("width_coefficient", lambda: tiny(width_coefficient=float("inf"))),
    'net width_coefficient="1" (TypeError)': ("width_coefficient", lambda: tiny(width_coefficient="1")),
    "net block_spec=[] (IndexError)": ("block_spec", lambda: tiny(block_spec=[])),
    "net block_spec bad string (AttributeError)": ("block_spec", lambda: tiny(block_spec=["r1_kx_s1_e1_i32_o16"])),
    "net padding='valid' (RuntimeError in forward)": (
        "padding",
        lambda: tiny(padding="valid")(torch.randn(2, 1, 8, 8)),
    ),
    "net input with an empty axis (RuntimeError)": ("x", lambda: tiny().eval()(torch.randn(2, 1, 0, 8))),
    "net integer input (RuntimeError)": ("x", lambda: tiny().eval()(torch.ones(2, 1, 8, 8, dtype=torch.long))),
    "net drop_connect_rate='a' (bare comparison TypeError)": ("drop_connect_rate", lambda: tiny(drop_connect_rate="a")),
    "net dropout_rate=None (bare comparison TypeError)": ("dropout_rate", lambda: tiny(dropout_rate=None)),
    "block se_ratio='0.25' (bare comparison TypeError)": (
        "se_ratio",
        lambda: MBConvBlock(4, 4, 3, 1, "0.25", True, 1, ndim=2),
    ),
    "DropConnect p='0.2' (bare comparison TypeError)": ("p", lambda: DropConnect("0.2")),
    "net block_spec stride 's22' (read as 22)": ("block_spec", lambda: tiny(block_spec=["r1_k3_s2222_e1_i32_o16"])),
}


@pytest.mark.parametrize("name,fn", list(EDGE_CASES.values()), ids=list(EDGE_CASES))
def test_edge_cases_are_clear(name, fn):
    with pytest.raises(Exception) as e:
        fn()
    check_clear(e.value, name, "block_spec" if name == "block_spec" else name, "EfficientNet")


@pytest.mark.parametrize(
    "make",
    [lambda: tiny(), lambda: MBConvBlock(4, 4, 3, 1, 0.25, True, 2, ndim=2)],
    ids=["EfficientNet", "MBConvBlock"],
)
def test_slicing(make):
    m = make()
    assert len(m[:2]) == 2 and isinstance(m[:2], nn.Sequential)


def test_batch_of_one_message():
    with pytest.raises(ValueError, match="batch size"):
        tiny().train()(torch.randn(1, 1, 8, 8))


# ---------------------------------------------------------------- determinism
def small3d(**kw):
    return efficientnet_b0(ni=1, num_classes=4, ndim=3, width_coefficient=0.25, depth_coefficient=0.2, **kw)


def test_same_seed_same_init():
    torch.manual_seed(7)
    a = small3d()
    torch.manual_seed(7)
    b = small3d()
    torch.manual_seed(8)
    c = small3d()
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["stem.0.weight"], sc["stem.0.weight"])


def test_same_seed_same_outputs_train():
    "Training mode is random (dropout, drop-connect) but reproducible from the seed"
    torch.manual_seed(0)
    m = small3d(dropout_rate=0.5, drop_connect_rate=0.5).train()
    x = torch.randn(2, 1, 12, 12, 12)
    outs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        outs.append(m(x))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


def test_eval_deterministic():
    torch.manual_seed(0)
    m = small3d(dropout_rate=0.5, drop_connect_rate=0.5).eval()
    x = torch.randn(3, 1, 11, 12, 13)
    with torch.no_grad():
        y1, y2 = m(x), m(x)
        torch.testing.assert_close(m(x[1:2]), y1[1:2], atol=1e-5, rtol=1e-4)  # a sample's output ignores the batch
    assert torch.equal(y1, y2)


def test_deterministic_algorithms():
    "Forward and backward use no nondeterministic kernel (torch.use_deterministic_algorithms raises on those)"
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        grads = []
        for _ in range(2):
            torch.manual_seed(0)
            m = small3d(dropout_rate=0.0, drop_connect_rate=0.0).train()
            m(torch.randn(2, 1, 10, 10, 10)).sum().backward()
            grads.append(m.stem[0].weight.grad)
        assert torch.equal(grads[0], grads[1])
    finally:
        torch.use_deterministic_algorithms(old)


# ---------------------------------------------------------------- numerics
def _amp_supported(dtype):
    try:
        with torch.autocast("cpu", dtype=dtype):
            return nn.Conv2d(1, 1, 1)(torch.randn(1, 1, 2, 2)).dtype == dtype
    except Exception:
        return False


@pytest.mark.parametrize(
    "dtype", [torch.bfloat16, pytest.param(torch.float16, marks=pytest.mark.slow)], ids=["bf16", "fp16"]
)
@pytest.mark.parametrize("ndim,shape", [(2, (2, 3, 40, 40)), (3, (2, 1, 12, 40, 40))], ids=["2d", "3d"])
def test_autocast_finite(ndim, shape, dtype):
    """b0 trains a step under CPU autocast on realistic (normalised) inputs: no NaN/Inf in outputs, loss or gradients.
    The last feature map is 2x2 (x1 in 3D): BatchNorm over a batch of 2 single voxels is degenerate (fp16 overflows
    in its backward without a GradScaler), which is no realistic training setting. Slow on the CPU: torch runs
    reduced-precision depthwise convolutions one channel at a time (`_slow_conv2d`), hence the small inputs."""
    if not _amp_supported(dtype):
        pytest.skip(f"CPU autocast to {dtype} not supported by this torch")
    torch.manual_seed(0)
    m = efficientnet_b0(ni=shape[1], num_classes=5, ndim=ndim).train()
    x, t = torch.randn(shape), torch.tensor([1, 3])
    with torch.autocast("cpu", dtype=dtype):
        y = m(x)
        loss = nn.functional.cross_entropy(y, t)
    assert y.dtype == dtype and torch.isfinite(y).all() and torch.isfinite(loss)
    loss.backward()
    bad = [n for n, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite or missing gradients: {bad[:5]}"
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        assert torch.isfinite(m.eval()(x)).all()


def test_public_names_are_unique():
    "`from effnet_fastai import *` gives each name once, and each is the object of the one module that defines it"
    import effnet_fastai

    names = effnet_fastai.__all__
    assert len(names) == len(set(names)), sorted({n for n in names if names.count(n) > 1})
    import importlib, pkgutil

    mods = [importlib.import_module(f"effnet_fastai.{o.name}") for o in pkgutil.iter_modules(effnet_fastai.__path__)]
    mods = [m for m in mods if hasattr(m, "__all__")]
    for n in names:
        owners = [m for m in mods if n in m.__all__]
        assert len(owners) == 1 and getattr(effnet_fastai, n) is getattr(owners[0], n), (n, owners)
