"""Our 3D b0 U-Net (`efficientnet_unet`) beside MONAI's `FlexibleUNet` with its efficientnet-b0 backbone.

    python bench/unet_bench.py             # both sizes, 9 rounds, 2 threads: writes bench/UNET.json and bench/UNET.md
    python bench/unet_bench.py --quick     # a smoke run: 1 round, tiny inputs
    python bench/unet_bench.py --render bench/UNET.json   # the report again from the saved JSON, measuring nothing

Both models are built in one process from the same seed and trained on the same seeded input and the same fixed
random mask (cross-entropy over `--classes` classes, SGD with momentum). A train step is forward, loss, backward and
optimizer step, both models in train mode. Timings run in interleaved rounds (ours, MONAI, ours, MONAI, ...) after a
warm-up step each; each round gives one ratio MONAI/ours, reported as its median and min-max over rounds, so a
machine shared with other work slows both sides alike. Saved bytes: distinct storages saved for backward by one
training forward, parameters excluded (`effnet_fastai.model.saved_activation_bytes`), for the whole network and for
its encoder alone (the decoder's share is the difference). A size MONAI cannot run (an error, or an output of
another size than the input's) is recorded as such, not timed.
"""

import argparse, datetime, json, math, os, statistics, sys, warnings

warnings.filterwarnings("ignore")
import torch, torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]
from bench import Runner, interleaved, ratio_stats, saved_bytes, fmt_ratio, machine, num_params

SIZES = {"64": (2, 1, 64, 64, 64), "72x56x80": (2, 1, 72, 56, 80)}
QUICK_SIZES = {"32": (2, 1, 32, 32, 32), "36x28x40": (2, 1, 36, 28, 40)}
NOTES = "## Analysis (hand-written)"  # in UNET.md: the text from this heading on is kept when the report is rewritten
TARGETS = dict(train=1.3, saved=0.75)  # issue 13: train step >= 1.3x MONAI's throughput, saved bytes <= 0.75x MONAI's


# ---------------------------------------------------------------- models
def ours(n_out, ni=1):
    from effnet_fastai.unet import efficientnet_unet

    return efficientnet_unet("b0", n_out=n_out, ni=ni, ndim=3)


def monai(n_out, ni=1):
    from monai.networks.nets import FlexibleUNet

    return FlexibleUNet(
        in_channels=ni, out_channels=n_out, backbone="efficientnet-b0", spatial_dims=3, pretrained=False
    )


BUILDERS = {"ours": ours, "monai": monai}


def build(name, n_out, seed=0):
    torch.manual_seed(seed)
    return BUILDERS[name](n_out)


def param_counts(m, x, y):
    "Parameters of `m`: all, encoder, decoder (with the head), and those that get a gradient from a train step's loss"
    enc = m.encoder
    total, n_enc = num_params(m), num_params(enc)
    m.train().zero_grad(set_to_none=True)
    F.cross_entropy(m(x), y).backward()
    used = sum(p.numel() for p in m.parameters() if p.grad is not None)
    m.zero_grad(set_to_none=True)
    return dict(total=total, encoder=n_enc, decoder_and_head=total - n_enc, used=used)


def speed_paths(m):
    "Whether the encoder runs the CPU speed paths of `effnet_fastai.fast` (None: not our model)"
    from effnet_fastai.fast import has_speed_paths

    return has_speed_paths(m.encoder) if hasattr(m.encoder, "set_speed_paths") else None


# ---------------------------------------------------------------- measurements
class SegRunner(Runner):
    "`bench.Runner` whose loss is cross-entropy against a fixed random mask of `n_out` classes"

    def __init__(self, model, x, n_out, dev=torch.device("cpu")):
        super().__init__(model, x, dev)
        g = torch.Generator().manual_seed(1)
        self.y = torch.randint(0, n_out, (x.shape[0], *x.shape[2:]), generator=g).to(dev)


def check_runs(m, x, n_out):
    "None if `m` maps `x` to `n_out` channels at `x`'s size in a train step, else why not"
    try:
        out = m.train()(x)
        out.float().mean().backward()
        m.zero_grad(set_to_none=True)
    except Exception as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0]}"
    want = (x.shape[0], n_out, *x.shape[2:])
    if tuple(out.shape) != want:
        return f"output of the wrong size: {tuple(out.shape)} for input {tuple(x.shape)} (expected {want})"
    return None


def encoder_saved_bytes(m, x):
    "Bytes saved for backward by the encoder alone in a training forward"
    return saved_bytes(m.encoder, x)


def run_size(name, shape, args):
    print(f"\n== {name}: {shape}", flush=True)
    torch.manual_seed(0)
    x = torch.randn(shape)
    models = {k: build(k, args.classes) for k in BUILDERS}
    res = dict(shape=shape, errors={}, params={}, speed_paths={}, saved_bytes={}, encoder_saved_bytes={})
    for k, m in models.items():
        res["speed_paths"][k] = speed_paths(m)
        err = check_runs(m, x, args.classes)
        if err:
            res["errors"][k] = err
            print(f"  {k} cannot run {shape}: {err}", flush=True)
    runners = {k: SegRunner(m, x, args.classes) for k, m in models.items() if k not in res["errors"]}
    for k, r in runners.items():
        res["params"][k] = param_counts(r.model, x, r.y)
    for k, m in models.items():
        if k not in res["params"]:
            res["params"][k] = dict(total=num_params(m), encoder=num_params(m.encoder))
    print("  params: " + ", ".join(f"{k} {v['total']:,}" for k, v in res["params"].items()), flush=True)
    if "ours" not in runners:
        raise SystemExit(f"our U-Net cannot run {shape}: {res['errors']['ours']}")
    if len(runners) == 2:
        times = interleaved(runners, "train", args.rounds)
        res["train_s"] = {k: statistics.median(v) for k, v in times.items()}
        res["train_rounds_s"] = times
        res["train_ratio"] = ratio_stats(times["monai"], times["ours"])  # > 1: ours faster
        print(
            "  train step: "
            + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in res["train_s"].items())
            + f"; MONAI/ours {fmt_ratio(res['train_ratio'])}",
            flush=True,
        )
    for k, r in runners.items():
        res["saved_bytes"][k] = saved_bytes(r.model, r.x)
        res["encoder_saved_bytes"][k] = encoder_saved_bytes(r.model, r.x)
    if len(runners) == 2:
        res["saved_ratio"] = res["saved_bytes"]["ours"] / res["saved_bytes"]["monai"]  # < 1: ours saves less
    print(
        "  saved MiB (encoder): "
        + ", ".join(
            f"{k} {v / 2**20:.0f} ({res['encoder_saved_bytes'][k] / 2**20:.0f})" for k, v in res["saved_bytes"].items()
        ),
        flush=True,
    )
    return res


# ---------------------------------------------------------------- report
def mib(b):
    return f"{b / 2**20:.0f}"


def met(ok):
    return "**met**" if ok else "**not met**"


def write_report(results, meta, path):
    lines = [
        "# Our b0 U-Net beside MONAI's FlexibleUNet (3D, CPU)",
        "",
        f"- date: {meta['date']}",
        f"- machine: {meta['machine']}",
        f"- {meta['versions']}",
        f"- command: `{meta['command']}`; {meta['rounds']} interleaved rounds after one warm-up step each",
        "",
        "**Models.** Ours: `efficientnet_unet('b0', n_out, ni=1, ndim=3)`. MONAI: `FlexibleUNet(in_channels=1,",
        "out_channels=n_out, backbone='efficientnet-b0', spatial_dims=3, pretrained=False)`. "
        f"{meta['classes']} output classes.",
        "",
        "**Method.** Both models are built in one process from the same seed and fed the same seeded input. A train",
        "step is forward, cross-entropy against a fixed random mask, backward and an SGD step (momentum 0.9), both",
        "models in train mode. The rounds are interleaved (ours, MONAI, ours, MONAI, ...); each round gives one ratio",
        "MONAI time / our time, so **a train-step ratio above 1 means ours has that much more throughput**; the table",
        "gives its median and min-max over rounds. Saved bytes: distinct storages autograd saves for backward in one",
        "training forward, parameters excluded (`saved_activation_bytes`); **a saved ratio below 1 means ours keeps",
        "less**. The encoder's share is measured by running the encoder alone; the rest is the decoder and head.",
        "",
    ]
    rows = [
        "| input | params ours / MONAI (used by the forward) | train step ours / MONAI (ms) | train ratio MONAI/ours | "
        "saved MiB ours / MONAI (encoder part) | saved ratio ours/MONAI |",
        "|---|---|---|---|---|---|",
    ]
    verdicts = []
    for r in results.values():
        p = r["params"]
        used = " / ".join(
            f"{p[k]['total']:,} ({p[k]['used']:,})" if "used" in p[k] else f"{p[k]['total']:,}"
            for k in ("ours", "monai")
        )
        if "monai" in r["errors"]:
            rows.append(f"| {tuple(r['shape'])} | {used} | MONAI fails: `{r['errors']['monai']}` | | | |")
            verdicts.append(f"- {tuple(r['shape'])}: MONAI cannot run this input, nothing to compare.")
            continue
        ts, sb, es = r["train_s"], r["saved_bytes"], r["encoder_saved_bytes"]
        rows.append(
            f"| {tuple(r['shape'])} | {used} | {ts['ours'] * 1000:.0f} / {ts['monai'] * 1000:.0f} | "
            f"**{fmt_ratio(r['train_ratio'])}** | {mib(sb['ours'])} ({mib(es['ours'])}) / "
            f"{mib(sb['monai'])} ({mib(es['monai'])}) | **{r['saved_ratio']:.2f}x** |"
        )
        tr, sr = r["train_ratio"]["median"], r["saved_ratio"]
        verdicts.append(
            f"- {tuple(r['shape'])}: train step >= {TARGETS['train']}x: {tr:.2f}x {met(tr >= TARGETS['train'])}; "
            f"saved bytes <= {TARGETS['saved']}x: {sr:.2f}x {met(sr <= TARGETS['saved'])}."
        )
    lines += ["## Results", ""] + rows + [""]
    sp = {k: v for r in results.values() for k, v in r["speed_paths"].items()}
    lines += [f"Our encoder runs the CPU speed paths of `effnet_fastai.fast`: {sp.get('ours')}.", ""]
    lines += ["## Targets (issue 13)", ""] + verdicts + [""]
    if os.path.exists(path):  # the hand-written analysis below the marker survives a new run or a render
        with open(path) as f:
            old = f.read()
        if NOTES in old:
            lines += [old[old.index(NOTES) :]]
    with open(path, "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")


def run_meta(args):
    import monai

    return dict(
        date=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        machine=machine(),
        versions=f"torch {torch.__version__}, monai {monai.__version__}",
        command=f"python bench/unet_bench.py {' '.join(sys.argv[1:])}",
        rounds=args.rounds,
        classes=args.classes,
        threads=torch.get_num_threads(),
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run: 1 round on tiny inputs")
    ap.add_argument("--rounds", type=int, default=9, help="interleaved train-step rounds per size")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--classes", type=int, default=3, help="output channels (classes) of both U-Nets")
    ap.add_argument("--out", default=os.path.join(HERE, "UNET.json"), help="the JSON; the report goes beside it (.md)")
    ap.add_argument("--render", metavar="JSON", help="write the report again from a saved JSON, measuring nothing")
    args = ap.parse_args()
    if args.render:
        with open(args.render) as f:
            saved = json.load(f)
        out = os.path.splitext(args.render)[0] + ".md"
        write_report(saved["results"], saved["meta"], out)
        return print(f"wrote {out}")
    torch.set_num_threads(args.threads)
    sizes = SIZES
    if args.quick:
        args.rounds, sizes = 1, QUICK_SIZES
    results = {name: run_size(name, shape, args) for name, shape in sizes.items()}
    for r in results.values():  # finite ratios or a recorded failure: a broken measure fails the run, not the report
        assert "monai" in r["errors"] or all(
            math.isfinite(v) for v in (r["train_ratio"]["median"], r["saved_ratio"])
        ), r
    meta = run_meta(args)
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, results=results), f, indent=1)
    md = os.path.splitext(args.out)[0] + ".md"
    write_report(results, meta, md)
    print(f"\nwrote {args.out} and {md}")


if __name__ == "__main__":
    main()
