"Performance features: gradient checkpointing, the CPU depthwise backward, BatchNorm+SiLU, folded BatchNorm (torch.compile: test_compile.py)"

import copy, warnings
import pytest, torch, torch.nn as nn, torch.nn.functional as F

warnings.filterwarnings("ignore", message=".*torch.jit.script.*")
from effnet_fastai.layers import Conv3dSame, Conv2dSame
from effnet_fastai.fast import fast_depthwise, batch_norm_silu, set_speed_paths
from effnet_fastai.model import saved_activation_bytes as saved_bytes
from effnet_fastai.factories import efficientnet_b0


def pair(ndim, ni, **kw):
    a = efficientnet_b0(ni=ni, num_classes=3, ndim=ndim, drop_connect_rate=0.0, dropout_rate=0.0, **kw).train()
    b = copy.deepcopy(a)
    return a, b


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


# ------------------------------------------------------------ gradient checkpointing
@pytest.mark.parametrize("ndim,shape", [(3, (2, 1, 20, 24, 22)), (2, (2, 3, 48, 40))])
def test_checkpointing_identical_gradients(ndim, shape):
    a, b = pair(ndim, shape[1])
    b.set_grad_checkpointing()
    x = torch.randn(shape)
    ya, yb = a(x), b(x)
    assert torch.equal(ya, yb)  # same forward
    ya.pow(2).sum().backward()
    yb.pow(2).sum().backward()
    scale = max(p.grad.abs().max() for p in a.parameters())
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        # recomputation repeats the same kernels on the same values: gradients agree to float rounding
        assert (pa.grad - pb.grad).abs().max() <= 1e-5 * scale, n
    for (n, ba), bb in zip(a.named_buffers(), b.buffers()):
        assert torch.equal(ba, bb), n  # BN stats updated once


def test_checkpointing_saves_memory():
    a, b = pair(3, 1)
    b.set_grad_checkpointing()
    x = torch.randn(2, 1, 32, 32, 32)
    _, sa = saved_bytes(a, x)
    _, sb = saved_bytes(b, x)
    assert sa / sb >= 3, (sa, sb)


def test_checkpointing_off_in_eval_and_no_grad():
    m = efficientnet_b0(ni=1, num_classes=3, ndim=3, grad_checkpointing=True)
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        m.train()(x)  # no recomputation machinery without gradients
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        m(x[:1])  # as nn.BatchNorm, fused or not
    assert all(s.grad_checkpointing for s in m.stages)
    assert not any(s.grad_checkpointing for s in m.set_grad_checkpointing(False).stages)


# ------------------------------------------------------------ depthwise backward
def test_depthwise_gradcheck_double():
    for ks, pad in (((3, 3, 3), (1, 1, 1)), ((5, 3, 1), (2, 1, 0))):
        x = torch.randn(2, 2, 6, 5, 4, dtype=torch.float64, requires_grad=True)
        w = torch.randn(2, 1, *ks, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x, w, pad=pad: fast_depthwise(x, w, pad), (x, w), fast_mode=True)


@pytest.mark.parametrize("C,S,k", [(8, 16, 3), (12, 9, 5), (4, (6, 11, 7), 5), (8, (16, 16), 5), (6, (9, 14), (5, 3))])
def test_depthwise_float32_matches_stock(C, S, k):
    "Both gradients equal the stock backward's to float32 rounding (sums of up to 8,192 terms), in 3D and 2D"
    S = (S,) * 3 if isinstance(S, int) else S
    ks = (k,) * len(S) if isinstance(k, int) else k
    pad = tuple(o // 2 for o in ks)
    x = torch.randn(2, C, *S, requires_grad=True)
    w = torch.randn(C, 1, *ks, requires_grad=True)
    g = torch.randn(2, C, *S)
    conv = F.conv3d if len(S) == 3 else F.conv2d
    ours = torch.autograd.grad(fast_depthwise(x, w, pad), (x, w), g)
    stock = torch.autograd.grad(conv(x, w, None, 1, pad, 1, C), (x, w), g)
    for a, b in zip(ours, stock):
        assert rel(a, b) < 1e-5, rel(a, b)


def fast_dw(y):
    "Whether `y` was computed by the `effnet_fastai::depthwise_conv` operator (its backward node is named after it)"
    return "effnet_fastai_depthwise_conv" in type(y.grad_fn).__name__


def test_depthwise_layer_uses_fast_path_only_where_it_applies(one_thread):
    dw = set_speed_paths(Conv3dSame(6, 6, 3, groups=6, bias=False))
    x = torch.randn(1, 6, 8, 8, 8, requires_grad=True)
    assert not fast_dw(Conv3dSame(6, 6, 3, groups=6, bias=False)(x))  # the reference layer
    assert fast_dw(dw(x))
    assert fast_dw(dw(x[:, :, :2]))  # any size
    x2 = torch.randn(2, 6, 9, 9, requires_grad=True)
    assert fast_dw(set_speed_paths(Conv2dSame(6, 6, 5, groups=6, bias=False))(x2))
    assert not fast_dw(set_speed_paths(Conv2dSame(6, 6, 3, groups=6, bias=False))(x2))  # 9 taps: stock is faster
    assert not fast_dw(set_speed_paths(Conv3dSame(6, 6, 3, stride=2, groups=6, bias=False))(x))
    with torch.no_grad():
        assert torch.equal(dw(x), F.conv3d(x, dw.weight, None, 1, 1, 1, 6))


# ------------------------------------------------------------ BatchNorm + SiLU, folded BatchNorm
def test_bn_act_gradcheck_double():
    bn = nn.BatchNorm3d(3).double().train()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    x = torch.randn(2, 3, 3, 2, 4, dtype=torch.float64, requires_grad=True)
    rm, rv = bn.running_mean, bn.running_var
    f = lambda x, w, b: batch_norm_silu(x, w, b, rm, rv, 0.1, 1e-3)[0]
    assert torch.autograd.gradcheck(f, (x, bn.weight, bn.bias), fast_mode=True)


def test_model_matches_unfused_modules(one_thread):
    "The whole model with the fused paths equals the same modules run one by one (nn.Sequential.forward)"
    torch.manual_seed(1)
    a, b = pair(3, 1)
    x = torch.randn(2, 1, 24, 20, 22)

    def plain(m, x):  # the reference layers
        m.set_speed_paths(False)
        try:
            return m(x)
        finally:
            m.set_speed_paths()

    ya, yb = a(x), plain(b, x)
    assert rel(ya, yb) < 1e-5
    ya.pow(2).sum().backward()
    yb.pow(2).sum().backward()
    scale = max(p.grad.abs().max() for p in b.parameters())
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert (pa.grad - pb.grad).abs().max() <= 1e-3 * scale, n
    for (n, ba), bb in zip(a.named_buffers(), b.buffers()):
        assert (ba.float() - bb.float()).abs().max() <= 1e-5 * bb.float().abs().max().clamp_min(1), n
    a.eval()
    b.eval()
    with torch.no_grad():
        ea, eb = a(x), plain(b, x)
    assert rel(ea, eb) < 1e-5


@pytest.mark.parametrize("ndim,shape", [(2, (2, 3, 35, 32)), (3, (2, 1, 19, 16, 18)), (3, (1, 3, 4, 30, 33))])
def test_inference_in_place_is_bit_identical(ndim, shape):
    "Without autograd the layers overwrite their own intermediates (BatchNorm, SiLU, gating, residual, zero-tap pads): the values of the allocating path to the bit"
    torch.manual_seed(0)
    m = efficientnet_b0(ni=shape[1], num_classes=5, ndim=ndim).eval()
    with torch.no_grad():
        for bn in m.modules():
            if isinstance(bn, nn.modules.batchnorm._BatchNorm):
                bn.running_mean.normal_(0, 0.1)
                bn.running_var.uniform_(0.5, 2)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.normal_(0, 0.1)
    x = torch.randn(shape)
    x0 = x.clone()
    with torch.no_grad():
        fast = m(x)
    ref = m(x)  # autograd on (the parameters require grad): every module allocates its own output
    assert ref.requires_grad
    assert torch.equal(fast, ref.detach())
    assert torch.equal(x, x0)  # the caller's input is never written
    with torch.inference_mode():
        assert torch.equal(m(x), fast)


def test_fused_paths_save_less():
    torch.manual_seed(0)
    m = efficientnet_b0(ni=1, num_classes=3, ndim=3).train()
    x = torch.randn(2, 1, 32, 32, 32)
    _, ours = saved_bytes(m, x)
    _, plain = saved_bytes(m.set_speed_paths(False), x)
    assert ours <= 0.8 * plain, (ours, plain)


# torch.compile: tests/test_compile.py
