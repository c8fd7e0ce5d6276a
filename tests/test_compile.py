"""The speed paths as custom operators (issue 15): registrations checked by `torch.library.opcheck`, kept whole by
`torch.compile` (fullgraph, dynamic shapes), bfloat16 gradients within the stock bfloat16 path's error of the float64
reference, double backward, and plain layers for tracing and export."""

import copy, warnings
import pytest, torch, torch.nn as nn, torch.nn.functional as F
import torch._dynamo.testing

warnings.filterwarnings("ignore", message=".*torch.jit.script.*")
from effnet_fastai.blocks import MBConvBlock
from effnet_fastai.model import EfficientNet
from effnet_fastai.fast import (
    batch_norm_silu,
    batch_norm_silu_backward,
    depthwise_conv,
    depthwise_conv_backward,
    fast_depthwise,
    lean_bn_act,
    set_speed_paths,
)

OPS = ("effnet_fastai.depthwise_conv", "effnet_fastai.batch_norm_silu")


def tiny(ndim=3, ni=1):
    "A b0-shaped network with one block per stage: every layer type of the speed paths, a small graph to compile"
    return EfficientNet(
        ni=ni,
        num_classes=3,
        ndim=ndim,
        width_coefficient=0.25,
        depth_coefficient=0.1,
        drop_connect_rate=0.0,
        dropout_rate=0.0,
    )


def compiled_pair(ndim, shape, **kw):
    "`(m, ref, x, cm)`: a tiny model, its copy on the reference layers, an input, and `m` compiled with `kw` (fullgraph)"
    torch._dynamo.reset()
    m, x = tiny(ndim, shape[1]), torch.randn(shape)
    return m, copy.deepcopy(m).set_speed_paths(False), x, torch.compile(m, fullgraph=True, **kw)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def assert_same_grads(m, ref, tol=1e-4):
    "Every parameter gradient of `m` equals `ref`'s to `tol` of the largest gradient, and the buffers agree"
    scale = max(p.grad.abs().max() for p in ref.parameters())
    for (n, a), b in zip(m.named_parameters(), ref.parameters()):
        assert (a.grad - b.grad).abs().max() <= tol * scale, n
    for (n, a), b in zip(m.named_buffers(), ref.buffers()):
        assert torch.allclose(a.float(), b.float(), rtol=tol, atol=tol / 10), n


def n_fast_dw(m):
    return sum(getattr(l, "fast_dw", False) for l in m.modules())


class Recorder:
    "A `torch.compile` backend (aot_eager: no code generation) that keeps the operators of the graphs it is given"

    def __init__(self):
        self.targets, self.graphs = [], 0

    def __call__(self, gm, inputs):
        self.graphs += 1
        self.targets += [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
        return torch._dynamo.lookup_backend("aot_eager")(gm, inputs)

    def count(self, op):
        return sum(t.startswith(op) for t in self.targets)


# ------------------------------------------------------------ registrations
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape,ks", [((2, 3, 5, 6, 4), (3, 3, 3)), ((2, 4, 9, 8), (5, 3)), ((3, 2, 11), (5,))])
def test_opcheck_depthwise(dtype, shape, ks):
    "Schema, fake implementation, autograd registration and AOT dispatch (static and dynamic) of both operators"
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    w = torch.randn(shape[1], 1, *ks, dtype=dtype, requires_grad=True)
    pad = [k // 2 for k in ks]
    torch.library.opcheck(depthwise_conv, (x, w, pad))
    torch.library.opcheck(depthwise_conv, (x.detach(), w, pad))  # frozen input: the weight's gradient only
    g = torch.randn(shape, dtype=dtype)
    for mask in ([True, True], [True, False], [False, True]):
        torch.library.opcheck(depthwise_conv_backward, (g, x.detach(), w.detach(), pad, mask))


@pytest.mark.parametrize(
    "dtype,wdtype",
    [
        (torch.float64, torch.float64),
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.bfloat16, torch.bfloat16),
    ],
)
def test_opcheck_batch_norm_silu(dtype, wdtype):
    "The BatchNorm+SiLU operators, also for a bfloat16 input with float32 parameters (what autocast gives)"
    x = torch.randn(2, 4, 3, 5, 2, dtype=dtype, requires_grad=True)
    w = torch.rand(4, dtype=wdtype, requires_grad=True)
    b = torch.randn(4, dtype=wdtype, requires_grad=True)
    rm, rv = torch.zeros(4, dtype=wdtype), torch.ones(4, dtype=wdtype)
    torch.library.opcheck(batch_norm_silu, (x, w, b, rm, rv, 0.1, 1e-3))
    _, mean, invstd, _, _ = batch_norm_silu(x.detach(), w.detach(), b.detach(), rm, rv, 0.1, 1e-3)
    for mask in ([True, True, True], [True, False, False], [False, True, True]):
        args = (torch.randn_like(x), x.detach(), w.detach(), b.detach(), mean, invstd, 1e-3, mask)
        torch.library.opcheck(batch_norm_silu_backward, args)


def test_lean_bn_act_changes_only_the_buffers_like_batchnorm():
    "The functional operator returns the new running statistics; `lean_bn_act` writes them as `nn.BatchNorm` does"
    bn1, bn2 = nn.BatchNorm3d(5, momentum=0.3).train(), nn.BatchNorm3d(5, momentum=0.3).train()
    x = torch.randn(3, 5, 4, 4, 4) * 2 + 1
    for _ in range(2):
        y1, y2 = F.silu(bn1(x)), lean_bn_act(x, bn2)
    assert torch.allclose(y1, y2, atol=1e-6)
    for (k, a), b in zip(bn1.state_dict().items(), bn2.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-6, atol=1e-7), k


def test_double_backward():
    "A gradient of a gradient (`create_graph=True`) goes through differentiable formulas: gradgradcheck passes for both"
    x = torch.randn(2, 2, 5, 4, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 1, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x, w: fast_depthwise(x, w, (1, 1, 1)), (x, w), fast_mode=True)
    x = torch.randn(2, 3, 4, 3, 5, dtype=torch.float64, requires_grad=True)
    g, b = torch.rand(3, dtype=torch.float64) + 0.5, torch.randn(3, dtype=torch.float64)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    f = lambda x, g, b: batch_norm_silu(x, g, b, rm, rv, 0.1, 1e-3)[0]
    assert torch.autograd.gradgradcheck(f, (x, g.requires_grad_(), b.requires_grad_()), fast_mode=True)


# ------------------------------------------------------------ torch.compile keeps the operators
@pytest.mark.parametrize("ndim,shape", [(3, (2, 1, 17, 15, 16)), (2, (2, 3, 33, 31))])
def test_compile_keeps_the_depthwise_operator(ndim, shape):
    "fullgraph=True captures forward and backward in one graph, with every fast depthwise layer as our operator"
    rec = Recorder()
    m, ref, x, cm = compiled_pair(ndim, shape, backend=rec)
    cm(x).pow(2).sum().backward()
    ref(x).pow(2).sum().backward()
    assert n_fast_dw(m) > 0 and rec.count(OPS[0]) == n_fast_dw(m), (rec.count(OPS[0]), n_fast_dw(m))
    assert rec.count(OPS[1]) == 0  # under compile the lean BatchNorm+SiLU steps aside: inductor recomputes it itself
    assert_same_grads(m, ref)


def test_compile_inference_is_the_reference_graph():
    "Without autograd no operator of ours is in the graph (inductor fuses BatchNorm and SiLU and reuses buffers itself)"
    torch._dynamo.reset()
    m, x = tiny().eval(), torch.randn(2, 1, 17, 15, 16)
    rec = Recorder()
    with torch.no_grad():
        out, ref = torch.compile(m, fullgraph=True, backend=rec)(x), m(x)
    assert rel(out, ref) < 1e-5
    assert not any(rec.count(op) for op in OPS) and rec.targets


def test_compile_dynamic_same_padding():
    "dynamic=True: one graph serves sizes of every parity (SAME pads computed from the symbolic size), train and eval"
    torch._dynamo.reset()
    m = tiny()
    ref = copy.deepcopy(m).set_speed_paths(False)
    cnt = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    cm = torch.compile(m, fullgraph=True, dynamic=True, backend=cnt)
    for s in [(33, 34, 35), (40, 37, 45), (48, 50, 33), (36, 41, 39)]:  # deep maps > 1 voxel: no 0/1 specialisation
        x = torch.randn(2, 1, *s)
        out = cm(x)
        assert out.shape == (2, 3)
        assert rel(out, ref(x)) < 1e-5
        out.sum().backward()
    graphs = cnt.frame_count
    cm(torch.randn(2, 1, 38, 43, 47)).sum().backward()
    assert cnt.frame_count == graphs  # no recompilation for a new size


@pytest.mark.slow
@pytest.mark.parametrize("ndim,shape", [(3, (2, 1, 20, 17, 18)), (2, (2, 3, 33, 31))])
def test_compile_inductor_matches_eager(ndim, shape):
    "The default backend (minutes on 2 cores): inference, and a train step's gradients and BatchNorm statistics"
    m, ref, x, cm = compiled_pair(ndim, shape)
    m.eval()
    ref.eval()
    with torch.no_grad():
        assert rel(cm(x), ref(x)) < 1e-4
    m.train()
    ref.train()
    y = torch.tensor([0, 2])
    F.cross_entropy(cm(x), y).backward()
    F.cross_entropy(ref(x), y).backward()
    assert_same_grads(m, ref, 1e-3)  # (inductor's fused BatchNorm reductions round differently)


# ------------------------------------------------------------ bfloat16
def bf16_errors(f_ours, f_stock, args, dtypes):
    "Gradient errors of ours and of the stock path in bfloat16 against the float64 reference, per input"
    g = torch.Generator().manual_seed(0)
    ref_in = [a.double().requires_grad_() for a in args]
    out = f_stock(*ref_in)
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64)
    ref = torch.autograd.grad(out, ref_in, grad)
    errs = {}
    for name, f in (("ours", f_ours), ("stock", f_stock)):
        inp = [a.to(dt).requires_grad_() for a, dt in zip(args, dtypes)]
        gs = torch.autograd.grad(f(*inp), inp, grad.to(torch.bfloat16))
        errs[name] = [rel(a, b) for a, b in zip(gs, ref)]
    return errs


@pytest.mark.parametrize("C,S,k", [(32, 24, 3), (48, 12, 5), (16, (9, 20), 5)])
def test_bf16_depthwise_gradients_within_stock_error(C, S, k):
    "Input and weight gradients in bfloat16: the stock bfloat16 kernel's error of the float64 reference, or less"
    S = (S,) * 3 if isinstance(S, int) else S
    conv, pad = (F.conv3d, F.conv2d)[3 - len(S)], [k // 2] * len(S)
    x, w = torch.randn(2, C, *S), torch.randn(C, 1, *(k,) * len(S)) * 0.2
    errs = bf16_errors(
        lambda x, w: fast_depthwise(x, w, pad),
        lambda x, w: conv(x, w, None, 1, pad, 1, C),
        (x, w),
        [torch.bfloat16] * 2,
    )
    for o, s in zip(errs["ours"], errs["stock"]):
        assert o <= 1.02 * s, errs
        assert o < 1e-2, errs


def test_bf16_batch_norm_silu_gradients_within_stock_error():
    "BatchNorm+SiLU on a bfloat16 input with float32 parameters: within the stock modules' error of float64"
    torch.manual_seed(0)
    x, w, b = torch.randn(4, 24, 6, 7, 5) * 3 + 1, torch.rand(24) + 0.5, torch.randn(24)
    rm, rv = torch.zeros(24), torch.ones(24)

    def stock(x, w, b):
        return F.silu(F.batch_norm(x, rm.clone().to(w.dtype), rv.clone().to(w.dtype), w, b, True, 0.1, 1e-3))

    def ours(x, w, b):
        return batch_norm_silu(x, w, b, rm.clone(), rv.clone(), 0.1, 1e-3)[0]

    errs = bf16_errors(ours, stock, (x, w, b), [torch.bfloat16, torch.float32, torch.float32])
    for o, s in zip(errs["ours"], errs["stock"]):
        assert o <= 1.1 * s + 1e-4, errs
        assert o < 2e-2, errs


def test_bf16_autocast_block_gradients():
    "An MBConv block trained under CPU bfloat16 autocast: every gradient within the stock path's error of float64"
    torch.manual_seed(0)
    blk = MBConvBlock(16, 16, 5, 1, 0.25, True, 6, drop_connect_rate=0.0, ndim=3).train()
    x, g = torch.randn(2, 16, 10, 9, 11), torch.randn(2, 16, 10, 9, 11)

    def grads(m, dtype, bf16):
        m, xi = copy.deepcopy(m).to(dtype), x.to(dtype, copy=True).requires_grad_()
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            y = m(xi)
        y.backward(g.to(y.dtype))
        return [xi.grad] + [p.grad for p in m.parameters()]

    ref = grads(set_speed_paths(blk, False), torch.float64, False)
    stock = grads(blk, torch.float32, True)
    ours = grads(set_speed_paths(blk), torch.float32, True)
    assert fast_dw_used(blk, x)
    eo, es = [rel(a, r) for a, r in zip(ours, ref)], [rel(a, r) for a, r in zip(stock, ref)]
    assert max(eo) < 5e-2, eo
    for o, s in zip(eo, es):
        assert o <= 1.25 * s + 1e-3, (eo, es)


def fast_dw_used(m, x):
    "Whether a training forward of `m` on `x` runs our depthwise operator in every fast depthwise layer"
    seen = []
    hooks = [
        l.register_forward_hook(
            lambda mod, i, o: seen.append("effnet_fastai_depthwise_conv" in type(o.grad_fn).__name__)
        )
        for l in m.modules()
        if getattr(l, "fast_dw", False)
    ]
    try:
        m(x)
    finally:
        for h in hooks:
            h.remove()
    return bool(seen) and all(seen)


# ------------------------------------------------------------ tracing and export: plain layers
def test_tracing_and_export_see_plain_layers():
    "jit.trace, torch.fx and torch.export of a training model record stock operators, never ours"
    m, x = tiny(), torch.randn(2, 1, 17, 15, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr = torch.jit.trace(m, x, check_trace=False)
    assert "effnet_fastai::" not in str(tr.inlined_graph)
    blk = m.stage1[0]  # (torch.fx traces blocks; the model's input checks are control flow)
    gm = torch.fx.symbolic_trace(blk)
    assert not any("effnet_fastai" in str(n.target) for n in gm.graph.nodes)
    assert any("conv3d" in str(n.target) for n in gm.graph.nodes)
    ep = torch.export.export(m, (x,))
    assert not any("effnet_fastai" in str(n.target) for n in ep.graph.nodes)
    assert fast_dw_used(m, x)  # eager training still takes the operator
