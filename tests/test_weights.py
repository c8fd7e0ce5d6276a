"Pretrained weights: downloads from a local HTTP server, every failure path, stem adaptation, head re-init, inflation"

import hashlib, http.server, io, socket, threading, warnings
import pytest, torch
import effnet_fastai.weights as W
from effnet_fastai.factories import efficientnet_b0, efficientnet_b1
from effnet_fastai.weights import WeightSource, load_pretrained

# ---------------------------------------------------------------- a local server serving files the tests make


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        srv = self.server
        srv.requests.append(self.path)
        f = srv.root / self.path.lstrip("/")
        if not f.is_file():
            self.send_error(404)
            return
        body = f.read_bytes()
        cut = self.path.startswith("/truncated/")
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2] if cut else body)  # announced length, half the bytes, then close
        if cut:
            self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    "An HTTP server on 127.0.0.1 serving `tmp_path/'www'`; `.url(name)`, `.put(name, bytes)`, `.requests`"
    root = tmp_path / "www"
    (root / "truncated").mkdir(parents=True)
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.root, srv.requests, srv.timeout = root, [], 5
    srv.url = lambda name: f"http://127.0.0.1:{srv.server_address[1]}/{name}"

    def put(name, data):
        (root / name).write_bytes(data)
        return srv.url(name)

    srv.put = put
    t = threading.Thread(target=srv.serve_forever, kwargs=dict(poll_interval=0.05), daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    t.join(5)


@pytest.fixture(autouse=True)
def hub(tmp_path, monkeypatch):
    "A fresh torch hub cache for every test"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    return tmp_path / "torch" / "hub" / "checkpoints"


def _bytes(sd, legacy=False):
    "What `torch.save` writes; `legacy`: the pre-1.6 format efficientnet-pytorch's release files are in"
    buf = io.BytesIO()
    torch.save(sd, buf, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


def _named(stem, data):
    "`stem-<sha256 prefix>.pth`: torch hub's naming, which the loader verifies"
    return f"{stem}-{hashlib.sha256(data).hexdigest()[:8]}.pth"


@pytest.fixture(scope="module")
def lukemelas_b0():
    "A randomly initialised efficientnet-pytorch b0 (TF SAME padding) and its state dict's bytes"
    from efficientnet_pytorch import EfficientNet as LM

    torch.manual_seed(1)
    m = LM.from_name("efficientnet-b0").eval()
    with torch.no_grad():  # random BatchNorm statistics, so that they matter
        for o in m.modules():
            if isinstance(o, torch.nn.BatchNorm2d):
                o.running_mean.normal_(0, 0.1)
                o.running_var.uniform_(0.5, 1.5)
    return m, _bytes(m.state_dict(), legacy=True)


@pytest.fixture(scope="module")
def ours_b0():
    torch.manual_seed(2)
    m = efficientnet_b0(ndim=2, num_classes=1000).eval()
    return m, _bytes(m.state_dict())


def _serve_as(monkeypatch, server, tag, variant, data, stem="efficientnet-b0", source="lukemelas", sha256=None):
    url = server.put(_named(stem, data), data)
    monkeypatch.setitem(W.WEIGHTS[tag], variant, WeightSource(url, source, sha256))
    return url


def _snapshot(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def _unchanged(m, before):
    now = m.state_dict()
    return now.keys() == before.keys() and all(torch.equal(now[k], before[k]) for k in now)


# ---------------------------------------------------------------- downloads and the cache


def test_download_then_cache_hit(monkeypatch, server, hub, lukemelas_b0):
    lm, data = lukemelas_b0
    url = _serve_as(monkeypatch, server, "imagenet", "b0", data)
    m = efficientnet_b0(pretrained=True, ndim=2, num_classes=1000, progress=False).eval()
    assert server.requests == ["/" + url.rsplit("/", 1)[1]]
    assert (hub / url.rsplit("/", 1)[1]).read_bytes() == data
    assert [p.name for p in hub.iterdir()] == [url.rsplit("/", 1)[1]]  # no temporary file left
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(m(x), lm(x), atol=1e-4, rtol=1e-4)
    m2 = efficientnet_b0(pretrained=True, ndim=2, num_classes=1000, progress=False)
    assert len(server.requests) == 1  # cache hit: no second request
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))


def test_full_sha256_and_progress(monkeypatch, server, ours_b0):
    _, data = ours_b0
    url = server.put("b0.pth", data)  # no prefix in the name: the table's full digest is checked
    monkeypatch.setitem(
        W.WEIGHTS["imagenet"], "b0", WeightSource(url, "effnet_fastai", hashlib.sha256(data).hexdigest())
    )
    efficientnet_b0(pretrained=True, ndim=2, progress=True)
    monkeypatch.setitem(
        W.WEIGHTS["imagenet"], "b0", WeightSource(server.put("c0.pth", data), "effnet_fastai", "0" * 64)
    )
    with pytest.raises(ValueError, match="failed its SHA-256 check"):
        efficientnet_b0(pretrained=True, ndim=2)


def test_hash_mismatch(monkeypatch, server, hub, ours_b0):
    _, data = ours_b0
    url = server.put("efficientnet-b0-00000000.pth", data)
    monkeypatch.setitem(W.WEIGHTS["imagenet"], "b0", WeightSource(url, "effnet_fastai"))
    m = efficientnet_b0(ndim=2)
    m.variant = "b0"
    before = _snapshot(m)
    with pytest.raises(ValueError, match="failed its SHA-256 check: expected 00000000"):
        load_pretrained(m, True, progress=False)
    assert _unchanged(m, before)
    assert list(hub.iterdir()) == []  # nothing cached under the final name, no partial file


def test_corrupt_cached_file(monkeypatch, server, hub, ours_b0):
    _, data = ours_b0
    url = _serve_as(monkeypatch, server, "imagenet", "b0", data, source="effnet_fastai")
    efficientnet_b0(pretrained=True, ndim=2, progress=False)
    f = hub / url.rsplit("/", 1)[1]
    f.write_bytes(data[: len(data) // 2])
    m = efficientnet_b0(ndim=2)
    before = _snapshot(m)
    with pytest.raises(ValueError, match="cached file .* failed its SHA-256 check"):
        load_pretrained(m, True, progress=False)
    assert _unchanged(m, before) and len(server.requests) == 1


def test_truncated_download(monkeypatch, server, hub, ours_b0):
    _, data = ours_b0
    name = _named("efficientnet-b0", data)
    (server.root / "truncated" / name).write_bytes(data)
    monkeypatch.setitem(W.WEIGHTS["imagenet"], "b0", WeightSource(server.url(f"truncated/{name}"), "effnet_fastai"))
    m = efficientnet_b0(ndim=2)
    before = _snapshot(m)
    with pytest.raises(ValueError, match="truncated"):
        load_pretrained(m, True, progress=False)
    assert _unchanged(m, before) and list(hub.iterdir()) == []


def test_corrupt_file_with_matching_hash(monkeypatch, server, ours_b0):
    _, data = ours_b0
    bad = data[: len(data) // 3]  # the name's hash is that of these bytes: the download passes, reading fails
    _serve_as(monkeypatch, server, "imagenet", "b0", bad, source="effnet_fastai")
    m = efficientnet_b0(ndim=2)
    before = _snapshot(m)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_pretrained(m, True, progress=False)
    assert _unchanged(m, before)


def test_wrong_variant(monkeypatch, server):
    from efficientnet_pytorch import EfficientNet as LM

    m = efficientnet_b0(ndim=3, ni=1)
    before = _snapshot(m)
    for sd, src in (
        (efficientnet_b1(ndim=2, num_classes=1000).state_dict(), "effnet_fastai"),
        (LM.from_name("efficientnet-b1").state_dict(), "lukemelas"),
    ):
        _serve_as(monkeypatch, server, "imagenet", "b0", _bytes(sd), source=src)
        with pytest.raises(ValueError, match="does not hold EfficientNet-b0 ImageNet weights"):
            load_pretrained(m, True, progress=False)
        assert _unchanged(m, before)


def test_offline_message(monkeypatch, hub):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there
    url = f"http://127.0.0.1:{port}/efficientnet-b0-355c32eb.pth"
    monkeypatch.setitem(W.WEIGHTS["imagenet"], "b0", WeightSource(url, "lukemelas"))
    with pytest.raises(ConnectionError) as e:
        efficientnet_b0(pretrained=True, progress=False)
    msg = str(e.value)
    assert url in msg and str(hub / "efficientnet-b0-355c32eb.pth") in msg and "Offline?" in msg and "355c32eb" in msg


def test_http_error(server):
    with pytest.raises(ConnectionError, match="404"):
        efficientnet_b0(pretrained=server.url("missing-0123abcd.pth"), progress=False)


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))  # unpickling would create the file


def test_malicious_pickle_refused(monkeypatch, server, tmp_path):
    target = tmp_path / "pwned"
    sd = dict(efficientnet_b0(ndim=2, num_classes=1000).state_dict())
    sd["stem.0.weight"] = _Evil(target)
    data = _bytes(sd)
    _serve_as(monkeypatch, server, "imagenet", "b0", data, source="effnet_fastai")
    m = efficientnet_b0(ndim=2)
    before = _snapshot(m)
    with pytest.raises(ValueError, match="holds more than tensors"):
        load_pretrained(m, True, progress=False)
    assert not target.exists() and _unchanged(m, before)
    # the same file given by path is refused as well
    f = tmp_path / "evil.pth"
    f.write_bytes(data)
    with pytest.raises(ValueError, match="holds more than tensors"):
        efficientnet_b0(pretrained=f)
    assert not target.exists()


def test_bad_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a tag of WEIGHTS"):
        efficientnet_b0(pretrained="imagenett")
    with pytest.raises(ValueError, match="no 'imagenet' weights for EfficientNet-b8"):
        W.weight_source("b8", "imagenet")
    m = efficientnet_b0(ndim=2)
    del m.variant
    with pytest.raises(ValueError, match="reads `m.variant`"):
        load_pretrained(m, tmp_path / "x.pth")
    with pytest.raises(ValueError, match="`inflate` must be 'center' or 'mean'"):
        efficientnet_b0(pretrained=tmp_path, inflate="max")
    with pytest.raises(ValueError, match="2D weights initialise 2D and 3D models"):
        f = tmp_path / "b0.pth"
        torch.save(efficientnet_b0(ndim=2, num_classes=1000).state_dict(), f)
        efficientnet_b0(pretrained=f, ndim=1)


# ---------------------------------------------------------------- the factories' sources, end to end


def test_torchvision_source(monkeypatch, server):
    import torchvision

    torch.manual_seed(3)
    tv = torchvision.models.efficientnet_b0().eval()
    with torch.no_grad():
        for o in tv.modules():
            if isinstance(o, torch.nn.BatchNorm2d):
                o.running_mean.normal_(0, 0.1)
                o.running_var.uniform_(0.5, 1.5)
    data = _bytes(tv.state_dict())
    url = server.put(_named("efficientnet_b0_rwightman", data), data)
    monkeypatch.setitem(
        W.WEIGHTS["torchvision"],
        "b0",
        WeightSource(url, "torchvision", None, W.WEIGHTS["torchvision"]["b0"].model_kwargs),
    )
    m = efficientnet_b0(pretrained="torchvision", ndim=2, num_classes=1000, progress=False).eval()
    assert m.stem[1].eps == 1e-5 and m.stem[0].padding == (1, 1)  # the checkpoint's padding and BatchNorm eps
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(m(x), tv(x), atol=1e-4, rtol=1e-4)


def test_any_url_and_local_file(server, tmp_path, lukemelas_b0):
    lm, data = lukemelas_b0
    url = server.put("any-name.pth", data)  # no hash in the name: nothing to verify but the contents
    x = torch.randn(1, 3, 32, 32)
    m = efficientnet_b0(pretrained=url, ndim=2, num_classes=1000, progress=False).eval()
    with torch.no_grad():
        torch.testing.assert_close(m(x), lm(x), atol=1e-4, rtol=1e-4)
    f = tmp_path / "local.pth"
    f.write_bytes(data)
    m2 = efficientnet_b0(pretrained=str(f), ndim=2, num_classes=1000).eval()
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))


# ---------------------------------------------------------------- adapting to the model


@pytest.fixture
def b0_file(tmp_path, ours_b0):
    f = tmp_path / "b0.pth"
    f.write_bytes(ours_b0[1])
    return f


def test_grey_stem_is_exact(b0_file, ours_b0):
    ref = ours_b0[0]
    grey = efficientnet_b0(pretrained=b0_file, ndim=2, ni=1, num_classes=1000).eval()
    g = torch.randn(2, 1, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(grey(g), ref(g.expand(-1, 3, -1, -1)), atol=1e-4, rtol=1e-4)


def test_multichannel_stem(b0_file, ours_b0):
    ref = ours_b0[0]
    m = efficientnet_b0(pretrained=b0_file, ndim=2, ni=4, num_classes=1000).eval()
    assert m.stem[0].weight.abs().sum() > 0
    g = torch.randn(1, 1, 32, 32)  # the same image on every channel: the RGB model's response
    with torch.no_grad():
        torch.testing.assert_close(m(g.expand(-1, 4, -1, -1)), ref(g.expand(-1, 3, -1, -1)), atol=1e-4, rtol=1e-4)


def test_head_reinitialised(b0_file, ours_b0):
    ref = ours_b0[0]
    with pytest.warns(UserWarning, match="re-initialised for num_classes=10"):
        m = efficientnet_b0(pretrained=b0_file, ndim=2, num_classes=10)
    assert m.fc.weight.shape == (10, 1280) and m.fc.bias.abs().sum() == 0 and m.fc.weight.std() > 0
    assert torch.equal(m.head[0].weight, ref.head[0].weight) and torch.equal(
        m.stage7[0].project[1].running_var, ref.stage7[0].project[1].running_var
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no message without a classifier
        feats = efficientnet_b0(pretrained=b0_file, ndim=2, num_classes=0).eval()
    with torch.no_grad():
        x = torch.randn(1, 3, 32, 32)
        torch.testing.assert_close(feats(x), torch.nn.Sequential(*list(ref.children())[:-1])(x), atol=1e-5, rtol=1e-5)


def test_center_inflation_is_exact(b0_file, ours_b0):
    "Every depth, odd or even: SAME's stride-2 padding differs with the parity, the center tap never reads padding"
    ref = ours_b0[0]
    m = efficientnet_b0(pretrained=b0_file, ndim=3, num_classes=1000).eval()
    img = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for depth in (1, 2, 3, 4, 5, 8):
            torch.testing.assert_close(
                m(img.unsqueeze(2).expand(-1, -1, depth, -1, -1)), ref(img), atol=1e-4, rtol=1e-4
            )
        # a clip's stem and strides: (1,2,2) keeps the frames; the property holds for per-axis strides too
        v = efficientnet_b0(
            pretrained=b0_file,
            ndim=3,
            num_classes=1000,
            stem_stride=(1, 2, 2),
            strides=[1, (1, 2, 2), (1, 2, 2), 2, 1, 2, 1],
        ).eval()
        torch.testing.assert_close(v(img.unsqueeze(2).expand(-1, -1, 6, -1, -1)), ref(img), atol=1e-4, rtol=1e-4)


def test_mean_inflation_boundary(b0_file, ours_b0):
    ref = ours_b0[0]
    m = efficientnet_b0(pretrained=b0_file, ndim=3, num_classes=1000, inflate="mean").eval()
    img = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        s2 = ref.stem[0](img)
        for d in (8, 9):  # even: SAME pads one slice at the end; odd: one on each side
            s3 = m.stem[0](img.unsqueeze(2).expand(-1, -1, d, -1, -1))
            inner = slice(0, -1) if d % 2 == 0 else slice(1, -1)
            torch.testing.assert_close(
                s3[:, :, inner], s2.unsqueeze(2).expand_as(s3[:, :, inner]), atol=1e-5, rtol=1e-5
            )
            torch.testing.assert_close(s3[:, :, -1], s2 * 2 / 3, atol=1e-5, rtol=1e-5)
        # depth 1: the stride-2 window is padding, the slice, padding: a third of the response
        torch.testing.assert_close(m.stem[0](img.unsqueeze(2))[:, :, 0], s2 / 3, atol=1e-5, rtol=1e-5)


def test_inflated_kernels_follow_the_model(b0_file, ours_b0):
    ref = ours_b0[0]
    ks = [(1, 3, 3), (3, 3, 3), (1, 5, 5), (3, 3, 3), (3, 5, 5), (5, 5, 5), (1, 3, 3)]
    m = efficientnet_b0(pretrained=b0_file, ndim=3, kernels=ks, inflate="mean")
    torch.testing.assert_close(m.stage6[0].depthwise[0].weight.sum(2), ref.stage6[0].depthwise[0].weight)
    assert torch.equal(m.stage1[0].depthwise[0].weight[:, :, 0], ref.stage1[0].depthwise[0].weight)
    with pytest.raises(ValueError, match=r"stage1.0.depthwise.0.weight.*cannot build a \(3, 5, 5\) kernel"):
        efficientnet_b0(pretrained=b0_file, ndim=3, kernels=[(3, 5, 5)] + ks[1:])


def test_monai_file(tmp_path):
    "A MONAI checkpoint is recognised by its keys (blocks nested by stage) and gives MONAI's logits at its 224 px"
    from monai.networks.nets import EfficientNetBN

    torch.manual_seed(4)
    mo = EfficientNetBN("efficientnet-b0", spatial_dims=2, pretrained=False).eval()
    f = tmp_path / "monai_b0.pth"
    torch.save(mo.state_dict(), f)
    assert W.guess_source(mo.state_dict()) == "monai"
    m = efficientnet_b0(pretrained=f, ndim=2, num_classes=1000).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(m(x), mo(x), atol=1e-4, rtol=1e-4)


def test_timm_training_checkpoint(tmp_path):
    """A training checkpoint written by timm's own `CheckpointSaver` (`model_best.pth.tar`: state dict, optimizer state,
    epoch, the run's `args` as an `argparse.Namespace`) loads and gives timm's logits; before, `weights_only=True`
    refused it for the Namespace (a new user's case ported from timm's train.py --resume workflow)"""
    import argparse, pickle, timm
    from timm.utils import CheckpointSaver
    from helpers import randomize_, rel_diff, TOL

    torch.manual_seed(5)
    tm = timm.create_model("tf_efficientnet_b0")
    x = torch.randn(2, 3, 64, 80)
    opt = torch.optim.SGD(tm.parameters(), lr=0.1, momentum=0.9)
    tm.train()(x).logsumexp(1).mean().backward()
    opt.step()  # an optimizer with state, as after training
    randomize_(tm, x)
    args = argparse.Namespace(model="tf_efficientnet_b0", lr=0.1, epochs=3, batch_size=2)
    saver = CheckpointSaver(tm, opt, args=args, checkpoint_dir=str(tmp_path), recovery_dir=str(tmp_path))
    saver.save_checkpoint(epoch=0, metric=71.0)
    f = tmp_path / "model_best.pth.tar"
    with pytest.raises(pickle.UnpicklingError, match="argparse.Namespace"):
        torch.load(f, weights_only=True)  # the case is real
    m = efficientnet_b0(pretrained=f, ndim=2, num_classes=1000)
    assert rel_diff(tm, m, x) <= TOL


class _Config:  # a harmless class of the user's, not among the known-safe globals
    def __init__(self, lr):
        self.lr = lr


def test_unknown_global_named(tmp_path):
    "Any global besides the known-safe ones is still refused, by name, with the way to allow it deliberately"
    sd = dict(efficientnet_b0(ndim=2, num_classes=1000).state_dict())
    f = tmp_path / "odd.pth"
    torch.save({"state_dict": sd, "cfg": _Config(0.1)}, f)
    m = efficientnet_b0(ndim=2, num_classes=1000)
    before = _snapshot(m)
    with pytest.raises(ValueError, match=r"namely test_weights._Config, .*safe_globals=\[test_weights._Config\]"):
        load_pretrained(m, f)
    assert _unchanged(m, before)
    assert W.read_weights(f, safe_globals=[_Config]).keys() == sd.keys()
