"""Benchmark effnet_fastai's EfficientNet against MONAI (3D) and torchvision/timm (2D).

    python bench/bench.py            # default CPU suite (a few minutes on 2 cores), writes bench/RESULTS.md + bench/results.png
    python bench/bench.py --quick    # fewer rounds, a smoke test
    python bench/bench.py --gpu      # the GPU suite as well (bf16 autocast, channels_last(_3d), torch.compile, b4 memory)
    python bench/bench.py --modes all --threads 2   # eager, torch.compile, bf16 autocast and both, on the CPU, one run

Every model of a workload is built in one process from the same seed and fed the same seeded input. Timings run in
interleaved rounds (ours, peer, ours, peer, ...) and each round gives one ratio peer/ours, so a machine shared with
other work slows both sides alike; the report gives the median ratio and its min-max over rounds. A ratio above 1
means ours is faster (for times) or smaller (for memory). Parameter counts are checked equal before anything is timed.
With `--modes`, each workload runs once per mode (eager float32, `torch.compile(model)`, CPU bfloat16 autocast, both),
one after another in the same process; a compiled model's first train step and first inference (its compilation) are
timed apart as the warm-up. The fresh-process measures (inference-only process, peak RSS) run in the eager mode only.
"""

import argparse, datetime, gc, json, os, platform, resource, statistics, subprocess, sys, time, warnings

warnings.filterwarnings("ignore")
import torch, torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


# ---------------------------------------------------------------- models
def ours(ni=3, ndim=3, variant="b0", **kw):
    from effnet_fastai.factories import efficientnet

    return efficientnet(variant, ni=ni, ndim=ndim, num_classes=1000, **kw)


def monai(ni=1, variant="b0", **kw):
    from monai.networks.nets import EfficientNetBN

    return EfficientNetBN(f"efficientnet-{variant}", spatial_dims=3, in_channels=ni, num_classes=1000, pretrained=False)


def tv_b0():
    import torchvision

    return torchvision.models.efficientnet_b0()


def timm_tf_b0():
    import timm

    return timm.create_model("tf_efficientnet_b0", pretrained=False)


BUILDERS = {"ours": ours, "monai": monai, "torchvision": tv_b0, "timm_tf": timm_tf_b0}

# A workload: the input shape, our model's kwargs, and the peers with theirs
WORKLOADS = {
    "3d_b0_64": dict(
        shape=(2, 1, 64, 64, 64),
        ours=dict(ni=1, ndim=3),
        peers={"monai": dict(ni=1)},
        title="3D b0, 1 channel, (2,1,64,64,64) vs MONAI EfficientNetBN",
    ),
    "3d_b0_clip": dict(
        shape=(2, 3, 16, 112, 112),
        ours=dict(ni=3, ndim=3),
        peers={"monai": dict(ni=3)},
        title="3D b0 on a clip (2,3,16,112,112) vs MONAI EfficientNetBN",
    ),
    "2d_b0": dict(
        shape=(16, 3, 224, 224),
        ours=dict(ni=3, ndim=2),
        peers={"torchvision": {}, "timm_tf": {}},
        title="2D b0 (16,3,224,224) vs torchvision efficientnet_b0 and timm tf_efficientnet_b0",
    ),
}
GPU_WORKLOADS = {
    "gpu_3d_b0_96": dict(
        shape=(8, 1, 96, 96, 96),
        ours=dict(ni=1, ndim=3),
        peers={"monai": dict(ni=1)},
        title="GPU 3D b0 (8,1,96,96,96) vs MONAI",
    ),
    "gpu_2d_b0": dict(
        shape=(256, 3, 224, 224),
        ours=dict(ni=3, ndim=2),
        peers={"torchvision": {}, "timm_tf": {}},
        title="GPU 2D b0 (256,3,224,224) vs torchvision and timm",
    ),
}
# A small workload for the smoke test (tests/test_bench.py), run only when `--only` names it
SMOKE_WORKLOADS = {
    "3d_b0_32": dict(
        shape=(2, 1, 32, 32, 32),
        ours=dict(ni=1, ndim=3),
        peers={"monai": dict(ni=1)},
        title="3D b0, 1 channel, (2,1,32,32,32) vs MONAI EfficientNetBN (smoke test)",
    ),
}
ALL_WORKLOADS = {**WORKLOADS, **SMOKE_WORKLOADS, **GPU_WORKLOADS}


# CPU modes (`--modes`): the options of `Runner` for each
MODES = {
    "eager": {},
    "compile": dict(compile=True),
    "bf16": dict(bf16=True),
    "compile_bf16": dict(compile=True, bf16=True),
}


def mode_opts(mode, backend="inductor"):
    "The `Runner` options of `mode`; a compile backend other than inductor is recorded in them"
    opts = dict(MODES[mode])
    if opts.get("compile") and backend != "inductor":
        opts["backend"] = backend
    return opts


def mode_key(wl_name, mode):
    "The results key of a workload in a mode (the eager one keeps the plain name of earlier reports)"
    return wl_name if mode == "eager" else f"{wl_name} [{mode}]"


def build(name, kw, seed=0):
    torch.manual_seed(seed)
    return BUILDERS[name](**kw)


def num_params(m):
    return sum(p.numel() for p in m.parameters())


# ---------------------------------------------------------------- measurements
def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


class Runner:
    "Train step and inference of one model on one input, with the options of a configuration"

    def __init__(self, model, x, dev, bf16=False, channels_last=False, compile=False, backend="inductor"):
        self.dev, self.bf16 = dev, bf16
        self.model = model.to(dev)
        self.x = x.to(dev)
        if channels_last:
            fmt = torch.channels_last_3d if x.ndim == 5 else torch.channels_last
            self.model, self.x = self.model.to(memory_format=fmt), self.x.contiguous(memory_format=fmt)
        self.fn = torch.compile(self.model, backend=backend) if compile else self.model
        self.y = torch.randint(0, 1000, (x.shape[0],), generator=torch.Generator().manual_seed(1)).to(dev)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9)

    def autocast(self):
        return torch.autocast(self.dev.type, dtype=torch.bfloat16, enabled=self.bf16)

    def train_step(self):
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        with self.autocast():
            loss = F.cross_entropy(self.fn(self.x), self.y)
        loss.backward()
        self.opt.step()

    @torch.no_grad()
    def infer(self):
        self.model.eval()
        with self.autocast():
            return self.fn(self.x)

    def timed(self, what):
        f = self.train_step if what == "train" else self.infer
        sync(self.dev)
        t = time.perf_counter()
        f()
        sync(self.dev)
        return time.perf_counter() - t


def saved_bytes(model, x, bf16=False):
    "Bytes of distinct storages saved for backward by one training forward, parameters excluded"
    from effnet_fastai.model import saved_activation_bytes

    model.train()
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        out, n = saved_activation_bytes(model, x)
    del out
    return n


def interleaved(runners, what, rounds, warmup=None):
    "Per-round times of each runner, run in the order A B C A B C ...; the warm-up call's time goes to `warmup`"
    times = {k: [] for k in runners}
    for k, r in runners.items():
        t = r.timed(what)  # warm-up (and compilation)
        if warmup is not None:
            warmup[k] = t
    for _ in range(rounds):
        for k, r in runners.items():
            times[k].append(r.timed(what))
    return times


def medians_ms(times):
    "`ours 34 ms, monai 43 ms`: the median of each runner's times"
    return ", ".join(f"{k} {statistics.median(v) * 1000:.0f} ms" for k, v in times.items())


def warmup_text(warmup):
    "`train ours 31, monai 32; infer ours 9, monai 9`: the warm-up seconds of each measure and model"
    return "; ".join(f"{w} " + ", ".join(f"{k} {v:.0f}" for k, v in t.items()) for w, t in warmup.items())


def ratio_stats(peer, base):
    rs = [p / b for p, b in zip(peer, base)]
    return dict(median=statistics.median(rs), min=min(rs), max=max(rs))


def high_water_rss():
    "Peak resident set size of this process in bytes: VmHWM (reset by exec, unlike `ru_maxrss`, which a child inherits)"
    try:
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_child(args):
    "In a fresh process: build one model, run one train step (or inference), print the peak RSS in bytes"
    wl = ALL_WORKLOADS[args.rss_child[0]]
    name, what = args.rss_child[1], args.rss_child[2]
    kw = wl["ours"] if name == "ours" else wl["peers"][name]
    torch.manual_seed(0)
    r = Runner(build(name, kw), torch.randn(wl["shape"]), torch.device("cpu"))
    base = high_water_rss()  # imports, model and input
    r.train_step() if what == "train" else r.infer()
    peak = high_water_rss()
    print(json.dumps(dict(peak_rss=peak, step_rss=peak - base)))


def infer_child(args):
    "In a fresh process that never trains: interleaved inference rounds of ours and the peers, times as JSON"
    wl_name = args.infer_child
    wl = ALL_WORKLOADS[wl_name]
    torch.manual_seed(0)
    x = torch.randn(wl["shape"])
    models, _ = workload_models(wl_name, wl, x, torch.device("cpu"))  # peers that fail are recorded by the parent
    runners = {k: Runner(m, x, torch.device("cpu")) for k, m in models.items()}
    print(json.dumps(interleaved(runners, "infer", args.rounds)))


def run_child(*flags):
    "Run this script in a fresh process with `flags` and this process's thread count"
    return subprocess.run(
        [sys.executable, os.path.abspath(__file__), *flags, "--threads", str(torch.get_num_threads())],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": ROOT},
    )


def fresh_inference(wl_name, rounds):
    out = run_child("--infer-child", wl_name, "--rounds", str(rounds))
    if out.returncode:
        raise SystemExit(f"{wl_name}: inference-only process failed: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def peak_rss(wl_name, name, what):
    out = run_child("--rss-child", wl_name, name, what)
    if out.returncode:
        return None, out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"
    return json.loads(out.stdout.strip().splitlines()[-1]), None


# ---------------------------------------------------------------- a workload
def workload_models(wl_name, wl, x, dev):
    "Ours and the peers that run on `x` (parameter counts checked equal first), and the error of each peer that does not"
    models, errors = {"ours": build("ours", wl["ours"])}, {}
    for p, kw in wl["peers"].items():
        m = build(p, kw)
        if num_params(m) != num_params(models["ours"]):
            raise SystemExit(
                f"{wl_name}: parameter counts differ: ours {num_params(models['ours'])}, {p} {num_params(m)}"
            )
        try:  # a peer that cannot run this input is recorded, not benchmarked
            with torch.no_grad():
                m.eval().to(dev)(x[:1].to(dev))
            models[p] = m
        except Exception as e:
            errors[p] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
    return models, errors


def run_workload(wl_name, wl, args, dev, opts=None):
    opts = opts or {}
    print(f"\n== {wl['title']} {opts or ''}", flush=True)
    if opts.get("compile"):
        torch._dynamo.reset()  # a fresh compilation for each workload and mode: honest warm-ups, no piled-up graphs
    torch.manual_seed(0)
    x = torch.randn(wl["shape"])
    models, errors = workload_models(wl_name, wl, x, dev)
    res = dict(title=wl["title"], shape=wl["shape"], opts=opts, peers={}, errors=errors)
    for p, e in errors.items():
        print(f"  {p} fails on {tuple(x.shape)}: {e}", flush=True)
    res["params"] = num_params(models["ours"])
    runners = {k: Runner(m, x, dev, **opts) for k, m in models.items()}
    if opts.get("compile"):  # our own eager model in the same rounds: is compiling ever slower than not?
        runners["ours eager"] = Runner(build("ours", wl["ours"]), x, dev, **{**opts, "compile": False})
    warmup = {}  # the first call of each runner, timed apart: a compiled model's compilation
    for what in ("train", "infer"):
        times = interleaved(runners, what, args.rounds, warmup.setdefault(what, {}))
        res[f"{what}_s"] = {k: statistics.median(v) for k, v in times.items()}
        for p in [k for k in runners if k != "ours"]:
            res["peers"].setdefault(p, {})[what] = ratio_stats(times[p], times["ours"])
        print(f"  {what}: {medians_ms(times)}", flush=True)
    if opts.get("compile"):
        compiled = [k for k, r in runners.items() if r.fn is not r.model]
        res["warmup_s"] = {w: {k: t[k] for k in compiled} for w, t in warmup.items()}
        print(f"  warm-up (compilation) s: {warmup_text(res['warmup_s'])}", flush=True)
    eager = not any(opts.values())  # the fresh-process measures run eager float32 models (a child would compile again)
    if dev.type == "cpu" and not args.quick and eager:  # a process that only infers: no training buffers ever held
        times = fresh_inference(wl_name, args.rounds)
        res["infer_fresh_s"] = {k: statistics.median(v) for k, v in times.items()}
        for p in [k for k in times if k != "ours"]:
            res["peers"][p]["infer_fresh"] = ratio_stats(times[p], times["ours"])
        print(f"  infer, inference-only process: {medians_ms(times)}", flush=True)
    res["saved_bytes"] = {k: saved_bytes(r.fn, r.x, opts.get("bf16", False)) for k, r in runners.items()}
    if dev.type == "cuda":
        res["peak_mem"] = {}
        for k, r in runners.items():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            r.train_step()
            res["peak_mem"][k] = torch.cuda.max_memory_allocated()
    for k in [k for k in runners if k != "ours"]:
        res["peers"][k]["saved_bytes"] = res["saved_bytes"][k] / res["saved_bytes"]["ours"]
    print("  saved MiB: " + ", ".join(f"{k} {v / 2**20:.0f}" for k, v in res["saved_bytes"].items()), flush=True)
    del runners, models
    gc.collect()
    if opts.get("compile"):
        torch._dynamo.reset()  # frees the compiled graphs before the next workload or mode
    if dev.type == "cpu" and not args.no_rss and eager:
        res["peak_rss"], res["rss_errors"] = {}, {}
        for k in ["ours"] + list(wl["peers"]):
            if k in res["errors"]:
                continue
            v, err = peak_rss(wl_name, k, "train")
            if err:
                res["rss_errors"][k] = err
            else:
                res["peak_rss"][k] = v
        print(
            "  RSS MiB (fresh process), peak / growth during the train step: "
            + ", ".join(
                f"{k} {v['peak_rss'] / 2**20:.0f} / {v['step_rss'] / 2**20:.0f}" for k, v in res["peak_rss"].items()
            ),
            flush=True,
        )
    return res


def run_gpu_b4_memory(dev):
    "3D b4 at 128^3, batch 2: peak memory of a train step with and without gradient checkpointing"
    out = {}
    x = torch.randn(2, 1, 128, 128, 128, device=dev)
    for ckpt in (False, True):
        torch.manual_seed(0)
        m = ours(ni=1, ndim=3, variant="b4", grad_checkpointing=ckpt).to(dev)
        r = Runner(m, x, dev, bf16=True, channels_last=True)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            r.train_step()
            out[f"checkpointing={ckpt}"] = torch.cuda.max_memory_allocated()
        except torch.cuda.OutOfMemoryError:
            out[f"checkpointing={ckpt}"] = "OOM"
        del m, r
        gc.collect()
    return out


# ---------------------------------------------------------------- gradient checkpointing (ours against ours)
def run_checkpointing(args, dev):
    wl = WORKLOADS["3d_b0_64"]
    print("\n== gradient checkpointing, 3D b0 (2,1,64,64,64): ours vs ours with set_grad_checkpointing()", flush=True)
    torch.manual_seed(0)
    x = torch.randn(wl["shape"])
    a, b = build("ours", wl["ours"]), build("ours", wl["ours"]).set_grad_checkpointing()
    runners = {"plain": Runner(a, x, dev), "checkpointed": Runner(b, x, dev)}
    times = interleaved(runners, "train", args.rounds)
    sb = {k: saved_bytes(r.model, r.x) for k, r in runners.items()}
    res = dict(
        step_time_ratio=ratio_stats(times["checkpointed"], times["plain"]),
        saved_bytes=sb,
        saved_reduction=sb["plain"] / sb["checkpointed"],
    )
    print(
        f"  step time checkpointed/plain {res['step_time_ratio']['median']:.2f}; saved MiB {sb['plain'] / 2**20:.0f} -> "
        f"{sb['checkpointed'] / 2**20:.0f} ({res['saved_reduction']:.1f}x less)",
        flush=True,
    )
    return res


# ---------------------------------------------------------------- report
def fmt_ratio(s):
    return f"{s['median']:.2f}x ({s['min']:.2f}-{s['max']:.2f})"


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except Exception:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}, {platform.system()} {platform.release()}"


def run_meta(args):
    "Date, machine, versions and command of this run (kept in the JSON, so a report can be rendered again)"
    import torchvision, timm, monai

    return dict(
        date=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        machine=machine(),
        versions=f"torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}, monai {monai.__version__}",
        command=f"python bench/bench.py {' '.join(sys.argv[1:])}",
        rounds=args.rounds,
        cuda=torch.cuda.get_device_name(0)
        if torch.cuda.is_available()
        else "not available in this run: no GPU figures",
    )


def split_key(key):
    "`(workload, mode)` of a results key written by `mode_key`"
    base, _, mode = key.partition(" [")
    return base, mode.rstrip("]") or "eager"


def mode_label(key, r):
    "The mode of a result, with its compile backend where it is not inductor"
    backend = r.get("opts", {}).get("backend")
    return split_key(key)[1] + (f", {backend} backend" if backend else "")


def summary_lines(results):
    "A table of every CPU workload and measure (rows) in every mode (columns): ours / peer ms and the median ratio"
    rows, modes = {}, []
    for key, r in results.items():
        if "peers" not in r or key.startswith("gpu_"):
            continue
        base, mode = split_key(key)[0], mode_label(key, r)
        modes += [mode] if mode not in modes else []
        for what, label in (("train", "train step"), ("infer", "inference")):
            for p, st in r["peers"].items():
                ms = r[f"{what}_s"]
                cell = f"{ms['ours'] * 1000:.0f} / {ms[p] * 1000:.0f} ms, **{st[what]['median']:.2f}x**"
                rows.setdefault((base, label, p), {})[mode] = cell
    if len(modes) < 2:
        return []
    lines = ["## Summary: ours / peer, by mode", "", "| workload | measure | peer | " + " | ".join(modes) + " |"]
    lines.append("|" + "---|" * (3 + len(modes)))
    for (base, label, p), cells in rows.items():
        lines.append(f"| {base} | {label} | {p} | " + " | ".join(cells.get(m, "") for m in modes) + " |")
    return lines + [""]


def write_report(results, meta, path):
    lines = [
        "# Benchmark results",
        "",
        f"- date: {meta['date']}",
        f"- machine: {meta['machine']}",
        f"- {meta['versions']}",
        f"- command: `{meta['command']}`; {meta['rounds']} interleaved rounds per measure",
        f"- CUDA: {meta['cuda']}",
        "",
        "Ratios are peer/ours per round (median, min-max over rounds): above 1 means ours is faster, or saves fewer",
        "bytes for backward. Times are medians per step. Saved bytes: distinct storages saved for backward by one",
        "training forward, parameters excluded. RSS: one train step in a fresh process; the peak includes the imports",
        "(about 700 MiB for torch alone), the growth is the peak minus the high-water mark before the step.",
        "Inference is timed twice: in the benchmark process after the train rounds (as in a training loop's",
        "validation: the allocator keeps the freed training buffers), and in a fresh process that only infers (as a",
        "deployed model runs: large activations are fresh, page-faulting allocations at every call).",
        "Modes (`--modes`): eager float32, `torch.compile(model)`, CPU bfloat16 autocast, and both. Outside the eager",
        "mode the fresh-process measures (inference-only process, RSS) are not run (a child would compile again); the",
        "saved bytes are measured in the mode: under autocast, and through the compiled module (what the compiled",
        "backward keeps). In a compile mode, `ours eager` is our model uncompiled in the same rounds (a ratio above 1:",
        "compiling pays), and the warm-up is the first call of each compiled model: its compilation, on-disk caches off.",
        "",
    ]
    lines += summary_lines(results)
    for name, r in results.items():
        if name == "checkpointing":
            lines += [
                "## Gradient checkpointing (3D b0, (2,1,64,64,64))",
                "",
                f"- saved activation bytes: {r['saved_bytes']['plain'] / 2**20:.0f} MiB -> {r['saved_bytes']['checkpointed'] / 2**20:.0f} MiB "
                f"(**{r['saved_reduction']:.1f}x less**)",
                f"- train step time checkpointed/plain: **{fmt_ratio(r['step_time_ratio'])}**",
                "",
            ]
            continue
        if name == "gpu_b4_memory":
            lines += (
                ["## GPU: 3D b4 (2,1,128,128,128), bf16, channels_last_3d, peak memory", ""]
                + [f"- {k}: {v / 2**30:.2f} GiB" if isinstance(v, int) else f"- {k}: {v}" for k, v in r.items()]
                + [""]
            )
            continue
        mode = mode_label(name, r)
        heading = f" [{mode}]" if mode != "eager" else f" {r['opts']}" if r["opts"] else ""
        lines += [f"## {r['title']}{heading}", "", f"Parameters: {r['params']:,} (equal for all models).", ""]
        for p, e in r["errors"].items():
            lines += [f"- **{p} fails on this input**: `{e}`"]
        if r["errors"]:
            lines += [""]
        hdr = ["measure", "ours"] + [p for p in r["peers"]]
        lines += ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
        for what, label in (
            ("train", "train step"),
            ("infer", "inference, after the train rounds"),
            ("infer_fresh", "inference, inference-only process"),
        ):
            if f"{what}_s" not in r:
                continue
            lines.append(
                f"| {label} (ms) | {r[f'{what}_s']['ours'] * 1000:.0f} | "
                + " | ".join(
                    f"{r[f'{what}_s'][p] * 1000:.0f}; ratio **{fmt_ratio(r['peers'][p][what])}**" for p in r["peers"]
                )
                + " |"
            )
        lines.append(
            f"| saved for backward (MiB) | {r['saved_bytes']['ours'] / 2**20:.0f} | "
            + " | ".join(
                f"{r['saved_bytes'][p] / 2**20:.0f}; ours/peer **{1 / r['peers'][p]['saved_bytes']:.2f}x**"
                for p in r["peers"]
            )
            + " |"
        )
        if r.get("peak_rss"):
            pr = r["peak_rss"]
            for key, label in (
                ("peak_rss", "peak RSS, fresh process (MiB)"),
                ("step_rss", "RSS growth during the train step (MiB)"),
            ):
                lines.append(
                    f"| {label} | {pr['ours'][key] / 2**20:.0f} | "
                    + " | ".join(
                        f"{pr[p][key] / 2**20:.0f}; ours/peer {pr['ours'][key] / pr[p][key]:.2f}x" if p in pr else "n/a"
                        for p in r["peers"]
                    )
                    + " |"
                )
        if r.get("peak_mem"):
            pm = r["peak_mem"]
            lines.append(
                f"| peak GPU memory (MiB) | {pm['ours'] / 2**20:.0f} | "
                + " | ".join(f"{pm[p] / 2**20:.0f}" for p in r["peers"])
                + " |"
            )
        if r.get("opts", {}).get("compile") and r.get("warmup_s"):
            lines += ["", f"Compile warm-up (the first call, s): {warmup_text(r['warmup_s'])}"]
        lines.append("")
    notes = os.path.join(os.path.dirname(os.path.abspath(__file__)), "NOTES.md")
    if os.path.exists(notes):  # hand-written analysis (profiles, what limits a missed target) kept beside the figures
        with open(notes) as f:
            lines += ["", f.read()]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)  # not lose a long run to a missing folder
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.splitext(path)[0] + ".json", "w") as f:
        json.dump(dict(meta=meta, results=results), f, indent=1, default=str)


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, med, lo, hi = [], [], [], []
    for name, r in results.items():
        if "peers" not in r:
            continue
        for p, s in r["peers"].items():
            for what in [w for w in ("train", "infer", "infer_fresh") if w in s]:
                labels.append(f"{name}\nvs {p} {what}")
                m = s[what]["median"]
                med.append(m)
                lo.append(m - s[what]["min"])
                hi.append(s[what]["max"] - m)
            labels.append(f"{name}\nvs {p} saved")
            med.append(s["saved_bytes"])
            lo.append(0)
            hi.append(0)
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(labels)), 4.5))
    ax.bar(range(len(med)), med, yerr=[lo, hi], capsize=3, color=["C0" if "saved" not in l else "C2" for l in labels])
    ax.axhline(1, color="k", lw=0.8)
    ax.set_xticks(range(len(med)))
    ax.set_xticklabels(labels, fontsize=7, rotation=60, ha="right")
    ax.set_ylabel("peer / ours (> 1: ours faster / leaner)")
    ax.set_title(f"effnet_fastai vs peers (CPU, torch {torch.__version__})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 rounds, no peak-RSS subprocesses")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds per measure")
    ap.add_argument(
        "--only",
        nargs="*",
        default=None,
        choices=[*WORKLOADS, "checkpointing", *SMOKE_WORKLOADS],
        help=f"workloads to run (default: {list(WORKLOADS)} and checkpointing; {list(SMOKE_WORKLOADS)}: a smoke test)",
    )
    ap.add_argument("--no-rss", action="store_true", help="skip the fresh-process peak RSS measure")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch default)")
    ap.add_argument(
        "--modes",
        default="eager",
        help=f"CPU suite: comma-separated modes from {list(MODES)}, or 'all' (default: eager); each workload runs in each",
    )
    ap.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile backend of the compile modes (default: inductor; aot_eager compiles in seconds, for tests)",
    )
    ap.add_argument("--gpu", action="store_true", help="also run the GPU suite (needs CUDA)")
    ap.add_argument("--bf16", action="store_true", help="GPU suite: bf16 autocast")
    ap.add_argument("--channels-last", action="store_true", help="GPU suite: channels_last(_3d)")
    ap.add_argument("--compile", action="store_true", help="GPU suite: torch.compile both models")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "RESULTS.md"))
    ap.add_argument("--rss-child", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--infer-child", help=argparse.SUPPRESS)
    ap.add_argument(
        "--render",
        metavar="JSON",
        help="write the report again from a saved RESULTS.json (e.g. after editing NOTES.md), measuring nothing",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rss_child:
        return rss_child(args)
    if args.infer_child:
        return infer_child(args)
    if args.render:
        with open(args.render) as f:
            saved = json.load(f)
        out = os.path.splitext(args.render)[0] + ".md"
        write_report(saved["results"], saved["meta"], out)
        return print(f"wrote {out}")
    if args.quick:
        args.rounds, args.no_rss = min(args.rounds, 2), True
    modes = list(MODES) if args.modes == "all" else args.modes.split(",")
    if bad := [m for m in modes if m not in MODES]:
        ap.error(f"--modes: unknown {bad}; choose from {list(MODES)} or 'all'")
    if any(MODES[m].get("compile") for m in modes):  # cold compilations, as a first run sees them (no on-disk caches)
        from torch._inductor import config as inductor_config
        from torch._functorch import config as functorch_config

        inductor_config.fx_graph_cache = False
        functorch_config.enable_autograd_cache = False
    cpu, results = torch.device("cpu"), {}
    names = args.only if args.only is not None else list(WORKLOADS) + ["checkpointing"]
    for n in names:
        if n == "checkpointing":
            results[n] = run_checkpointing(args, cpu)
            continue
        for mode in modes:
            opts = mode_opts(mode, args.compile_backend)
            results[mode_key(n, mode)] = run_workload(n, ALL_WORKLOADS[n], args, cpu, opts)
    if args.gpu:
        if not torch.cuda.is_available():
            print("\n--gpu: CUDA is not available, GPU suite skipped", flush=True)
        else:
            dev = torch.device("cuda")
            opts = dict(bf16=args.bf16, channels_last=args.channels_last, compile=args.compile)
            for n, wl in GPU_WORKLOADS.items():
                results[n] = run_workload(n, wl, args, dev, opts)
            results["gpu_b4_memory"] = run_gpu_b4_memory(dev)
    write_report(results, run_meta(args), args.out)
    plot(results, os.path.splitext(args.out)[0].replace("RESULTS", "results") + ".png")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
