"""Whole-volume inference (issue 13): `predict_volume` against MONAI's `sliding_window_inference` (Gaussian and
constant blending, many sizes, overlaps and tile batches, volumes smaller than the patch), the tile grid and weights
against MONAI's, memory bounded by the tile batch, test-time augmentation, `Learner.predict_volume`, and `RandCrop3D`
in a fastai pipeline."""

import warnings
import numpy as np, pytest, torch
from torch import nn
from hypothesis import given, settings, strategies as st
from monai.data.utils import compute_importance_map, dense_patch_slices
from monai.inferers import sliding_window_inference
from fastai.data.all import DataBlock, IndexSplitter, TransformBlock
from effnet_fastai.data import TensorMask3D, TensorVolume
from effnet_fastai.segdata import synthetic_seg_dls
from effnet_fastai.learner import efficientnet_unet_learner
from effnet_fastai.patches import RandCrop3D, predict_volume, tile_starts, tile_weights
from effnet_fastai.unet import efficientnet_unet

warnings.filterwarnings("ignore", message=".*torch.jit.script.*")


def small_net(nd, ni=1, n_out=3, seed=0):
    "A small same-size network whose outputs near a tile's border differ from those inside: blending matters"
    torch.manual_seed(seed)
    conv = getattr(nn, f"Conv{nd}d")
    return nn.Sequential(conv(ni, 4, 3, padding=1), nn.ReLU(), conv(4, n_out, 5, padding=2)).eval()


def monai_swi(model, x, ps, overlap, bs, mode, sigma_scale=0.125):
    with torch.no_grad():
        return sliding_window_inference(x, ps, bs, model, overlap=overlap, mode=mode, sigma_scale=sigma_scale)


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


CASES = [  # (shape, patch, overlap, bs, mode)
    ((1, 1, 70, 50, 45), (32, 32, 32), 0.5, 4, "gaussian"),
    ((2, 1, 40, 33, 29), (16, 24, 16), 0.25, 3, "gaussian"),
    ((1, 1, 40, 33, 29), (16, 16, 16), 0.6, 1, "constant"),
    ((1, 1, 20, 40, 12), (32, 32, 32), 0.5, 2, "gaussian"),  # smaller than the patch along two axes
    ((1, 1, 32, 32, 32), (32, 32, 32), 0.5, 2, "gaussian"),  # one tile
    ((2, 1, 95, 81), (32, 40), 0.5, 5, "gaussian"),
    ((1, 1, 300), (64,), 0.75, 8, "constant"),
]


@pytest.mark.parametrize("shape,ps,overlap,bs,mode", CASES)
def test_equals_monai(shape, ps, overlap, bs, mode):
    "Same blended outputs as MONAI's sliding_window_inference, to 1e-5 relative"
    m, x = small_net(len(ps)), torch.randn(shape)
    ours = predict_volume(m, x, ps, overlap=overlap, bs=bs, mode=mode, progress=False)
    assert ours.shape == (shape[0], 3, *shape[2:])
    assert rel(ours, monai_swi(m, x, ps, overlap, bs, mode)) < 1e-5


def test_unet_equals_monai():
    "The b0 U-Net on a volume that is not a multiple of the patch, single volume (C, D, H, W) in and out"
    torch.manual_seed(0)
    u, x = efficientnet_unet("b0", n_out=3, ni=1, ndim=3).eval(), torch.randn(1, 53, 47, 38)
    ours = predict_volume(u, x, 32, overlap=0.5, bs=3, progress=False)
    assert ours.shape == (3, 53, 47, 38)
    assert rel(ours, monai_swi(u, x[None], (32,) * 3, 0.5, 3, "gaussian")[0]) < 1e-5


@settings(max_examples=25, deadline=None)
@given(
    nd=st.sampled_from([1, 2, 3]),
    data=st.data(),
    overlap=st.sampled_from([0.0, 0.25, 0.5, 0.8]),
    bs=st.integers(1, 6),
    mode=st.sampled_from(["gaussian", "constant"]),
    sigma=st.sampled_from([0.125, 0.3]),
)
def test_property_equals_monai(nd, data, overlap, bs, mode, sigma):
    "Any sizes (including smaller than the patch), overlaps, tile batches and blending agree with MONAI"
    sizes = tuple(data.draw(st.integers(3, 40 if nd == 3 else 90)) for _ in range(nd))
    ps = tuple(data.draw(st.integers(2, 24)) for _ in range(nd))
    m, x = small_net(nd, ni=2, n_out=2), torch.randn(1, 2, *sizes)
    ours = predict_volume(m, x, ps, overlap=overlap, bs=bs, mode=mode, sigma_scale=sigma, progress=False)
    assert rel(ours, monai_swi(m, x, ps, overlap, bs, mode, sigma)) < 1e-5


@settings(max_examples=60, deadline=None)
@given(size=st.integers(1, 300), patch=st.integers(1, 64), overlap=st.floats(0, 0.95))
def test_tile_starts_match_monai(size, patch, overlap):
    "The tile grid along an axis is MONAI's, covers every voxel, and no tile hangs over the end"
    starts = tile_starts(size, patch, overlap)
    if patch < size:
        step = max(int(patch * (1 - overlap)), 1)
        theirs = [s[0].start for s in dense_patch_slices((size,), (patch,), (step,))]
        assert starts == theirs
        assert starts[-1] + patch == size
        assert all(b - a <= patch for a, b in zip(starts, starts[1:]))
    else:
        assert starts == [0]


@pytest.mark.parametrize("ps", [(32, 32, 32), (16, 24, 9), (7, 64), (1,), (96,)])
@pytest.mark.parametrize("sigma", [0.125, 0.5])
def test_weights_match_monai(ps, sigma):
    "Gaussian blending weights equal MONAI's importance map"
    theirs = compute_importance_map(ps, mode="gaussian", sigma_scale=sigma)
    torch.testing.assert_close(tile_weights(ps, "gaussian", sigma), theirs, rtol=1e-6, atol=0)


def test_tiles_bounded_by_bs():
    "The model never sees more than `bs` tiles, and sees each tile of each volume once"
    m, seen = small_net(3), []
    m.register_forward_pre_hook(lambda mod, a: seen.append(a[0].shape[0]))
    predict_volume(m, torch.randn(2, 1, 48, 40, 40), (24, 24, 24), bs=5, overlap=0.5, progress=False)
    n_tiles = 2 * len(tile_starts(48, 24, 0.5)) * len(tile_starts(40, 24, 0.5)) ** 2
    assert max(seen) == 5 and sum(seen) == n_tiles


def test_tta_single_tile():
    "With one tile, TTA is the mean of the plain and the flipped-back predictions along each axis"
    torch.manual_seed(0)
    u, x = efficientnet_unet("b0", n_out=2, ni=1, ndim=3).eval(), torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        ref = (u(x) + sum(u(x.flip(a)).flip(a) for a in (2, 3, 4))) / 4
        plain = u(x)
    ours = predict_volume(u, x, 32, tta=True, progress=False)
    assert rel(ours, ref) < 1e-5 and rel(ours, plain) > 1e-3
    one_axis = predict_volume(u, x, 32, tta=(2,), progress=False)
    with torch.no_grad():
        assert rel(one_axis, (u(x) + u(x.flip(4)).flip(4)) / 2) < 1e-5


def test_state_restored_after_error():
    "A model left in training mode stays in training mode, also when the model fails on a tile"
    bad = nn.Sequential(nn.Conv3d(1, 2, 3, stride=2)).train()
    with pytest.raises(ValueError, match="output at its input's size"):
        predict_volume(bad, torch.randn(1, 20, 20, 20), (16, 16, 16), progress=False)
    assert bad.training


def test_device_of_result():
    "The blended result lives where `device` says, and with a batch of one given unbatched, has no batch axis"
    m = small_net(2)
    out = predict_volume(m, torch.randn(1, 30, 30), (16, 16), device="cpu", progress=False)
    assert out.device.type == "cpu" and out.shape == (3, 30, 30)


def test_learner_predict_volume():
    "learn.predict_volume: tiles standardised like the training patches, labels and probabilities at the volume's size"
    dls = synthetic_seg_dls(n_items=16, size=24, bs=4)
    learn = efficientnet_unet_learner(dls, "b0")
    vol = torch.randn(1, 40, 30, 50) * 3 + 5
    labels, probs = learn.predict_volume(vol, overlap=0.25, progress=False)
    assert learn.model.training  # left as it was
    assert labels.shape == (40, 30, 50) and probs.shape == (dls.c, 40, 30, 50)
    torch.testing.assert_close(probs.sum(0), torch.ones(40, 30, 50))
    assert torch.equal(labels, probs.argmax(0))

    class ZScored(nn.Module):  # what the learner's batch transforms do to each tile
        def __init__(self, m):
            super().__init__()
            self.m, self.ndim, self.ni = m, 3, 1

        def forward(self, x):
            d = (2, 3, 4)
            return self.m((x - x.mean(d, keepdim=True)) / (x.std(d, keepdim=True) + 1e-6))

    ref = predict_volume(ZScored(learn.model), vol, 24, overlap=0.25, progress=False).softmax(0)
    assert rel(probs, ref) < 1e-5


def test_randcrop_in_a_datablock():
    "RandCrop3D in a DataBlock: volume and mask cut at the same random place in training, at the centre in validation"
    vols = [torch.arange(30 * 28 * 26.0).view(1, 30, 28, 26) + 1000 * i for i in range(6)]
    db = DataBlock(
        blocks=(TransformBlock, TransformBlock),
        get_x=lambda i: TensorVolume(vols[i]),
        get_y=lambda i: TensorMask3D(vols[i][0].long()),
        splitter=IndexSplitter([4, 5]),
        item_tfms=RandCrop3D((16, 12, 20)),
    )
    dls = db.dataloaders(range(6), bs=2)
    x, y = dls.one_batch()
    assert x.shape == (2, 1, 16, 12, 20) and y.shape == (2, 16, 12, 20)
    assert torch.equal(x[:, 0].long(), y)
    xv, yv = dls.valid.one_batch()
    assert torch.equal(yv[0], vols[4][0, 7:23, 8:20, 3:23].long())


def test_errors():
    "Bad arguments name themselves"
    u = efficientnet_unet("b0", n_out=2, ni=1, ndim=3)
    v = torch.randn(1, 40, 40, 40)
    for kw, msg in [
        (dict(patch_size=0), "`patch_size` must be"),
        (dict(patch_size=32, mode="cosine"), "`mode` must be"),
        (dict(patch_size=32, overlap=-0.1), "`overlap` must be"),
        (dict(patch_size=32, tta=(0, 5)), "`tta` must be"),
        (dict(patch_size=32, bs=2.5), "`bs` must be"),
    ]:
        with pytest.raises(ValueError, match=msg):
            predict_volume(u, v, progress=False, **kw)
    with pytest.raises(ValueError, match="2 channels, the model expects 1"):
        predict_volume(u, torch.randn(2, 40, 40, 40), 32, progress=False)
    with pytest.raises(TypeError, match="`volume` must be a floating-point tensor"):
        predict_volume(u, v.numpy(), 32)


def test_learner_predict_volume_2d(tmp_path):
    "2D images: the tiles go through fastai's IntToFloatTensor (and Normalize, when there is one), as the images did"
    from PIL import Image
    from fastai.data.transforms import Normalize
    from effnet_fastai.segdata import seg_dls

    rng = np.random.default_rng(0)
    for d in ("images", "labels"):
        (tmp_path / d).mkdir()
    for i in range(6):
        m = np.zeros((32, 32), np.uint8)
        m[4:14, 4 + i : 14 + i] = 1
        Image.fromarray((m[..., None] * 90 + rng.integers(0, 40, (32, 32, 3))).astype(np.uint8)).save(
            tmp_path / "images" / f"{i}.png"
        )
        Image.fromarray(m).save(tmp_path / "labels" / f"{i}.png")
    dls = seg_dls(tmp_path, kind="image", bs=2)
    learn = efficientnet_unet_learner(dls, "b0")
    img = torch.from_numpy(np.asarray(Image.open(tmp_path / "images" / "0.png"))).permute(2, 0, 1).float()  # 0..255
    labels, probs = learn.predict_volume(img, progress=False)  # one tile: the image is the patch
    assert labels.shape == (32, 32) and probs.shape == (2, 32, 32)
    x = img[None] / 255
    norms = [f for f in dls.valid.after_batch.fs if isinstance(f, Normalize)]
    for f in norms:
        x = (x - f.mean.cpu()) / f.std.cpu()
    with torch.no_grad():
        ref = learn.model.eval()(x).softmax(1)[0]
    assert rel(probs, ref) < 1e-5
