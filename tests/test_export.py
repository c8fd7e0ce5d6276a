"""Deployment paths of the full b0 in 1D, 2D and 3D (small inputs): outputs equal to eager to 1e-4 for `torch.jit.trace`,
`torch.export`, ONNX under onnxruntime with other batch and spatial sizes than exported (1e-5), the U-Net and a clip
model exported once for any size, and the `fuse`d model."""

import warnings
import pytest, torch
from torch import nn
from effnet_fastai.layers import *
from effnet_fastai.model import *
from effnet_fastai.factories import *
from effnet_fastai.export import *
from effnet_fastai.unet import efficientnet_unet
from effnet_fastai.video import VIDEO_KWARGS

warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
warnings.filterwarnings("ignore", category=FutureWarning, module="torch")
SHAPES = {
    1: (301,),
    2: (37, 30),
    3: (9, 20, 41),
}  # odd sizes: strided convs pad asymmetrically on some axes; one axis > 32


def calibrate(m, x):
    "Random affine BatchNorm parameters and the running statistics of batch `x`, as in a trained network; eval mode"
    for o in m.modules():
        if isinstance(o, nn.modules.batchnorm._BatchNorm):
            o.weight.data.uniform_(0.5, 1.5)
            o.bias.data.uniform_(-0.2, 0.2)
    return calibrate_bn_(m, x)


@pytest.fixture(scope="module", params=[1, 2, 3], ids=["1d", "2d", "3d"])
def case(request):
    "A calibrated b0 (ni=1, 4 classes), an input, its eager output, and inputs of other batch sizes"
    ndim = request.param
    sz = SHAPES[ndim]
    g = torch.Generator().manual_seed(ndim)
    torch.manual_seed(ndim)  # the same model whichever tests run
    m = calibrate(efficientnet_b0(ni=1, num_classes=4, ndim=ndim), torch.randn(12, 1, *sz, generator=g))
    x, xb = torch.randn(2, 1, *sz, generator=g), torch.randn(5, 1, *sz, generator=g)
    with torch.no_grad():
        y, yb = m(x), m(xb)
    assert (y[0] - y[1]).abs().max() > 1e-2 and y.abs().max() < 1e3  # input-dependent, of reasonable size
    return m, x, y, xb, yb


def close(a, b, eps=1e-4):
    "Equal to `eps` relative to the largest reference logit (the metric of the equivalence tests): an element-wise"
    "relative bound is ill-posed for logits near zero, and ONNX Runtime's kernels round differently from torch's"
    assert a.shape == b.shape, (a.shape, b.shape)
    err = ((a - b).abs().max() / b.abs().max()).item()
    assert err < eps, f"max |diff| / max |ref| = {err:.2e} (limit {eps})"


def test_trace(case):
    m, x, y, xb, yb = case
    with torch.no_grad():
        tr = torch.jit.trace(m, x, check_trace=False)
        close(tr(x), y)
        close(tr(xb), yb)


def test_script_is_not_supported(case):
    "Documented in nbs/09_export.ipynb: TorchScript rejects the Python our layers use (use torch.export instead)"
    with pytest.raises(Exception, match="not supported|Arguments for call are not valid"):
        torch.jit.script(case[0])


@pytest.fixture(scope="module")
def program(case):
    m, x, *_ = case
    return export_program(m, x)


def test_torch_export(case, program):
    m, x, y, xb, yb = case
    with torch.no_grad():
        close(program.module()(x), y)
        close(program.module()(xb), yb)
    assert not m.training


@pytest.mark.parametrize("extra", [(0, 1), (7, -3), (-8, 11)])
def test_torch_export_other_sizes(case, program, extra):
    "The program exported once runs other spatial sizes (odd, even, smaller than the total stride on an axis)"
    m, x, *_ = case
    sz = [max(1, s + e) for s, e in zip(x.shape[2:], extra * 2)]
    xs = torch.randn(3, 1, *sz, generator=torch.Generator().manual_seed(sum(sz)))
    with torch.no_grad():
        close(program.module()(xs), m(xs), 1e-5)


def test_torch_export_tiny_sizes(case, program):
    "Sizes no larger than the total stride (32) along every axis, a single voxel included"
    m, x, *_ = case
    for sz in (8, 1, 31):
        xs = torch.randn(2, 1, *(sz,) * (x.ndim - 2))
        with torch.no_grad():
            close(program.module()(xs), m(xs), 1e-5)


def test_small_example(case):
    "Any example gives a program of any size: a batch of one no larger than the total stride along every axis"
    m, x, *_ = case
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fallback to fixed spatial axes
        ep = export_program(m, torch.randn(1, 1, *(16,) * (x.ndim - 2)))
    for xs in (x, torch.randn(3, 1, *(1,) * (x.ndim - 2)), torch.randn(2, 1, *(8, 64, 5)[: x.ndim - 2])):
        with torch.no_grad():
            close(ep.module()(xs), m(xs), 1e-5)


def test_program_bad_input(case, program):
    "Wrong channels, rank or size fail before any computation, naming what was expected"
    m, x, *_ = case
    bad = torch.randn(2, 3, *x.shape[2:])
    with pytest.raises(ValueError, match="expects 1 input channels, got 3"):
        m(bad)
    with pytest.raises(AssertionError, match=r"x.size\(\)\[1\] == 1"):
        program.module()(bad)
    with pytest.raises(RuntimeError, match="shape\\[1\\] to be equal to 1, but got 3"):
        program.module(check_guards=False)(bad)
    with pytest.raises(RuntimeError, match="Unexpected number of dimensions"):
        program.module(check_guards=False)(x[:, 0])
    with pytest.raises(AssertionError, match="<= 65536"):
        program.module()(torch.randn(1, 1, *(70000,) + (1,) * (x.ndim - 3)))


def test_saved_program_any_size(case, program, tmp_path):
    "`torch.export.save`/`load` keep the program free of guards other than its input's"
    m, x, *_ = case
    assert program._guards_code == []
    torch.export.save(program, tmp_path / "m.pt2")
    ep = torch.export.load(tmp_path / "m.pt2")
    xs = torch.randn(2, 1, *(8,) * (x.ndim - 2))
    with torch.no_grad():
        close(ep.module()(xs), m(xs), 1e-5)


@pytest.fixture(scope="module")
def onnx_session(case, tmp_path_factory):
    "The case's model exported to ONNX once, in an onnxruntime session"
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    m, x, *_ = case
    f = export_onnx(m, tmp_path_factory.mktemp("onnx") / "m.onnx", x)
    return ort.InferenceSession(str(f), providers=["CPUExecutionProvider"])


def test_onnx_runtime(case, onnx_session):
    m, x, y, xb, yb = case
    sess = onnx_session
    assert sess.get_inputs()[0].shape[0] == "batch"
    for inp, out in ((xb, yb), (xb[:1], yb[:1])):  # batch 5 and 1; exported with batch 2
        close(torch.from_numpy(sess.run(None, {"input": inp.numpy()})[0]), out)
    for sz in (
        (5, 3, 7)[: x.ndim - 2],
        (1, 1, 1)[: x.ndim - 2],
        (40, 8, 33)[: x.ndim - 2],
    ):  # other sizes, one voxel too
        xs = torch.randn(2, 1, *sz)
        with torch.no_grad():
            close(torch.from_numpy(sess.run(None, {"input": xs.numpy()})[0]), m(xs), 1e-5)


def test_onnx_bad_input(case, onnx_session):
    "onnxruntime refuses wrong channels or rank, naming the axis or the rank it expected"
    m, x, *_ = case
    sess = onnx_session
    with pytest.raises(Exception, match="index: 1 Got: 3 Expected: 1"):
        sess.run(None, {"input": torch.randn(2, 3, *x.shape[2:]).numpy()})
    with pytest.raises(Exception, match="Invalid rank"):
        sess.run(None, {"input": x[:, 0].numpy()})


def test_fuse(case):
    m, x, y, xb, yb = case
    fm = fuse(m)
    assert not any(isinstance(o, nn.modules.batchnorm._BatchNorm) for o in fm.modules())
    n_bn = sum(isinstance(o, nn.modules.batchnorm._BatchNorm) for o in m.modules())
    n_id = sum(isinstance(o, nn.Identity) for o in fm.modules()) - sum(isinstance(o, nn.Identity) for o in m.modules())
    assert n_bn > 0 and n_id == n_bn  # every BatchNorm of b0 follows a conv and was folded
    with torch.no_grad():
        close(fm(x), y)
        close(fm(xb), yb)
    assert type(fm.stage2[0].depthwise[0]) is type(m.stage2[0].depthwise[0])
    try:
        with pytest.raises(ValueError, match="training mode"):
            fuse(m.train())
    finally:
        m.eval()


def test_fuse_inplace_and_keys():
    m = efficientnet_b0(ni=1, num_classes=2, ndim=2, width_coefficient=0.1, depth_coefficient=0.1).eval()
    keys = set(m.state_dict())
    fm = fuse(m, inplace=True)
    assert fm is m
    new = set(fm.state_dict())
    assert "stem.0.bias" in new and "stem.1.running_mean" not in new and "stem.0.weight" in keys & new


def test_fold_bn_transposed():
    "The folding also covers transposed convolutions (and our `TransposeSame` wrapper)"
    layer = ConvLayerDynamicPadding(3, 5, 3, stride=2, ndim=2, transpose=True).eval()
    layer[1].running_mean.uniform_(-1, 1)
    layer[1].running_var.uniform_(0.5, 2)
    layer[1].bias.data.uniform_(-1, 1)
    x = torch.randn(2, 3, 5, 6)
    with torch.no_grad():
        close(fuse(layer)(x), layer(x), 1e-5)


def test_legacy_onnx_exporter_asymmetric_padding(tmp_path):
    "The TorchScript-based exporter used to pad asymmetric SAME convs wrongly (a `max` on the traced size became a"
    "constant); with the padding as plain integer arithmetic it records it right"
    ort = pytest.importorskip("onnxruntime")
    c, x = Conv2dSame(2, 2, 3, stride=2).eval(), torch.randn(1, 2, 2, 3)
    torch.onnx.export(c, (x,), str(tmp_path / "c.onnx"), input_names=["input"], dynamo=False)
    out = ort.InferenceSession(str(tmp_path / "c.onnx")).run(None, {"input": x.numpy()})[0]
    close(torch.from_numpy(out), c(x).detach())


UNET_SIZES = ((2, 1, 24, 40, 36), (1, 1, 17, 33, 45), (1, 1, 5, 7, 64), (2, 1, 8, 8, 8))


@pytest.mark.slow
def test_unet_program_any_size():
    "The 3D U-Net exports once from a batch of one and runs other batches and sizes, odd ones included"
    torch.manual_seed(0)
    u = calibrate(efficientnet_unet("b0", n_out=2, ni=1), torch.randn(4, 1, 24, 40, 36))
    ep = export_program(u, torch.randn(1, 1, 24, 40, 36))
    for sz in UNET_SIZES:
        x = torch.randn(*sz)
        with torch.no_grad():
            y = u(x)
            assert ep.module()(x).shape == y.shape
            close(ep.module()(x), y, 1e-5)


@pytest.mark.slow
def test_unet_onnx_any_size(tmp_path):
    "The 3D U-Net goes to ONNX once, from a batch of one, and runs other batches and sizes under onnxruntime"
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    u = calibrate(efficientnet_unet("b0", n_out=2, ni=1), torch.randn(4, 1, 24, 40, 36))
    sess = ort.InferenceSession(str(export_onnx(u, tmp_path / "u.onnx", torch.randn(1, 1, 24, 40, 36))))
    for sz in UNET_SIZES:
        x = torch.randn(*sz)
        with torch.no_grad():
            close(torch.from_numpy(sess.run(None, {"input": x.numpy()})[0]), u(x), 1e-5)


@pytest.mark.slow
def test_clip_onnx_any_size(tmp_path):
    "A 16-frame clip model (`VIDEO_KWARGS`) exports to ONNX once and runs other frame counts and sizes"
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    g = torch.Generator().manual_seed(0)
    v = calibrate(efficientnet_b0(ni=3, num_classes=5, **VIDEO_KWARGS), torch.randn(4, 3, 16, 64, 64, generator=g))
    sess = ort.InferenceSession(str(export_onnx(v, tmp_path / "v.onnx", torch.randn(1, 3, 16, 64, 64, generator=g))))
    for sz in ((2, 3, 16, 64, 64), (1, 3, 8, 112, 112), (1, 3, 16, 32, 48)):
        x = torch.randn(*sz, generator=g)
        with torch.no_grad():
            close(torch.from_numpy(sess.run(None, {"input": x.numpy()})[0]), v(x), 1e-5)
