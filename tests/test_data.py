"Readers, bad files, augmentation and the synthetic datasets"

import sys
import numpy as np, pytest, torch
from PIL import Image
from fastai.data.all import DataBlock, CategoryBlock, get_files, parent_label, RandomSplitter
from effnet_fastai.data import *


@pytest.fixture
def vol():
    return np.random.rand(5, 6, 7).astype(np.float32)


@pytest.mark.parametrize(
    "name,save",
    [
        ("v.npy", lambda f, v: np.save(f, v)),
        ("v.npz", lambda f, v: np.savez(f, v)),
        ("v.pt", lambda f, v: torch.save(torch.tensor(v), f)),
        ("v.pth", lambda f, v: torch.save(torch.tensor(v)[None], f)),
    ],
)
def test_read_formats(tmp_path, vol, name, save):
    save(tmp_path / name, vol)
    t = load_volume(tmp_path / name)
    assert t.shape == (1, 5, 6, 7) and t.dtype == torch.float32
    assert torch.equal(t[0], torch.tensor(vol))


def test_read_ints_and_channels(tmp_path):
    np.save(tmp_path / "i.npy", np.arange(2 * 3 * 4 * 5, dtype=np.int16).reshape(2, 3, 4, 5))
    t = load_volume(tmp_path / "i.npy")
    assert t.shape == (2, 3, 4, 5) and t.dtype == torch.float32 and t.max() == 119


@pytest.mark.parametrize(
    "name,write,msg",
    [
        ("garbage.npy", lambda f: f.write_bytes(b"\x00\x01 not numpy"), "could not read volume"),
        ("trunc.npy", lambda f: f.write_bytes(np.lib.format.magic(1, 0) + b"{"), "could not read volume"),
        ("empty.npy", lambda f: np.save(f, np.zeros((0, 3, 3))), "empty volume (shape (0, 3, 3))"),
        ("zero.npy", lambda f: f.write_bytes(b""), "could not read volume"),
        ("flat.npy", lambda f: np.save(f, np.zeros((3, 3))), "found shape (3, 3)"),
        ("five.npy", lambda f: np.save(f, np.zeros((1, 2, 3, 3, 3))), "found shape (1, 2, 3, 3, 3)"),
        (
            "bool.npy",
            lambda f: np.save(f, np.zeros((3, 3, 3), bool)),
            "expected a numeric volume, found dtype torch.bool",
        ),
        ("two.npz", lambda f: np.savez(f, a=np.zeros(3), b=np.zeros(3)), "exactly one array, found ['a', 'b']"),
        ("dict.pt", lambda f: torch.save({"a": torch.zeros(3)}, f), "expected a tensor, found a dict"),
        ("bad.pt", lambda f: f.write_bytes(b"nope"), "could not read volume"),
        ("vol.txt", lambda f: f.write_text("1 2 3"), "unsupported file type '.txt'"),
    ],
)
def test_bad_files(tmp_path, name, write, msg):
    f = tmp_path / name
    write(f)
    with pytest.raises(ValueError) as e:
        load_volume(f)
    assert str(f) in str(e.value) and msg in str(e.value), str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="volume file not found"):
        load_volume(tmp_path / "nope.npy")


def test_bad_file_in_datablock(tmp_path, vol):
    "A bad file met while loading batches names the file"
    for c in "ab":
        (tmp_path / c).mkdir()
        for i in range(3):
            np.save(tmp_path / c / f"{i}.npy", vol)
    np.save(tmp_path / "b" / "bad.npy", np.zeros((4, 4)))
    db = DataBlock(
        blocks=(VolumeBlock(), CategoryBlock),
        get_items=lambda p: get_files(p, extensions=".npy"),
        get_y=parent_label,
        splitter=RandomSplitter(0.5, seed=0),
    )
    dls = db.dataloaders(tmp_path, bs=2)
    with pytest.raises(ValueError, match=r"bad\.npy: expected a volume of shape"):
        for dl in (dls.train.new(shuffle=False, drop_last=False), dls.valid):
            for _ in dl:
                pass


def test_nifti(tmp_path, vol, monkeypatch):
    nib = pytest.importorskip("nibabel")
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / "v.nii.gz"))
    nib.save(nib.Nifti1Image(np.stack([vol, vol * 2], -1), np.eye(4)), str(tmp_path / "c.nii"))
    assert torch.equal(load_volume(tmp_path / "v.nii.gz")[0], torch.tensor(vol))
    c = load_volume(tmp_path / "c.nii")
    assert c.shape == (2, 5, 6, 7) and torch.allclose(c[1], 2 * torch.tensor(vol))
    (tmp_path / "bad.nii.gz").write_bytes(b"not gzip")
    with pytest.raises(ValueError, match="could not read volume .*bad.nii.gz"):
        load_volume(tmp_path / "bad.nii.gz")
    monkeypatch.setitem(sys.modules, "nibabel", None)  # as if nibabel were not installed
    with pytest.raises(ImportError, match="v.nii.gz needs the optional `nibabel`"):
        load_volume(tmp_path / "v.nii.gz")


def test_clips(tmp_path):
    np.save(tmp_path / "c.npy", (np.random.rand(4, 5, 6, 3) * 255).astype(np.uint8))
    c = load_clip(tmp_path / "c.npy")
    assert c.shape == (3, 4, 5, 6) and 0 <= c.min() and c.max() <= 1
    d = tmp_path / "frames"
    d.mkdir()
    Image.fromarray(np.zeros((5, 6), np.uint8)).save(d / "0.png")
    Image.fromarray(np.zeros((5, 7), np.uint8)).save(d / "1.png")
    with pytest.raises(ValueError, match="frames must have the same shape"):
        load_clip(d)
    np.save(tmp_path / "w.npy", np.zeros((2, 3, 4, 9)))
    with pytest.raises(ValueError, match=r"w\.npy: expected a clip .* found shape \(2, 3, 4, 9\)"):
        load_clip(tmp_path / "w.npy")
    (tmp_path / "e.npy").write_bytes(b"")
    with pytest.raises(ValueError, match=r"could not read clip .*e\.npy"):
        load_clip(tmp_path / "e.npy")


def test_augmentation_deterministic_and_train_only():
    x = TensorVolume(torch.randn(4, 1, 8, 8, 8))
    tfms = aug_transforms_3d()

    def run(seed):
        torch.manual_seed(seed)
        y = x
        for t in tfms:
            y = t(y, split_idx=0)
        return y

    assert torch.equal(run(0), run(0)) and not torch.equal(run(0), run(1))
    assert not torch.allclose(run(0), x)
    for t in tfms:
        assert torch.equal(t(x, split_idx=1), x)


def test_affine_identity_and_rotation():
    x = TensorVolume(torch.randn(2, 1, 6, 8, 8))
    ident = Affine3D(flip_axes=(), max_zoom=1.0, max_rotate=0.0)
    assert torch.allclose(ident(x, split_idx=0), x, atol=1e-5)
    # a 90 degree rotation in the (H, W) plane is exact on a square grid
    t = Affine3D(flip_axes=(), max_zoom=1.0, max_rotate=90.0)
    t.theta = lambda n, k, f=t.theta: _fixed(n, k)
    y = t(x, split_idx=0)
    assert any(torch.allclose(y, x.rot90(k, (-2, -1)), atol=1e-5) for k in (1, 3))


def _fixed(n, k):
    th = torch.zeros(n, k, k + 1)
    th[:, 0, 1], th[:, 1, 0], th[:, 2, 2] = -1.0, 1.0, 1.0
    return th


def test_resize():
    x = TensorVolume(torch.randn(1, 4, 4, 4))
    assert torch.allclose(Resize3D(8)(x).mean(), x.mean(), atol=0.2)
    assert Resize3D((2, 3, 5))(x).shape == (1, 2, 3, 5)


def test_synthetic_volumes_deterministic():
    a, b = ShapeVolumes(12, size=10, seed=7), ShapeVolumes(12, size=10, seed=7)
    for i in range(12):
        assert torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1]
    assert [a[i][1] for i in range(4)] == list(SHAPES)
    d1, d2 = a.dataloaders(bs=4), b.dataloaders(bs=4)
    assert list(d1.valid.get_idxs()) == list(d2.valid.get_idxs())
    assert torch.equal(d1.valid.one_batch()[0], d2.valid.one_batch()[0])


def _nearest_centroid(f, y):
    f = (f - f.mean(0)) / (f.std(0) + 1e-9)
    c = np.stack([f[y == k].mean(0) for k in range(4)])
    return (np.linalg.norm(f[:, None] - c[None], axis=-1).argmin(1) == y).mean()


def test_volumes_not_separable_by_intensity_statistics():
    n = 240
    y = np.arange(n) % 4
    vols = [shape_volume(SHAPES[k], 16, np.random.default_rng(i)) for i, k in enumerate(y)]

    def feats(v):
        z = (v - v.mean()) / v.std()
        return [v.mean(), v.std(), (z > 0).mean(), (z > 1).mean(), np.abs(z).mean()]

    acc = _nearest_centroid(np.array([feats(v) for v in vols]), y)
    assert acc < 0.4, acc  # chance is 0.25


def test_video_classes_need_motion():
    "Single frames carry no class information; the displacement between frames does"
    n = 240
    y = np.arange(n) % 4
    clips = [moving_shape_clip(DIRECTIONS[k], 16, 4, np.random.default_rng(i))[0] for i, k in enumerate(y)]

    def centroid(f):
        w = np.clip(f - np.median(f), 0, None)
        g = np.arange(f.shape[0])
        return [(w.sum(1) * g).sum() / w.sum(), (w.sum(0) * g).sum() / w.sum()]

    frame = np.array([[c[1].mean(), c[1].std(), *centroid(c[1])] for c in clips])
    assert _nearest_centroid(frame, y) < 0.4
    cc = lambda a, b: np.fft.ifft2(np.fft.fft2(a - a.mean()).conj() * np.fft.fft2(b - b.mean())).real

    def motion(c):
        dy, dx = np.unravel_index(cc(c[0], c[-1]).argmax(), c[0].shape)
        return [(dy + 8) % 16 - 8, (dx + 8) % 16 - 8]

    assert _nearest_centroid(np.array([motion(c) for c in clips]).astype(float), y) > 0.9
