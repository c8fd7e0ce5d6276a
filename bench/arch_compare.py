"""EfficientNet against fastai's XResNet on the same data, head, schedule, seeds and learning-rate search.

    python bench/arch_compare.py                      # synthetic volumes (24^3) and clips; writes bench/ARCH.md, .json, .png
    python bench/arch_compare.py --data moving        # one task only: `shapes` (volumes), `moving` (clips), or a folder
    python bench/arch_compare.py --data ~/imagenette2-160 --ndim 2 --size 128   # your own images or volumes
    python bench/arch_compare.py --quick              # a smoke test: tiny data, one seed, two architectures

For every task and architecture: parameters, multiply-adds per sample, train-step and inference time (interleaved
rounds in one process, every architecture on the same batch), validation accuracy after the same number of epochs
(`fit_one_cycle`, one run per seed), and the accuracy reached within the same wall-clock training budget (the
validation accuracy at the last epoch end inside the budget; by default the budget is the time the fastest
architecture takes to finish all its runs). Each architecture gets its own learning rate: the grid `--lrs` on the
first seed (best final validation accuracy; that run is the first seed's), or fastai's `lr_find` valley with
`--lrs find`. Every model ends in the same head
(`create_effnet_head`: concat pooling, BatchNorm, dropout, linear) and sees the same z-scored batches.
"""

import argparse, json, os, random, statistics, sys, time, warnings
from pathlib import Path

warnings.filterwarnings("ignore")
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch, torch.nn.functional as F
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]
from fastai.callback.core import Callback
from fastai.learner import Learner
from fastai.metrics import accuracy
from fastai.torch_core import set_seed
from fastai.vision.models import xresnet
from effnet_fastai.learner import create_effnet_head, create_effnet_model, _add_zscore
from effnet_fastai.train import job_dls
from effnet_fastai.video import model_summary
from bench import interleaved, machine

ARCHS = ["b0", "b1", "xresnet18", "xresnet34", "xresnet50"]


def build(arch, n_out, ni, ndim):
    "EfficientNet `b*` (our factory, bn_momentum 0.1 as `efficientnet_learner` uses from scratch) or fastai's `xresnet*`"
    if arch.startswith("b"):
        return create_effnet_model(arch, n_out, ni=ni, ndim=ndim, bn_momentum=0.1)
    if not arch.startswith("xresnet"):
        raise ValueError(f"unknown architecture {arch!r}: expected b0-b8 or xresnet18/34/50/101/152")
    body = nn.Sequential(*list(getattr(xresnet, arch)(c_in=ni, n_out=n_out, ndim=ndim).children())[:-4])  # fastai's cut
    with torch.no_grad():
        nf = body.eval()(torch.zeros(1, ni, *(32,) * ndim)).shape[1]
    return nn.Sequential(body.train(), create_effnet_head(nf, n_out, ndim))


class EpochTimes(Callback):
    "Cumulative training time (validation excluded) and validation accuracy at every epoch end"

    order = 100

    def before_fit(self):
        self.log, self.train_s = [], 0.0

    def before_train(self):
        self.t = time.perf_counter()

    def after_train(self):
        self.train_s += time.perf_counter() - self.t

    def after_epoch(self):
        self.log.append((self.train_s, float(self.recorder.values[-1][2])))


def learner(dls, arch, seed, cbs=None):
    "A fresh `Learner` of `arch` after `set_seed(seed)`, its DataLoaders reseeded: every architecture sees a seed's batches in the same order"
    set_seed(seed, reproducible=True)
    for dl in dls.loaders:
        dl.rng = random.Random(seed)
    xb = dls.one_batch()[0]
    return Learner(dls, build(arch, dls.c, xb.shape[1], xb.ndim - 2), metrics=accuracy, cbs=cbs)


def fit(dls, arch, lr, epochs, seed):
    "Train `arch` from scratch with `fit_one_cycle(epochs, lr)`; its epoch log"
    learn = learner(dls, arch, seed, EpochTimes())
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(epochs, lr)
    return learn.epoch_times.log


def find_lr(dls, arch, seed):
    "fastai's `lr_find` valley for `arch`, over at most one epoch's batches (at least 40)"
    learn = learner(dls, arch, seed)
    with learn.no_bar(), learn.no_logging():
        return float(learn.lr_find(num_it=max(40, len(dls.train)), show_plot=False).valley)


class Timer:
    "One architecture's train step (SGD) and inference on a fixed batch, for bench.py's `interleaved` rounds"

    def __init__(self, model, xb, yb):
        self.model, self.xb, self.yb = model, xb.as_subclass(torch.Tensor), yb.as_subclass(torch.Tensor)
        self.opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def timed(self, what):
        t = time.perf_counter()
        if what == "train":
            self.model.train()
            self.opt.zero_grad(set_to_none=True)
            F.cross_entropy(self.model(self.xb), self.yb).backward()
            self.opt.step()
        else:
            self.model.eval()
            with torch.no_grad():
                self.model(self.xb)
        return time.perf_counter() - t


def mean_sd(xs):
    "Mean and spread over the seeds that have a value (NaN: no epoch ended within the budget)"
    ok = [x for x in xs if x == x]
    mean = statistics.mean(ok) if ok else float("nan")
    return dict(mean=mean, sd=statistics.stdev(ok) if len(ok) > 1 else 0.0, n=len(ok), runs=xs)


def run_task(task, dls, archs, seeds, epochs, lrs, rounds, budget=None):
    "Every measure of every architecture on `dls`"
    xb, yb = dls.one_batch()
    res, timers = {}, {}
    for arch in archs:
        set_seed(0)
        m = build(arch, dls.c, xb.shape[1], xb.ndim - 2)
        s = model_summary(m, tuple(xb.shape[1:])).set_index("layer").loc["total"]
        res[arch], timers[arch] = dict(params=int(s.params), macs=int(s.MACs)), Timer(m, xb, yb)
    for what in ("train", "infer"):
        for arch, ts in interleaved(timers, what, rounds).items():
            res[arch][f"{what}_ms"] = 1000 * statistics.median(ts)
    del timers
    for arch in archs:
        first, grid = None, None  # with a grid, the best rate's run is the first seed's run (training is deterministic)
        if lrs == ["find"]:
            lr = find_lr(dls, arch, seeds[0])
        elif len(lrs) == 1:
            lr = float(lrs[0])
        else:
            grid_logs = {r: fit(dls, arch, float(r), epochs, seeds[0]) for r in lrs}
            grid = {r: lg[-1][1] for r, lg in grid_logs.items()}
            best = max(grid, key=grid.get)
            lr, first = float(best), grid_logs[best]
        logs = [first or fit(dls, arch, lr, epochs, seeds[0])] + [fit(dls, arch, lr, epochs, s) for s in seeds[1:]]
        res[arch].update(
            lr=lr,
            lr_grid=grid,
            logs=logs,
            accuracy=mean_sd([lg[-1][1] for lg in logs]),
            train_s=mean_sd([lg[-1][0] for lg in logs]),
        )
        print(
            f"  {task} {arch:10s} lr {lr:.2g}  accuracy {res[arch]['accuracy']['mean']:.4f}  "
            f"train {res[arch]['train_s']['mean']:.0f}s",
            flush=True,
        )
    budget = budget or min(max(r["train_s"]["runs"]) for r in res.values())  # every run of the fastest ends inside
    for r in res.values():
        within = [max([a for t, a in lg if t <= budget], default=float("nan")) for lg in r["logs"]]
        r["budget_accuracy"] = mean_sd(within)
    return dict(budget_s=budget, archs=res)


def fmt_acc(d):
    "mean ± sd over the seeds, how many seeds when not all, or a dash where no epoch ended within the budget"
    if not d["n"]:
        return "-"
    return f"{d['mean']:.4f} ± {d['sd']:.4f}" + (
        "" if d["n"] == len(d["runs"]) else f" ({d['n']} of {len(d['runs'])} seeds)"
    )


def write_report(results, meta, path):
    "Markdown tables of every task, and a plot of validation accuracy against training time"
    lines = [
        "# EfficientNet against XResNet",
        "",
        f"`python bench/arch_compare.py {meta['argv']}`; {meta['machine']}",
        "",
    ]
    for task, t in results.items():
        lines += [f"## {task}", "", f"Training budget for the last column: {t['budget_s']:.0f} s.", ""]
        lines += [
            "| architecture | params | MACs/sample | train step ms | inference ms | lr | accuracy after the epochs | "
            "accuracy within budget |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for arch, r in t["archs"].items():
            acc = [fmt_acc(r["accuracy"]), fmt_acc(r["budget_accuracy"])]
            lines.append(
                f"| {arch} | {r['params'] / 1e6:.2f}M | {r['macs'] / 1e6:.0f}M | {r['train_ms']:.0f} | "
                f"{r['infer_ms']:.0f} | {r['lr']:.2g} | {acc[0]} | {acc[1]} |"
            )
        lines.append("")
    path.with_suffix(".md").write_text("\n".join(lines))
    path.with_suffix(".json").write_text(json.dumps(dict(meta=meta, results=results), indent=1))
    fig, axs = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, (task, t) in zip(axs[0], results.items()):
        for arch, r in t["archs"].items():
            n = len(r["logs"][0])
            ts = [statistics.mean(lg[i][0] for lg in r["logs"]) for i in range(n)]
            acc = [statistics.mean(lg[i][1] for lg in r["logs"]) for i in range(n)]
            ax.plot(ts, acc, "o-", label=arch)
        ax.axvline(t["budget_s"], color="grey", ls=":")
        ax.set_xlabel("training time (s)"), ax.set_ylabel("validation accuracy"), ax.set_title(task), ax.legend()
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=80)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", nargs="+", default=["shapes", "moving"], help="shapes, moving, or a folder/CSV of files")
    ap.add_argument("--ndim", type=int, default=3, help="for a folder: 2 (images) or 3 (volumes)")
    ap.add_argument("--archs", nargs="+", default=ARCHS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lrs", nargs="+", default=["1e-3", "3e-3", "1e-2"], help="a grid, one rate, or `find`")
    ap.add_argument("--budget", type=float, default=None, help="seconds (default: the fastest architecture's)")
    ap.add_argument("--size", type=int, default=None, help="24 for shapes and moving, else the files' size")
    ap.add_argument("--frames", type=int, default=24, help="frames per synthetic clip (xresnet needs >= 24 per axis)")
    ap.add_argument("--items", type=int, default=2400, help="synthetic items")
    ap.add_argument("--bs", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="tiny data, one seed, one epoch, b0 and xresnet18")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "ARCH.md"))
    a = ap.parse_args(argv)
    if a.quick:
        a.archs, a.seeds, a.epochs, a.lrs, a.items, a.rounds, a.size = (
            ["b0", "xresnet18"],
            [0],
            1,
            ["3e-3"],
            64,
            1,
            None,
        )
    if a.threads:
        torch.set_num_threads(a.threads)
    results = {}
    for data in a.data:
        size = a.size or (24 if data in ("shapes", "moving") else None)
        kw = dict(size=size) if size else {}
        if data == "moving":
            kw["n_frames"] = a.frames
        dls = job_dls(data, ndim=a.ndim, bs=a.bs, n_items=a.items, seed=0, **kw)
        _add_zscore(dls)
        results[data] = run_task(data, dls, a.archs, a.seeds, a.epochs, a.lrs, a.rounds, a.budget)
    meta = dict(argv=" ".join(sys.argv[1:] if argv is None else argv), torch=torch.__version__, machine=machine())
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    write_report(results, meta, Path(a.out))
    print(f"wrote {Path(a.out).with_suffix('.md')}, .json, .png")
    return results


if __name__ == "__main__":
    main()
