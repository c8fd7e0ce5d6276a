"The benchmark script runs end to end and writes a report with every measure (one round: a smoke test, not a timing)"

import json, math, os, subprocess, sys
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(script, *args, timeout=900):
    "Run bench/`script` with `args` in a fresh interpreter; fails the test with its stderr when it fails"
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", script), *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": ROOT},
        timeout=timeout,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.mark.slow
def test_bench_report(tmp_path):
    out = tmp_path / "RESULTS.md"
    # the eager mode only: the other modes are test_bench_modes's
    args = ("--rounds", "1", "--no-rss", "--threads", "1", "--only", "3d_b0_64", "3d_b0_clip")
    run_script("bench.py", *args, "--out", str(out))
    md = out.read_text()
    for row in (
        "train step (ms)",
        "inference, after the train rounds (ms)",
        "inference, inference-only process (ms)",
        "saved for backward (MiB)",
        "**monai fails on this input**",
    ):
        assert row in md, row
    saved = json.loads((tmp_path / "RESULTS.json").read_text())
    res = saved["results"]
    peer = res["3d_b0_64"]["peers"]["monai"]
    assert set(peer) == {"train", "infer", "infer_fresh", "saved_bytes"}
    assert all(peer[k]["min"] <= peer[k]["median"] <= peer[k]["max"] for k in ("train", "infer", "infer_fresh"))
    assert (
        0.5 < peer["saved_bytes"] < 3
    )  # MONAI saves more for backward (measured 1.5x); a broken hook would give 0 or inf
    assert "monai" in res["3d_b0_clip"]["errors"] and "infer_fresh_s" in res["3d_b0_clip"]
    assert (tmp_path / "results.png").stat().st_size > 0
    assert saved["meta"]["rounds"] == 1 and "--only" in saved["meta"]["command"]
    out.write_text("")  # rendered again from the JSON alone: the same report, nothing measured
    run_script("bench.py", "--render", str(tmp_path / "RESULTS.json"), timeout=300)
    assert out.read_text() == md


@pytest.mark.slow
def test_bench_modes(tmp_path):
    "Three modes of one small workload in one run: finite times in each, the compiled models' warm-ups recorded"
    out = tmp_path / "RESULTS.md"
    modes = ("--modes", "eager,bf16,compile", "--compile-backend", "aot_eager")  # inductor: minutes, aot_eager: seconds
    run_script("bench.py", "--rounds", "1", "--no-rss", "--threads", "1", "--only", "3d_b0_32", *modes, "--out", out)
    res = json.loads((tmp_path / "RESULTS.json").read_text())["results"]
    assert list(res) == ["3d_b0_32", "3d_b0_32 [bf16]", "3d_b0_32 [compile]"]
    for r in res.values():
        assert not r["errors"] and set(r["peers"]) >= {"monai"}
        assert all(v > 0 and math.isfinite(v) for t in ("train_s", "infer_s", "saved_bytes") for v in r[t].values())
    assert "infer_fresh_s" in res["3d_b0_32"] and "infer_fresh_s" not in res["3d_b0_32 [bf16]"]
    comp = res["3d_b0_32 [compile]"]
    assert comp["opts"] == {"compile": True, "backend": "aot_eager"} and set(comp["train_s"]) == {
        "ours",
        "monai",
        "ours eager",
    }
    warm = comp["warmup_s"]  # the compiled models only: `ours eager` is not compiled
    assert set(warm) == {"train", "infer"} and all(set(t) == {"ours", "monai"} for t in warm.values())
    assert all(v > 0 and math.isfinite(v) for t in warm.values() for v in t.values())
    md = out.read_text()
    assert "| 3d_b0_32 | train step | monai |" in md and "| bf16 | compile, aot_eager backend |" in md
    assert "(smoke test) [bf16]" in md and "(smoke test) [compile, aot_eager backend]" in md
    assert md.count("Compile warm-up (the first call, s): train ours ") == 1


def load_bench():
    "bench/bench.py as a module"
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_script", os.path.join(ROOT, "bench", "bench.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class FakeRunner:
    "A runner whose calls take the times given (the first one is the warm-up)"

    def __init__(self, times):
        self.times = list(times)

    def timed(self, what):
        return self.times.pop(0)


def test_warmup_and_modes_in_the_report(tmp_path):
    "The warm-up call is timed apart from the rounds; a compiled mode's table shows it, and the summary lists every mode"
    b = load_bench()
    warm = {}
    times = b.interleaved({"ours": FakeRunner([30, 1, 2]), "monai": FakeRunner([40, 3, 4])}, "train", 2, warm)
    assert warm == {"ours": 30, "monai": 40} and times == {"ours": [1, 2], "monai": [3, 4]}

    def result(opts, ours, peer):
        r = dict(
            title="3D b0",
            shape=[2, 1, 8, 8, 8],
            opts=opts,
            errors={},
            params=10,
            saved_bytes={"ours": 2**20, "monai": 2**21},
        )
        r.update(train_s={"ours": ours, "monai": peer}, infer_s={"ours": ours / 2, "monai": peer / 2})
        stats = {w: dict(median=peer / ours, min=peer / ours, max=peer / ours) for w in ("train", "infer")}
        r["peers"] = {"monai": {**stats, "saved_bytes": 2.0}}
        if opts.get("compile"):
            r["warmup_s"] = {"train": {"ours": 75.0, "monai": 61.0}, "infer": {"ours": 20.0, "monai": 16.0}}
        return r

    results = {b.mode_key("w", m): result(b.MODES[m], 0.2, 0.3 + i / 10) for i, m in enumerate(b.MODES)}
    assert list(results) == ["w", "w [compile]", "w [bf16]", "w [compile_bf16]"]
    out = tmp_path / "R.md"
    b.write_report(results, dict(date="d", machine="m", versions="v", command="c", rounds=1, cuda="none"), str(out))
    md = out.read_text()
    assert "| w | train step | monai | 200 / 300 ms, **1.50x** | 200 / 400 ms, **2.00x** |" in md
    assert md.count("Compile warm-up (the first call, s): train ours 75, monai 61; infer ours 20, monai 16") == 2
    assert "## 3D b0 [compile_bf16]" in md


@pytest.mark.slow
def test_unet_bench_quick(tmp_path):
    "bench/unet_bench.py --quick: both U-Nets measured (or MONAI's failure recorded), finite ratios; no timing asserted"
    out = tmp_path / "UNET.json"
    run_script("unet_bench.py", "--quick", "--out", str(out))
    res = json.loads(out.read_text())["results"]
    assert res and all(set(v["params"]) == {"ours", "monai"} for v in res.values())
    assert all(v["params"][k]["total"] > 0 for v in res.values() for k in ("ours", "monai"))
    assert all(v["speed_paths"]["ours"] for v in res.values())
    compared = [v for v in res.values() if "monai" not in v["errors"]]
    assert compared, "MONAI ran on none of the quick sizes"
    for v in compared:
        assert set(v["saved_bytes"]) == {"ours", "monai"}
        assert all(math.isfinite(x) and x > 0 for x in (v["train_ratio"]["median"], v["saved_ratio"]))
    assert "## Results" in (tmp_path / "UNET.md").read_text()


@pytest.mark.slow
def test_arch_compare_quick(tmp_path):
    "bench/arch_compare.py --quick: b0 and xresnet18 measured end to end on the synthetic volumes; no timing asserted"
    out = tmp_path / "ARCH.md"
    run_script("arch_compare.py", "--quick", "--data", "shapes", "--out", str(out))
    res = json.loads(out.with_suffix(".json").read_text())["results"]["shapes"]
    assert set(res["archs"]) == {"b0", "xresnet18"}
    b0, xr = res["archs"]["b0"], res["archs"]["xresnet18"]
    assert 4e6 < b0["params"] < 8e6 and xr["params"] > 3 * b0["params"]  # 3D xresnet18 is about 5x larger
    for r_ in (b0, xr):
        assert r_["macs"] > 0 and r_["train_ms"] > 0 and r_["infer_ms"] > 0
        assert 0 <= r_["accuracy"]["mean"] <= 1 and len(r_["logs"]) == 1
    assert "| b0 |" in out.read_text() and out.with_suffix(".png").stat().st_size > 0
