"""The segmentation learner (issue 12): 2D images through fastai's blocks, pretrained (inflated) encoder weights with
`freeze`/`fine_tune`, mixed precision, export and load_learner, gradient checkpointing of the encoder."""

import copy, warnings
import numpy as np, pytest, torch
import torch.nn.functional as F
from PIL import Image
from fastai.learner import load_learner
from fastai.torch_core import set_seed
from effnet_fastai.factories import efficientnet_b0
from effnet_fastai.learner import efficientnet_unet_learner
from effnet_fastai.segdata import seg_dls, synthetic_seg_dls
from effnet_fastai.unet import efficientnet_unet
from helpers import b0_checkpoint

warnings.filterwarnings("ignore", message=".*torch.jit.script.*")


@pytest.fixture
def png_pairs(tmp_path):
    "Eight RGB images of a square and a disc, with their 3-class masks, as images/ and labels/ PNG files"
    rng = np.random.default_rng(0)
    for d in ("images", "labels"):
        (tmp_path / d).mkdir()
    yy, xx = np.mgrid[:32, :32]
    for i in range(8):
        m = np.zeros((32, 32), np.uint8)
        m[4:14, 4 + i : 14 + i] = 1
        m[(yy - 22) ** 2 + (xx - 20) ** 2 < 25] = 2
        img = (m[..., None] * 90 + rng.integers(0, 40, (32, 32, 3))).astype(np.uint8)
        Image.fromarray(img).save(tmp_path / "images" / f"{i}.png")
        Image.fromarray(m).save(tmp_path / "labels" / f"{i}.png")
    return tmp_path


def test_2d_images(png_pairs):
    "2D image/label pairs: the learner reads 3 channels and 3 classes, trains an epoch, predicts at the image's size"
    dls = seg_dls(png_pairs, kind="image", bs=2)
    learn = efficientnet_unet_learner(dls, "b0")
    assert (learn.ndim, learn.ni, learn.n_out) == (2, 3, 3)
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-3)
    preds, targs = learn.get_preds()
    assert preds.shape == (len(dls.valid_ds), 3, 32, 32) and targs.shape == (len(dls.valid_ds), 32, 32)


def test_pretrained_encoder_freeze_fine_tune(tmp_path):
    "Weights of a 2D b0 inflate into the 3D encoder; the learner starts frozen and `fine_tune` trains every group"
    f = b0_checkpoint(tmp_path / "b0.pth")
    dls = synthetic_seg_dls(8, size=16, bs=2)
    learn = efficientnet_unet_learner(dls, "b0", pretrained=f)
    ref = efficientnet_b0(pretrained=f, ni=1, ndim=3, num_classes=1000)
    assert torch.equal(learn.model.encoder.stage3[0].depthwise[0].weight, ref.stage3[0].depthwise[0].weight)
    assert not learn.model.encoder.stage2[0].expand[0].weight.requires_grad  # frozen
    before = learn.model.encoder.stage2[0].expand[0].weight.detach().clone()
    with learn.no_bar(), learn.no_logging():
        learn.fine_tune(1, 1e-3, freeze_epochs=1)
    assert learn.model.encoder.stage2[0].expand[0].weight.requires_grad
    assert not torch.equal(before, learn.model.encoder.stage2[0].expand[0].weight)


def test_mixed_precision_export_and_checkpointing(tmp_path):
    "bfloat16 autocast on the CPU, gradient checkpointing of the encoder, then export and load_learner"
    # Seeds 1 and 4 drew a NaN loss before the decoder stepped around oneDNN's bfloat16 weight-gradient bug
    # (`DepthPadConv3d`); the loss must be finite for all three.
    for seed in (0, 1, 4):
        set_seed(seed)
        dls = synthetic_seg_dls(8, size=16, bs=2)
        learn = efficientnet_unet_learner(dls, "b0", grad_checkpointing=True, path=tmp_path)
        learn.to_mixed_precision()
        assert all(s.grad_checkpointing for s in learn.model.encoder.stages)
        with learn.no_bar(), learn.no_logging():
            learn.fit(1, 1e-3)
        assert np.isfinite(learn.recorder.values[-1][:2]).all(), seed
    learn.export(tmp_path / "seg.pkl")
    loaded = load_learner(tmp_path / "seg.pkl")
    xb = dls.one_batch()[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.eval()(xb), learn.model.eval()(xb))


def test_bad_arguments():
    dls = synthetic_seg_dls(8, size=16, bs=2)
    with pytest.raises(ValueError, match="`decoder_channels` needs one width per feature point"):
        efficientnet_unet_learner(dls, "b0", decoder_channels=(8, 8))
    with pytest.raises(ValueError, match="unknown EfficientNet architecture 'b9'"):
        efficientnet_unet_learner(dls, "b9")


@pytest.mark.parametrize("speed_paths", [True, False], ids=["speed", "reference"])
def test_bf16_decoder_gradients(speed_paths):
    "Under bfloat16 autocast every decoder gradient is within bfloat16's error of float64's, on maps of depth 2 too"
    # 16^3 volumes: the decoder's second stage works on 2^3 maps, where oneDNN's bfloat16 weight gradient is wrong
    # unless the depth is padded explicitly (`DepthPadConv3d`): measured here, the worst decoder gradient is 0.11 off
    # with it and 0.66-0.96 off without (in training mode up to 1e36, or nan). Evaluation mode: BatchNorm over two
    # values per channel (the 1^3 maps of a batch of two) makes training-mode gradients too ill-conditioned to compare.
    torch.manual_seed(0)
    u = efficientnet_unet("b0", n_out=3, speed_paths=speed_paths).eval()
    x, t = torch.randn(2, 1, 16, 16, 16), torch.randint(0, 3, (2, 16, 16, 16))
    ref = copy.deepcopy(u).double()
    F.cross_entropy(ref(x.double()), t).backward()
    for _ in range(3):  # the bug reads memory it never wrote: one call may pass by chance
        u.zero_grad()
        with torch.autocast("cpu", torch.bfloat16):
            loss = F.cross_entropy(u(x).float(), t)
        loss.backward()
        for (n, p), q in zip(u.decoder.named_parameters(), ref.decoder.parameters()):
            err = ((p.grad.double() - q.grad).norm() / q.grad.norm()).item()
            assert err < 0.3, (n, err)
