"""A/B of two versions of effnet_fastai in one process: the same networks, the same weights and inputs, timed in
interleaved rounds (old, new, old, new, ...), and their outputs compared to the bit.

    git archive <old-commit> effnet_fastai | tar -x -C /tmp/old      # the old package, next to this checkout's
    python bench/ab_versions.py --old /tmp/old/effnet_fastai [--rounds 9] [--threads 2]

The old package is imported under another name (`effnet_fastai_old`: its modules import each other relatively), so
both live in one process and a machine shared with other work slows both alike. A ratio above 1 means the new
version is faster. Used for the refactor of 0.2 (bench/NOTES.md)."""

import argparse, copy, importlib.util, os, shutil, statistics, sys, tempfile, warnings

warnings.filterwarnings("ignore")
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]
from bench import Runner, interleaved, ratio_stats, fmt_ratio, machine

WORKLOADS = {
    "3D b0 (2,1,64,64,64)": dict(shape=(2, 1, 64, 64, 64), kw=dict(ni=1, ndim=3)),
    "2D b0 (16,3,224,224)": dict(shape=(16, 3, 224, 224), kw=dict(ni=3, ndim=2)),
}


def load_old(path):
    "The package at `path` imported as `effnet_fastai_old`"
    tmp = tempfile.mkdtemp()
    shutil.copytree(path, os.path.join(tmp, "effnet_fastai_old"))
    spec = importlib.util.spec_from_file_location(
        "effnet_fastai_old", os.path.join(tmp, "effnet_fastai_old", "__init__.py")
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules["effnet_fastai_old"] = mod
    spec.loader.exec_module(mod)
    return mod


def models(old, kw):
    "The b0 of each version, with the same weights"
    import effnet_fastai as new

    torch.manual_seed(0)
    a = old.efficientnet_b0(num_classes=1000, **kw)
    b = new.efficientnet_b0(num_classes=1000, **kw)
    b.load_state_dict(a.state_dict())
    return a, b


def same_outputs(a, b, x):
    "Whether eval outputs, a training step's loss and gradients are bit-identical"
    a, b = copy.deepcopy(a), copy.deepcopy(b)
    with torch.no_grad():
        ev = torch.equal(a.eval()(x), b.eval()(x))
    torch.manual_seed(0)
    la = a.train()(x).logsumexp(1).mean()  # the same drop-connect and dropout draws
    torch.manual_seed(0)
    lb = b.train()(x).logsumexp(1).mean()
    la.backward()
    lb.backward()
    return ev, torch.equal(la, lb), all(torch.equal(p.grad, q.grad) for p, q in zip(a.parameters(), b.parameters()))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old", required=True, help="path of the old `effnet_fastai` package folder")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    old = load_old(a.old)
    print(
        f"{machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads, {a.rounds} rounds, load {os.getloadavg()}"
    )
    print("| workload | measure | old (ms) | new (ms) | old/new |\n|---|---|---|---|---|")
    for name, wl in WORKLOADS.items():
        x = torch.randn(wl["shape"], generator=torch.Generator().manual_seed(0))
        ma, mb = models(old, wl["kw"])
        ev, loss, grads = same_outputs(ma, mb, x)
        rs = {"old": Runner(ma, x, torch.device("cpu")), "new": Runner(mb, x, torch.device("cpu"))}
        for what in ("train", "infer"):
            t = interleaved(rs, what, a.rounds)
            print(
                f"| {name} | {what} | {statistics.median(t['old']) * 1e3:.0f} | {statistics.median(t['new']) * 1e3:.0f} | "
                f"{fmt_ratio(ratio_stats(t['old'], t['new']))} |"
            )
        print(f"| {name} | bit-identical | eval logits: {ev}, train loss: {loss}, gradients: {grads} | | |")
    print(f"load at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
