"""Interpretation (issue 14): `gradcam` against MONAI's `GradCAM` for 1D/2D/3D EfficientNets at every stage, random
sizes and targets, a timm model, a plain CNN and the U-Net; LayerCAM and Grad-CAM against torchcam's, HiResCAM; `cam_layer` on peers' models; flip TTA for a segmentation
learner (predictions flipped back); `learn.show_cam` and `plot_top_losses` for clips; clear errors."""

import warnings
import pytest, torch
from torch import nn
from hypothesis import given, settings, strategies as st
from monai.visualize import GradCAM
from torchcam.methods import LayerCAM, GradCAM as TorchcamGradCAM
from fastai.basics import accuracy, set_seed
from fastai.interpret import ClassificationInterpretation
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from effnet_fastai.data import MovingShapes
from effnet_fastai.segdata import synthetic_seg_dls
from effnet_fastai.learner import create_effnet_model, efficientnet_learner, efficientnet_unet_learner
from effnet_fastai.factories import efficientnet_b0
from effnet_fastai.interpret import CAM_METHODS, cam_layer, gradcam

warnings.filterwarnings("ignore", message=".*torch.jit.script.*")
STAGES = ["0.stem"] + [f"0.stage{i}" for i in range(1, 8)] + ["0.head", "0"]


def warmed(m, x, n=2):
    "`m` in float64 with BatchNorm statistics averaged over `n` passes of `x` (outputs that differ between items)"
    for b in m.modules():
        if isinstance(b, nn.modules.batchnorm._BatchNorm):
            b.reset_running_stats()
            b.momentum = None
    m.double().train()
    with torch.no_grad():
        for _ in range(n):
            m(x)
    return m.eval()


def monai_cam(m, x, layer, targets):
    "MONAI's Grad-CAM without its (flipping) normalisation, one item at a time"
    return torch.cat(
        [
            GradCAM(m, layer, postprocessing=lambda t: t)(x[i : i + 1], class_idx=int(t))[:, 0]
            for i, t in enumerate(targets)
        ]
    )


def assert_rel(a, b, tol=1e-5):
    assert a.shape == b.shape
    assert (a - b).abs().max() <= tol * max(b.abs().max().item(), 1e-30)


_MODELS = {}


def effnet(nd, ni=2, n_out=5):
    "One warmed b0 classifier per number of spatial axes (building them is the slow part)"
    if nd not in _MODELS:
        torch.manual_seed(nd)
        x = torch.randn(4, ni, *(32,) * nd, dtype=torch.float64)
        _MODELS[nd] = warmed(create_effnet_model("b0", n_out, ni=ni, ndim=nd), x)
    return _MODELS[nd]


@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("layer", ["0.stem", "0.stage4", "0"])
def test_equals_monai(nd, layer):
    "Every stage of a 1D, 2D and 3D classifier, the predicted class of each item: MONAI's map to 1e-5"
    m = effnet(nd)
    torch.manual_seed(10 + nd)
    x = torch.randn(2, 2, *(32,) * nd, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the single-voxel warning of a 3D map at stage 6)
        ours = gradcam(m, x, layer=layer, normalize=False)
    assert_rel(ours, monai_cam(m, x, layer, m(x).argmax(1)))


@settings(max_examples=12, deadline=None)
@given(
    nd=st.sampled_from([1, 2, 3]),
    data=st.data(),
    n=st.integers(1, 3),
    layer=st.sampled_from(STAGES),
    per_item=st.booleans(),
)
def test_property_equals_monai(nd, data, n, layer, per_item):
    "Random sizes (anisotropic too), batch sizes, layers and targets agree with MONAI; the normalised map is in [0, 1]"
    sizes = tuple(data.draw(st.integers(9, 28 if nd == 3 else 80)) for _ in range(nd))
    m = effnet(nd)
    x = torch.randn(n, 2, *sizes, dtype=torch.float64)
    t = torch.tensor([data.draw(st.integers(0, 4)) for _ in range(n)]) if per_item else data.draw(st.integers(0, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = gradcam(m, x, target=t, layer=layer, normalize=False)
        norm = gradcam(m, x, target=t, layer=layer)
    assert_rel(ours, monai_cam(m, x, layer, torch.as_tensor(t).expand(n)))
    assert norm.min() >= 0 and norm.max() <= 1 + 1e-9


def torchcam_map(cls, m, x, layer, targets):
    "torchcam's map of `cls` (LayerCAM, GradCAM) at `layer` for the classes `targets`, upsampled as `gradcam` does"
    with cls(m, target_layer=layer, input_shape=tuple(x.shape[1:])) as ex:
        cam = ex(class_idx=[int(t) for t in targets], scores=m(x), normalized=False)[0]
    mode = ("linear", "bilinear", "trilinear")[x.ndim - 3]
    return torch.nn.functional.interpolate(cam[:, None], size=x.shape[2:], mode=mode, align_corners=False)[:, 0]


@settings(max_examples=10, deadline=None)
@given(
    nd=st.sampled_from([1, 2, 3]),
    data=st.data(),
    layer=st.sampled_from(["0.stem", "0.stage2", "0.stage4"]),
    method=st.sampled_from(["layercam", "gradcam"]),
)
def test_property_equals_torchcam(nd, data, layer, method):
    "LayerCAM and Grad-CAM equal torchcam's at random sizes, layers and per-item targets, in 1D, 2D and 3D"
    sizes = tuple(data.draw(st.integers(12, 28 if nd == 3 else 80)) for _ in range(nd))
    m = effnet(nd)
    x = torch.randn(2, 2, *sizes, dtype=torch.float64)
    t = torch.tensor([data.draw(st.integers(0, 4)) for _ in range(2)])
    cls = {"layercam": LayerCAM, "gradcam": TorchcamGradCAM}[method]
    assert_rel(gradcam(m, x, target=t, layer=layer, normalize=False, method=method), torchcam_map(cls, m, x, layer, t))


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_hirescam_is_gradcam_before_average_pooling(nd):
    "Where a layer is averaged into a linear layer its gradient is the same everywhere: HiResCAM equals Grad-CAM there"
    torch.manual_seed(nd)
    x = torch.randn(2, 2, *(64,) * nd, dtype=torch.float64)
    m = warmed(efficientnet_b0(ni=2, num_classes=4, ndim=nd), x)
    ref = gradcam(m, x, normalize=False)
    assert_rel(gradcam(m, x, normalize=False, method="hirescam"), ref, 1e-6)
    assert (gradcam(m, x, normalize=False, method="layercam") - ref).abs().max() > 1e-3 * ref.abs().max()
    assert set(CAM_METHODS) == {"gradcam", "layercam", "hirescam"}


def test_timm_model():
    "A timm EfficientNet: `cam_layer` finds the layer before its global pooling, and the map is MONAI's"
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    m = warmed(timm.create_model("efficientnet_b0", num_classes=4), x)
    assert cam_layer(m) == "bn2"
    assert_rel(gradcam(m, x, normalize=False), monai_cam(m, x, "bn2", m(x).argmax(1)))


def test_plain_cnn():
    "Any CNN with a global pooling: a torchvision-style network with a ModuleList and a flat head"

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(
                [
                    nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU()),
                    nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU()),
                ]
            )
            self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(16, 3)

        def forward(self, x):
            for b in self.blocks:
                x = b(x)
            return self.fc(self.pool(x).flatten(1))

    torch.manual_seed(0)
    m, x = Net().double().eval(), torch.randn(3, 3, 32, 32, dtype=torch.float64)
    assert cam_layer(m) == "blocks.1"
    assert cam_layer(m, x, min_size=12) == "blocks.0"
    assert_rel(gradcam(m, x, target=2, normalize=False), monai_cam(m, x, "blocks.1", [2, 2, 2]))


def test_unet_per_voxel_scores():
    "A segmentation network: the class score is its logits summed over the voxels, default target the largest sum"
    from effnet_fastai.unet import efficientnet_unet

    torch.manual_seed(0)
    x = torch.randn(2, 1, 32, 32, 32, dtype=torch.float64)
    u = warmed(efficientnet_unet("b0", 3, ni=1, ndim=3), x)
    default = u(x).flatten(2).sum(2).argmax(1)
    for layer in ("decoder.4", "decoder.1", "encoder.stage5"):
        assert_rel(gradcam(u, x, layer=layer, normalize=False), monai_cam(u, x, layer, default))


def test_learner_and_frozen_body():
    "From a `Learner` (frozen, as after `fine_tune`'s first stage): the map exists and no gradient is left behind"
    set_seed(0)
    dls = MovingShapes(24, size=16, n_frames=8).dataloaders(bs=4)
    learn = efficientnet_learner(dls, "b0", metrics=accuracy)
    learn.freeze()
    x = dls.valid.one_batch()[0]
    cam = gradcam(learn, x, layer=cam_layer(learn.model, x, min_size=4))
    assert cam.shape == (len(x), 8, 16, 16)
    assert all(p.grad is None for p in learn.model.parameters())


def test_show_cam_and_top_losses_for_clips():
    "Clips are drawn as their frames with the map; `plot_top_losses(cam=True)` draws each with its map"
    set_seed(0)
    dls = MovingShapes(24, size=16, n_frames=8).dataloaders(bs=4)
    learn = efficientnet_learner(dls, "b0", metrics=accuracy)
    axs = learn.show_cam(n=3)
    assert [len(a.images) for a in axs[:3]] == [2, 2, 2]
    plt.close("all")
    for method in CAM_METHODS:  # each method draws; a wrong one is refused
        assert len(learn.show_cam(n=2, method=method)) == 2
        plt.close("all")
    with pytest.raises(ValueError, match="`method` must be one of"):
        learn.show_cam(n=2, method="nope")
    interp = ClassificationInterpretation.from_learner(learn)
    interp.plot_top_losses(2, cam=True)
    assert [len(a.images) for a in plt.gcf().axes] == [2, 2]
    plt.close("all")
    interp.plot_top_losses(2, cam=True, method="gradcam")
    assert [len(a.images) for a in plt.gcf().axes] == [2, 2]
    plt.close("all")


def test_seg_tta_flips_back():
    "A U-Net learner's flip TTA: each flipped prediction is flipped back before the mixture"
    set_seed(0)
    dls = synthetic_seg_dls(16, size=16, bs=4)
    learn = efficientnet_unet_learner(dls, "b0")
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-3)
        p, _ = learn.tta(flip_axes=(2,), beta=0.5)
        plain, _ = learn.get_preds()
    x = torch.cat([b[0] for b in dls.valid.new(shuffle=False)])
    learn.model.eval()
    with torch.no_grad():
        flipped = learn.model(x.flip(4)).softmax(1).flip(4)
    torch.testing.assert_close(p, 0.5 * plain + 0.5 * flipped.as_subclass(torch.Tensor), rtol=1e-4, atol=1e-5)


def test_errors():
    "Layers, targets and inputs that cannot work are refused with the argument named"
    m = effnet(2)
    x = torch.randn(2, 2, 40, 40, dtype=torch.float64)
    with pytest.raises(ValueError, match="`layer` 'nope' is not a module"):
        gradcam(m, x, layer="nope")
    with pytest.raises(ValueError, match="out of range: the model has 5 classes"):
        gradcam(m, x, target=[0, 7])
    with pytest.raises(ValueError, match="out of range"):
        gradcam(m, x, target=-1)
    with pytest.raises(ValueError, match=r"must be a batch \(N, C, H, W\)"):
        gradcam(m, x[:, :, 0])
    with pytest.raises(ValueError, match="the model expects 2"):
        gradcam(m, torch.randn(2, 3, 40, 40, dtype=torch.float64))
    with pytest.raises(TypeError, match="floating-point"):
        gradcam(m, torch.ones(2, 2, 40, 40, dtype=torch.long))
    with pytest.raises(ValueError, match="not part of the model"):
        gradcam(m, x, layer=nn.Conv2d(1, 1, 1))
    with pytest.raises(ValueError, match="did not run"):
        gradcam(Unused().double(), x, layer="unused")
    with pytest.raises(ValueError, match=r"`method` must be one of \['gradcam', 'layercam', 'hirescam'\], got 'cam'"):
        gradcam(m, x, method="cam")


class Unused(nn.Module):
    "A classifier with a module that it never calls"

    def __init__(self):
        super().__init__()
        self.conv, self.unused, self.pool = nn.Conv2d(2, 4, 3), nn.Conv2d(4, 4, 1), nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.pool(self.conv(x)).flatten(1)


def test_images_keep_fastais_tta():
    "2D images get fastai's own `tta` (random training augmentations); `flip_axes` is for volumes and clips"
    from fastai.basics import Categorize, CrossEntropyLossFlat, Datasets, Learner
    from fastai.vision.core import TensorImage

    set_seed(0)
    xs = [TensorImage(torch.randn(3, 16, 16)) for _ in range(12)]
    dsets = Datasets(
        list(range(12)),
        tfms=[[lambda i: xs[i]], [lambda i: "ab"[i % 2], Categorize()]],
        splits=[list(range(8)), list(range(8, 12))],
    )
    dls = dsets.dataloaders(bs=4)
    learn = Learner(
        dls, nn.Sequential(nn.Conv2d(3, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()), loss_func=CrossEntropyLossFlat()
    )
    with learn.no_bar():
        preds, targs = learn.tta(n=2)
    assert preds.shape == (4, 2) and len(targs) == 4
    with pytest.raises(ValueError, match="`flip_axes` is for volumes and clips"):
        learn.tta(flip_axes=(0,))
