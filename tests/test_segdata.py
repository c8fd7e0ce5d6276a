"Segmentation data: mask files, the folder layouts, their errors, batches, aligned augmentation, loss and metrics"

import math
import numpy as np, pandas as pd, pytest, torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from fastai.learner import Learner
from fastai.torch_core import TensorImage, TensorMask
from effnet_fastai.data import *
from effnet_fastai.segdata import *

nib = pytest.importorskip("nibabel")


def save(path, a):
    "Save `a` to `path` by its extension (NIfTI, .npy, .npz)"
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".nii.gz"):
        nib.save(nib.Nifti1Image(np.asarray(a, np.float32), np.eye(4)), str(path))
    elif path.suffix == ".npz":
        np.savez(path, a)
    else:
        np.save(path, a)


def pair(root, stem, img_ext=".npy", lbl_ext=".npy", shape=(6, 8, 8), layout=("images", "labels"), n=3):
    "Write a random volume and its labels in `0..n-1`"
    v = np.random.rand(*shape).astype(np.float32)
    save(root / layout[0] / f"{stem}{img_ext}", v)
    save(root / layout[1] / f"{stem}{lbl_ext}", np.minimum((v * n).astype(np.uint8), n - 1))


def load_item(dls, name):
    "The item of `dls` whose image is `name`, through its type and item transforms (as a batch would load it)"
    for ds in (dls.train_ds, dls.valid_ds):
        for i, (img, _) in enumerate(ds.items):
            if img.name == name:
                return dls.train.after_item(ds[i])
    raise KeyError(name)


# ---------------------------------------------------------------- mask files
@pytest.mark.parametrize("name", ["m.npy", "m.npz", "m.nii.gz", "m.pt"])
def test_load_mask_formats(tmp_path, name):
    lbl = np.random.randint(0, 4, (5, 6, 7))
    if name.endswith(".pt"):
        torch.save(torch.tensor(lbl)[None], tmp_path / name)  # a channel of one is dropped
    else:
        save(tmp_path / name, lbl.astype(np.float32))  # integer floats are labels
    m = load_mask(tmp_path / name)
    assert type(m) is TensorMask3D and m.dtype == torch.int64 and m.shape == (5, 6, 7)
    assert torch.equal(m, torch.tensor(lbl))


@pytest.mark.parametrize(
    "a,msg",
    [
        (np.full((3, 3, 3), 1.5), "expected integer labels, found the value 1.5"),
        (np.full((3, 3, 3), np.nan), "expected integer labels, found the value nan"),
        (-np.ones((3, 3, 3)), "labels must be >= 0, found -1"),
        (np.zeros((3, 3)), "found shape (3, 3)"),
        (np.zeros((2, 3, 3, 3)), "found shape (2, 3, 3, 3)"),
        (np.zeros((3, 3, 3), complex), "expected integer labels, found dtype complex128"),
    ],
)
def test_load_mask_refuses_by_file(tmp_path, a, msg):
    save(tmp_path / "bad.npy", a)
    with pytest.raises(ValueError) as e:
        load_mask(tmp_path / "bad.npy")
    assert str(tmp_path / "bad.npy") in str(e.value) and msg in str(e.value)


def test_load_mask_n_out(tmp_path):
    save(tmp_path / "m.npy", np.full((3, 3, 3), 4, np.uint8))
    assert load_mask(tmp_path / "m.npy", n_out=5).max() == 4
    with pytest.raises(ValueError, match=r"m.npy: label 4 is outside 0..3 \(`n_out`=4\)"):
        load_mask(tmp_path / "m.npy", n_out=4)


# ---------------------------------------------------------------- layouts
def test_images_labels_mixed_extensions(tmp_path):
    pair(tmp_path, "a", ".nii.gz", ".npy")
    pair(tmp_path, "b", ".npy", ".nii.gz")
    pair(tmp_path, "c", ".npz", ".npz")
    items = seg_items(tmp_path)
    assert [(i.name, lbl.name) for i, lbl in items] == [
        ("a.nii.gz", "a.npy"),
        ("b.npy", "b.nii.gz"),
        ("c.npz", "c.npz"),
    ]


def test_decathlon_layout(tmp_path):
    for s in ("la_003", "la_004", "la_007"):
        pair(tmp_path, s, ".nii.gz", ".nii.gz", layout=("imagesTr", "labelsTr"))
    (tmp_path / "imagesTr" / "._la_003.nii.gz").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS archive debris
    save(tmp_path / "imagesTs" / "la_001.nii.gz", np.zeros((4, 4, 4)))  # the test set has no labels
    assert [i.name for i, _ in seg_items(tmp_path)] == ["la_003.nii.gz", "la_004.nii.gz", "la_007.nii.gz"]


def test_csv_layout(tmp_path):
    pair(tmp_path / "data", "x", ".npy", ".npz")
    pair(tmp_path / "data", "y", ".nii.gz", ".npy")
    pd.DataFrame(
        {"label": ["data/labels/x.npz", "data/labels/y.npy"], "image": ["data/images/x.npy", "data/images/y.nii.gz"]}
    ).to_csv(tmp_path / "pairs.csv", index=False)
    items = seg_items(tmp_path / "pairs.csv")
    assert [(i.name, lbl.name) for i, lbl in items] == [("x.npy", "x.npz"), ("y.nii.gz", "y.npy")]
    assert all(p.exists() for it in items for p in it)


# ---------------------------------------------------------------- the three errors, naming the file
def test_missing_partner_names_the_file(tmp_path):
    pair(tmp_path, "a")
    save(tmp_path / "images" / "b.nii.gz", np.zeros((4, 4, 4)))
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}/images/b.nii.gz: no label named b"):
        seg_items(tmp_path)
    (tmp_path / "images" / "b.nii.gz").unlink()
    save(tmp_path / "labels" / "c.npy", np.zeros((4, 4, 4)))
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}/labels/c.npy: no image named c"):
        seg_items(tmp_path)
    pd.DataFrame({"image": ["images/a.npy"], "label": ["labels/zz.npy"]}).to_csv(tmp_path / "p.csv", index=False)
    with pytest.raises(FileNotFoundError, match="p.csv, row 1: label file not found: .*labels/zz.npy"):
        seg_items(tmp_path / "p.csv")


def test_label_outside_n_out_names_the_file(tmp_path):
    for s in "abcd":
        pair(tmp_path, s, n=2)
    dls = seg_dls(tmp_path, n_out=2, bs=2)
    save(tmp_path / "labels" / "c.npy", np.full((6, 8, 8), 2, np.uint8))  # broken after the DataLoaders were built
    with pytest.raises(ValueError, match=f"{tmp_path}/labels/c.npy: label 2 is outside 0..1"):
        load_item(dls, "c.npy")


def test_shape_mismatch_names_the_file(tmp_path):
    for s in "abcd":
        pair(tmp_path, s)
    save(tmp_path / "labels" / "b.npy", np.zeros((6, 8, 9), np.uint8))
    dls = seg_dls(tmp_path, n_out=3, bs=2)
    with pytest.raises(
        ValueError, match=rf"{tmp_path}/labels/b.npy: the mask's shape \(6, 8, 9\) differs from its image's \(6, 8, 8\)"
    ):
        load_item(dls, "b.npy")


def test_bad_arguments(tmp_path):
    pair(tmp_path, "a")
    with pytest.raises(ValueError, match="`kind` must be 'volume' or 'image'"):
        seg_dls(tmp_path, kind="video")
    with pytest.raises(ValueError, match="`codes` names 2 classes but `n_out` is 3"):
        seg_dls(tmp_path, n_out=3, codes=["a", "b"])
    with pytest.raises(ValueError, match="expected a folder holding images/ and labels/"):
        seg_items(tmp_path / "images")
    with pytest.raises(FileNotFoundError, match="data not found"):
        seg_items(tmp_path / "nope")


# ---------------------------------------------------------------- batches
def test_volume_batch(tmp_path):
    for i, s in enumerate("abcde"):
        pair(tmp_path, s, ".nii.gz" if i % 2 else ".npy", ".npz", shape=(6 + i, 8, 8))
    dls = seg_dls(tmp_path, size=(4, 8, 8), bs=2)
    assert (dls.c, dls.codes) == (3, ["background", "1", "2"])  # from the labels' maximum
    xb, yb = dls.one_batch()
    assert type(xb) is TensorVolume and xb.shape == (2, 1, 4, 8, 8) and xb.dtype == torch.float32
    assert type(yb) is TensorMask3D and yb.shape == (2, 4, 8, 8) and yb.dtype == torch.int64
    assert set(yb.unique().tolist()) <= {0, 1, 2}


def test_image_batch(tmp_path):
    for i in range(4):
        a = np.random.randint(0, 255, (20, 24, 3), dtype=np.uint8)
        (tmp_path / "images").mkdir(exist_ok=True)
        (tmp_path / "labels").mkdir(exist_ok=True)
        Image.fromarray(a).save(tmp_path / "images" / f"{i}.png")
        lbl = Image.fromarray((a[..., 0] // 100).astype(np.uint8), mode="P")  # a palette mask: indices 0, 1, 2
        lbl.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
        lbl.save(tmp_path / "labels" / f"{i}.png")
    dls = seg_dls(tmp_path, kind="image", size=16, bs=2, codes=["bg", "a", "b"])
    xb, yb = dls.one_batch()
    assert type(xb) is TensorImage and xb.shape == (2, 3, 16, 16)
    assert type(yb) is TensorMask and yb.shape == (2, 16, 16) and yb.dtype == torch.int64
    assert set(yb.unique().tolist()) <= {0, 1, 2} and (dls.c, dls.codes) == (3, ["bg", "a", "b"])


def test_synthetic_batch_and_determinism():
    ds = ShapeSegVolumes(10, size=16, seed=2)
    assert torch.equal(ds[3][1], ShapeSegVolumes(10, size=16, seed=2)[3][1])
    dls = synthetic_seg_dls(16, size=16, bs=4)
    xb, yb = dls.one_batch()
    assert xb.shape == (4, 1, 16, 16, 16) and yb.shape == (4, 16, 16, 16) and yb.dtype == torch.int64
    assert (dls.c, dls.codes) == (4, ["background", "sphere", "cylinder", "torus"])


def test_synthetic_mask_is_the_bright_part():
    x, m = shape_seg_volume(24, np.random.default_rng(5), noise=(0, 0))
    assert m.max() >= 1 and np.array_equal(m > 0, x[0] > x.min() + 1e-3)


# ---------------------------------------------------------------- aligned augmentation
def balls(n, size=16):
    g = torch.arange(size) + 0.5
    c, r = torch.rand(n, 3) * size / 2 + size / 4, torch.rand(n) * size / 8 + size / 6
    d = sum((g.view(*[-1 if j == i else 1 for j in range(3)]) - c[:, i].view(n, 1, 1, 1)) ** 2 for i in range(3))
    return (d < r.view(n, 1, 1, 1) ** 2).float()[:, None]


def test_affine_keeps_mask_on_volume():
    x = TensorVolume(balls(8))
    m = TensorMask3D(x[:, 0].long())
    y, ym = Affine3D(max_zoom=1.0, max_rotate=0.0)((x, m), split_idx=0)
    assert torch.equal(ym, (y[:, 0] > 0.5).long())  # flips: exact
    y, ym = Affine3D(max_zoom=1.3, max_rotate=20.0)((x, m), split_idx=0)
    assert ((y[:, 0] > 0.5).long() == ym).float().mean() >= 0.99  # zoom and rotation: boundary voxels may differ
    assert type(ym) is TensorMask3D and ym.dtype == torch.int64
    assert Affine3D()((x, m), split_idx=1)[1] is m  # the validation set is left alone


def test_batch_augmentation_keeps_synthetic_masks():
    "Through the DataLoaders: the mask of an augmented batch is still where the (noise-free) volume is bright"
    dls = ShapeSegVolumes(8, size=16, seed=1, noise=(0, 0)).dataloaders(bs=8, valid_pct=0.0)
    xb, yb = dls.train.one_batch()
    bright = xb[:, 0] > (xb.amin((1, 2, 3, 4)) + xb.amax((1, 2, 3, 4))).view(-1, 1, 1, 1) / 2
    assert (bright == (yb > 0)).float().mean() >= 0.99


def test_resize_mask_nearest():
    m = torch.randint(0, 5, (3, 4, 5))
    r = Resize3D((6, 8, 10))(TensorMask3D(m))
    assert type(r) is TensorMask3D and r.dtype == torch.int64
    assert torch.equal(r, m.repeat_interleave(2, 0).repeat_interleave(2, 1).repeat_interleave(2, 2))


# ---------------------------------------------------------------- loss
def test_loss_decreases_as_prediction_improves():
    targ = torch.randint(0, 3, (2, 5, 6, 7))
    onehot = F.one_hot(targ, 3).movedim(-1, 1).float()
    for loss in (DiceCELoss(), DiceCELoss(ignore_bg=True), DiceCELoss(ce_weight=0.0), DiceCELoss(dice_weight=0.0)):
        values = [loss(s * (2 * onehot - 1), targ).item() for s in (0.0, 0.5, 1.0, 2.0, 4.0)]
        assert values == sorted(values, reverse=True), (loss, values)


def test_loss_is_ce_plus_dice_2d_and_3d():
    for shape in ((2, 4, 5), (2, 4, 5, 6)):
        targ = torch.randint(0, 3, shape)
        logits = torch.randn(shape[0], 3, *shape[1:])
        p = logits.softmax(1)
        t = F.one_hot(targ, 3).movedim(-1, 1).float()
        dims = tuple(range(2, p.ndim))
        dice = 1 - (2 * (p * t).sum(dims) + 1) / ((p + t).sum(dims) + 1)
        ce = F.cross_entropy(logits, targ)
        assert torch.allclose(DiceCELoss()(logits, targ), ce + dice.mean(), atol=1e-6)
        assert torch.allclose(
            DiceCELoss(ignore_bg=True, ce_weight=2.0)(logits, targ), 2 * ce + dice[:, 1:].mean(), atol=1e-6
        )
        assert DiceCELoss(reduction="none")(logits, targ).shape == (shape[0],)
        assert torch.equal(DiceCELoss().decodes(logits), logits.argmax(1))


def test_learner_get_preds_decoded():
    dls = synthetic_seg_dls(16, size=8, bs=4, seed=0)
    learn = Learner(dls, nn.Conv3d(1, dls.c, 1), loss_func=DiceCELoss(), metrics=[foreground_dice, DicePerClass(cls=1)])
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-2)
    preds, targs, dec = learn.get_preds(with_decoded=True)
    n = len(dls.valid_ds)
    assert preds.shape == (n, dls.c, 8, 8, 8) and torch.allclose(preds.sum(1), torch.ones(n, 8, 8, 8), atol=1e-5)
    assert dec.shape == targs.shape and dec.dtype == torch.int64
    assert learn.recorder.metric_names[-3:-1] == ["foreground_dice", "dice_1"]


# ---------------------------------------------------------------- metrics
def test_dice_by_hand():
    targ = torch.tensor([[0, 0, 1, 1, 2, 2]])
    pred = F.one_hot(torch.tensor([[0, 1, 1, 1, 2, 0]]), 4).movedim(-1, 1).float()
    m = DicePerClass()
    m.reset()
    m.add(pred, targ)
    assert np.allclose(m.value[:3], [0.5, 0.8, 2 / 3]) and math.isnan(m.value[3])
    fg = ForegroundDice()
    fg.reset()
    fg.add(pred, targ)
    assert math.isclose(fg.value, (0.8 + 2 / 3) / 2, rel_tol=1e-6)


def test_dice_accumulates_over_batches():
    targ, logits = torch.randint(0, 3, (4, 5, 6, 7)), torch.randn(4, 3, 5, 6, 7)
    whole, parts = DicePerClass(), DicePerClass()
    whole.reset(), parts.reset()
    whole.add(logits, targ)
    for i in range(4):
        parts.add(logits[i : i + 1], targ[i : i + 1])
    assert np.allclose(whole.value, parts.value)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("include_background", [True, False])
def test_dice_matches_monai(ndim, include_background):
    from monai.metrics import DiceMetric

    targ = torch.randint(0, 4, (1, *(7,) * ndim))
    logits = torch.randn(1, 4, *(7,) * ndim)
    onehot = lambda lbl: F.one_hot(lbl, 4).movedim(-1, 1).float()
    ref = DiceMetric(include_background=include_background, reduction="mean_batch")(
        onehot(logits.argmax(1)), onehot(targ)
    )
    m = DicePerClass()
    m.reset()
    m.add(logits, targ)
    assert np.allclose(m.value[int(not include_background) :], ref.numpy(), atol=1e-6)
    if not include_background:
        fg = ForegroundDice()
        fg.reset()
        fg.add(logits, targ)
        assert math.isclose(fg.value, ref.mean().item(), abs_tol=1e-6)


def test_dice_refuses_labels_beyond_classes():
    m = DicePerClass()
    m.reset()
    with pytest.raises(ValueError, match="outside the 2 classes"):
        m.add(torch.randn(1, 2, 4, 4), torch.full((1, 4, 4), 2))
