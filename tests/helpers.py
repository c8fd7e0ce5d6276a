"Helpers shared by the tests: random networks whose logits depend on their input, and how to compare two networks"

import torch
from torch import nn
from effnet_fastai.model import calibrate_bn_

TOL = 1e-5  # max|diff| / max|logit| of float32 logits, as the issue asks: not looser
PERT = 0.1  # relative random perturbation of the measured BatchNorm statistics


def randomize_(m, x):
    """Random BatchNorm affine parameters and conv biases, and BatchNorm running statistics measured on `x` (the layers'
    true statistics: activations stay of order one to the logits, which then depend on the input) then perturbed"""
    bns = [o for o in m.modules() if isinstance(o, nn.modules.batchnorm._BatchNorm)]
    for o in m.modules():
        if isinstance(o, nn.modules.conv._ConvNd) and o.bias is not None:
            o.bias.data.normal_(0, 0.2)
    for o in bns:
        o.weight.data.uniform_(0.5, 1.5)
        o.bias.data.normal_(0, 0.2)
    calibrate_bn_(m, x)
    for o in bns:
        o.running_mean.add_(torch.randn_like(o.running_mean) * PERT * o.running_var.sqrt())
        o.running_var.mul_(torch.empty_like(o.running_var).uniform_(1 - PERT, 1 + PERT))
    return m


def rel_diff(peer, ours, x):
    "max|diff| / max|logit| of the two models' eval-mode logits on `x`"
    with torch.no_grad():
        a, b = peer.eval()(x), ours.eval()(x)
    assert a.shape == b.shape and torch.isfinite(a).all()
    assert (a[0] - a[1]).abs().max() > 0.05 * a.abs().max()  # the logits depend on the input: the check means something
    return ((a - b).abs().max() / a.abs().max()).item()


def b0_checkpoint(path):
    "A 2D b0 state dict (1000 classes, seeded) saved at `path`: pretrained weights to load and inflate without a download"
    import io
    from effnet_fastai.factories import efficientnet_b0

    torch.manual_seed(0)
    buf = io.BytesIO()
    torch.save(efficientnet_b0(ndim=2, num_classes=1000).state_dict(), buf)
    path.write_bytes(buf.getvalue())
    return path
