"efficientnet_learner: learning, parameter groups, export, mixed precision, 2D with fastai's vision_learner"

import warnings
import numpy as np, pytest, torch
from torch import nn
from fastai.learner import load_learner
from fastai.metrics import accuracy
from fastai.torch_core import set_seed
from fastai.callback.progress import ProgressCallback
import fastai.callback.fp16  # noqa: F401  (patches to_fp16, to_bf16 onto Learner)
from fastai.vision.all import vision_learner, unet_learner, create_body, ImageDataLoaders, PILImage
from effnet_fastai.layers import Conv2dSame
from effnet_fastai.data import *
from effnet_fastai.factories import *
from effnet_fastai.learner import *


@pytest.fixture(autouse=True)
def _one_thread():
    "Small 3D models train fastest on one thread, and much faster on a machine shared with other jobs"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def small_dls():
    return ShapeVolumes(24, size=12, seed=0).dataloaders(bs=4, batch_tfms=aug_transforms_3d())


def _trainable(learn):
    return [sum(p.numel() for p in g if p.requires_grad) for g in learn.splitter(learn.model)]


def _bn(mods):
    return sum(
        p.numel() for m in mods.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for p in m.parameters()
    )


def test_reads_ndim_channels_and_classes():
    dls = ShapeVolumes(16, size=8, classes=("sphere", "cube", "torus")).dataloaders(bs=4)
    learn = efficientnet_learner(dls, "efficientnet_b0")
    assert (learn.ndim, learn.ni, learn.n_out) == (3, 1, 3)
    assert learn.model[0].stem[0].in_channels == 1 and learn.model[1][-1].out_features == 3
    learn = efficientnet_learner(dls, efficientnet_b0, n_out=7, ndim=3, ni=1)
    assert learn.model[1][-1].out_features == 7


def test_freeze_unfreeze_groups(small_dls):
    learn = efficientnet_learner(small_dls, "b0")
    groups = learn.splitter(learn.model)
    assert len(groups) == 3
    assert sum(len(g) for g in groups) == len(list(learn.model.parameters()))
    learn.freeze()
    t = _trainable(learn)
    assert t[0] == _bn(learn.model[0][:5]) and t[1] == _bn(learn.model[0][5:])  # only BatchNorm (train_bn)
    assert t[2] == sum(p.numel() for p in learn.model[1].parameters())
    learn.freeze_to(1)
    assert _trainable(learn)[1] == sum(p.numel() for p in groups[1])
    learn.unfreeze()
    assert _trainable(learn) == [sum(p.numel() for p in g) for g in groups]


def test_discriminative_lrs_and_fine_tune(small_dls):
    learn = efficientnet_learner(small_dls, "b0", pretrained=False)
    learn.unfreeze()
    learn.fit(1, slice(1e-5, 1e-3))
    lrs = [h["lr"] for h in learn.opt.hypers]
    assert lrs[0] < lrs[1] < lrs[2]
    learn.fine_tune(1, 1e-3, freeze_epochs=1)  # freezes, trains the head, unfreezes, trains all
    assert _trainable(learn) == [sum(p.numel() for p in g) for g in learn.splitter(learn.model)]


def test_export_load_roundtrip(small_dls, tmp_path):
    learn = efficientnet_learner(small_dls, "b0", path=tmp_path)
    learn.fit(1, 1e-3)
    learn.export("m.pkl")
    learn2 = load_learner(tmp_path / "m.pkl")
    p1, _ = learn.get_preds(dl=small_dls.valid)
    p2, _ = learn2.get_preds(dl=learn2.dls.test_dl([small_dls.valid_ds[i][0] for i in range(len(small_dls.valid_ds))]))
    assert torch.allclose(p1, p2, atol=1e-6)
    x = ShapeVolumes(24, size=12)[5][0]
    assert learn2.predict(x)[0] == learn.predict(x)[0]
    assert learn2.dls.vocab == list(SHAPES)


@pytest.mark.parametrize("mp", ["to_fp16", "to_bf16", "to_mixed_precision"])
def test_mixed_precision_no_nan(small_dls, mp):
    learn = efficientnet_learner(small_dls, "b0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fastai's AMP warns that CUDA is unavailable and runs in float32
        getattr(learn, mp)()
        learn.fit(1, 1e-3)
    assert np.isfinite(learn.recorder.values[-1][:2]).all()
    assert all(torch.isfinite(p).all() for p in learn.model.parameters())


def test_channels_last_3d(small_dls):
    learn = efficientnet_learner(small_dls, "b0", cbs=ChannelsLast3D())
    learn.fit(1, 1e-3)
    assert np.isfinite(learn.recorder.values[-1][:2]).all()


def test_show_results_3d(small_dls):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    learn = efficientnet_learner(small_dls, "b0")
    learn.show_results(max_n=4)
    axs = plt.gcf().axes
    assert len(axs) == 4 and all(a.title.get_text() for a in axs)
    small_dls.show_batch(max_n=2)
    plt.close("all")


def test_video_learner():
    dls = MovingShapes(16, size=16, n_frames=4).dataloaders(bs=4)
    learn = efficientnet_learner(dls, "b0", stem_stride=(1, 2, 2))
    assert learn.model[0].stem[0].stride == (1, 2, 2)
    learn.fit(1, 1e-3)
    assert learn.dls.vocab == list(DIRECTIONS)


def test_vision_learner_2d(tmp_path):
    for c in "ab":
        (tmp_path / c).mkdir()
        for i in range(4):
            PILImage.create((np.random.rand(24, 24, 3) * 255).astype(np.uint8)).save(tmp_path / c / f"{i}.png")
    dls = ImageDataLoaders.from_folder(tmp_path, valid_pct=0.25, bs=2, seed=0)
    learn = vision_learner(dls, efficientnet_b0_2d, pretrained=False, metrics=accuracy)
    assert len(learn.splitter(learn.model)) == 3
    learn.fit(1, 1e-3)
    learn2 = efficientnet_learner(dls, "b0")
    assert (learn2.ndim, learn2.ni) == (2, 3)


@pytest.fixture
def image_dls(tmp_path):
    for c in "ab":
        (tmp_path / c).mkdir()
        for i in range(4):
            PILImage.create((np.random.rand(24, 24, 3) * 255).astype(np.uint8)).save(tmp_path / c / f"{i}.png")
    return ImageDataLoaders.from_folder(tmp_path, valid_pct=0.25, bs=2, seed=0)


@pytest.mark.parametrize("n_in", [1, 3, 4])
def test_fastai_n_in_keeps_same_padding(image_dls, n_in):
    """fastai's `n_in` path (the `create_body`/`vision_learner` cases of fastai's nbs/21_vision.learner.ipynb, ported):
    its rebuilt stem stays SAME, so each body equals our own `efficientnet_learner` body with the same weights"""
    bodies = {
        "create_body": create_body(efficientnet_b0_2d(), n_in=n_in, pretrained=False, cut=effnet_cut),
        "vision_learner": vision_learner(
            image_dls, efficientnet_b0_2d, n_in=n_in, pretrained=False, normalize=False
        ).model[0],
        "unet_learner": unet_learner(
            image_dls, efficientnet_b0_2d, n_in=n_in, n_out=2, pretrained=False, normalize=False
        ).model[0],
    }
    ours = efficientnet_learner(image_dls, "b0", ni=n_in, ndim=2, normalize=False).model[0].eval()
    x = torch.randn(2, n_in, 225, 161)  # odd sizes: SAME pads the stem asymmetrically only on the even one
    for name, body in bodies.items():
        assert isinstance(body.stem[0], Conv2dSame) and body.stem[0].in_channels == n_in, name
        ours.load_state_dict(body.state_dict())
        with torch.no_grad():
            a, b = body.eval()(x), ours(x)
        assert a.shape == (2, 1280, 8, 6), (name, a.shape)
        assert torch.equal(a, b), name
    with torch.no_grad():
        assert bodies["create_body"].stem(torch.randn(1, n_in, 224, 224)).shape[-2:] == (112, 112)


def test_sync_batchnorm():
    m = to_sync_batchnorm(create_effnet_model("b0", 2, ni=1))
    assert not any(type(o) in (nn.BatchNorm1d, nn.BatchNorm3d) for o in m.modules())


def test_bad_arch():
    with pytest.raises(ValueError, match="unknown EfficientNet architecture 'b9'"):
        effnet_arch("b9")


@pytest.mark.slow
def test_learns_synthetic_volumes():
    "A short run on the synthetic shapes gets well above chance (25%)"
    set_seed(0)
    dls = ShapeVolumes(480, size=16, seed=0).dataloaders(bs=16, batch_tfms=aug_transforms_3d())
    learn = efficientnet_learner(dls, "b0", metrics=accuracy)
    learn.remove_cb(ProgressCallback)
    learn.fit_one_cycle(5, 3e-3)
    assert learn.recorder.values[-1][2] > 0.4, learn.recorder.values
