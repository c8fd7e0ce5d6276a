"Training that survives being killed: atomic checkpoints, `--resume`, nothing half-written (issue 16)"

import os, re, shutil, signal, subprocess, sys, threading, time
from contextlib import contextmanager
from pathlib import Path
import numpy as np, pandas as pd, pytest, torch

ROOT = Path(__file__).parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1"}
ITEMS, BS = 480, 16
JOB = ["--items", str(ITEMS), "--size", "16", "--epochs", "3", "--bs", str(BS), "--threads", "1", "--seed", "0"]
N_TRAIN = int(ITEMS * 0.8) // BS  # training batches per epoch


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    "The console script `effnet_fastai_train` as pip writes it, which exits with what `main` returns"
    f = tmp_path_factory.mktemp("bin") / "effnet_fastai_train"
    f.write_text('import sys\nfrom effnet_fastai.train import main\nif __name__ == "__main__": sys.exit(main())\n')
    return [sys.executable, str(f)]


def _job(cli, *args, cwd):
    return subprocess.run([*cli, *args], env=ENV, cwd=cwd, capture_output=True, text=True, timeout=900)


def _out(r):
    return r.stdout[-2000:] + r.stderr[-3000:]


@pytest.fixture(scope="module")
def whole(cli, tmp_path_factory):
    "The small job run without interruption, to a relative `--out`"
    cwd = tmp_path_factory.mktemp("whole")
    r = _job(cli, *JOB, "--out", "run", cwd=cwd)
    assert r.returncode == 0, _out(r)  # the console script exits 0 (it used to exit with the learner's repr)
    return cwd / "run"


def _read_into(stream, buf):
    "Collect what `stream` prints into the list `buf`, as it comes"
    while b := os.read(stream.fileno(), 4096):
        buf.append(b.decode("utf-8", "replace"))


def _kill_mid_epoch_2(cli, cwd):
    "Start the job and SIGKILL it while it trains on the first half of its second epoch"
    p = subprocess.Popen(
        [*cli, *JOB, "--out", "run"], env=ENV, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    buf = []
    threading.Thread(target=_read_into, args=(p.stdout, buf), daemon=True).start()
    mid = re.compile(rf"Epoch 2/3 : \|[^|]*\|\s+[\d.]+% \[(\d+)/{N_TRAIN} ")  # the progress bar of the training batches
    try:
        while not any(0 < int(k) <= N_TRAIN // 2 for k in mid.findall("".join(buf))):
            assert p.poll() is None, "".join(buf)[-3000:]
            time.sleep(0.05)
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    return p.returncode


@pytest.mark.slow
def test_killed_mid_epoch_then_resumed(cli, whole, tmp_path):
    "SIGKILL in the middle of epoch 2, then `--resume`: the same epochs and accuracy as the run that was not killed"
    from effnet_fastai.checkpoint import load_checkpoint

    out = tmp_path / "run"
    assert _kill_mid_epoch_2(cli, tmp_path) == -signal.SIGKILL
    assert load_checkpoint(out / "checkpoint.pth")["epoch"] == 1  # killed after the first checkpoint, before the second
    assert sorted(o.name for o in out.iterdir()) == [
        "checkpoint.pth",
        "history.csv",
    ]  # nothing half-written, no learner
    r = _job(cli, *JOB, "--out", "run", "--resume", cwd=tmp_path)
    assert r.returncode == 0, _out(r)
    assert "resuming from run/checkpoint.pth: 1 of 3 epochs done" in r.stdout
    h0, h1 = pd.read_csv(whole / "history.csv"), pd.read_csv(out / "history.csv")
    assert list(h1.epoch) == [0, 1, 2]  # the history is continued, not restarted
    assert h0.accuracy.iloc[-1] > 0.4, (
        h0
    )  # the run learns (chance is 0.25), so a resume from the wrong weights would show
    assert abs(h1.accuracy.iloc[-1] - h0.accuracy.iloc[-1]) <= 0.02, (h0, h1)
    # one thread, the same seed and the random states restored: the resumed epochs are those of the run not killed
    np.testing.assert_allclose(h1[["train_loss", "valid_loss"]], h0[["train_loss", "valid_loss"]], rtol=1e-4)
    assert {"model.pkl", "report.png"} <= {o.name for o in out.iterdir()}


@pytest.mark.slow
def test_resume_finished_or_different_run(cli, whole):
    "Resuming a finished run says so and exits 0; resuming with another data argument is refused, naming it"
    before = {o.name: o.stat().st_mtime_ns for o in whole.iterdir()}
    r = _job(cli, *JOB, "--out", str(whole), "--resume", cwd=whole.parent)
    assert r.returncode == 0 and "has already finished (3 of 3 epochs" in r.stdout, _out(r)
    assert {o.name: o.stat().st_mtime_ns for o in whole.iterdir()} == before  # nothing written
    r = _job(cli, *JOB, "--size", "12", "--out", str(whole), "--resume", cwd=whole.parent)
    assert r.returncode != 0 and "--size is 12 here but was 16 in the checkpointed run" in r.stderr, _out(r)
    from effnet_fastai.train import job_checkpoint
    from effnet_fastai.checkpoint import load_checkpoint

    run = {**load_checkpoint(whole / "checkpoint.pth")["meta"], "arch": "b1"}
    with pytest.raises(ValueError, match="--arch is 'b1' here but was 'b0'"):
        job_checkpoint(whole, True, run)


@pytest.mark.slow
def test_damaged_checkpoint_is_refused(cli, whole, tmp_path):
    "A truncated or corrupted checkpoint is refused, naming the file, and the run does not start again from zero"
    from effnet_fastai.train import job_checkpoint

    raw = (whole / "checkpoint.pth").read_bytes()
    out = tmp_path / "cut"
    out.mkdir()
    (out / "checkpoint.pth").write_bytes(raw[: len(raw) // 3])
    r = _job(cli, *JOB, "--out", str(out), "--resume", cwd=tmp_path)
    assert r.returncode != 0 and f"checkpoint {out / 'checkpoint.pth'} is truncated or corrupt" in r.stderr, _out(r)
    assert [o.name for o in out.iterdir()] == ["checkpoint.pth"]  # no new history, report or learner
    bad = bytearray(raw)
    bad[len(raw) // 2 : len(raw) // 2 + 16] = bytes(16)  # zeros inside the weights
    (out / "checkpoint.pth").write_bytes(bad)
    with pytest.raises(
        ValueError, match=f"checkpoint {re.escape(str(out / 'checkpoint.pth'))} is truncated or corrupt .*CRC"
    ):
        job_checkpoint(out, True, {})


# In-process: the callback and `Learner.resume_from` on a tiny learner


def _tiny(path, cbs=None):
    from fastai.basics import set_seed, accuracy
    from effnet_fastai.train import job_dls
    from effnet_fastai.learner import efficientnet_learner

    set_seed(0, reproducible=True)
    return efficientnet_learner(job_dls(size=12, bs=8, n_items=48), "b0", metrics=accuracy, cbs=cbs, path=path)


@contextmanager
def _quiet(learn):
    with learn.no_bar(), learn.no_logging():
        yield learn


def _quiet_fit(learn, *args, **kwargs):
    with _quiet(learn):
        learn.fit_one_cycle(*args, **kwargs)


def _max_diff(a, b):
    sa, sb = a.model.state_dict(), b.model.state_dict()
    return max((sa[k].double() - sb[k].double()).abs().max().item() for k in sa)


def _interrupt_after(epoch):
    from fastai.basics import Callback, CancelFitException
    from effnet_fastai.checkpoint import Checkpoint

    class Interrupt(Callback):
        order = Checkpoint.order + 1

        def after_epoch(self):
            if self.epoch == epoch:
                raise CancelFitException  # as a kill just after the checkpoint

    return Interrupt()


@pytest.mark.slow
def test_epoch_boundary_resume_gives_the_same_weights(tmp_path, one_thread):
    "One thread, the same seed: interrupted at an epoch boundary and resumed, the weights are the uninterrupted run's to 1e-6"
    from effnet_fastai.checkpoint import Checkpoint

    whole = _tiny(tmp_path, Checkpoint("whole.pth"))
    _quiet_fit(whole, 3, 3e-3)
    cut = _tiny(tmp_path, Checkpoint("cut.pth"))
    _quiet_fit(cut, 3, 3e-3, cbs=_interrupt_after(1))
    resumed = _tiny(tmp_path, Checkpoint("cut.pth"))
    start = resumed.resume_from(tmp_path / "cut.pth")
    _quiet_fit(resumed, 3, 3e-3, start_epoch=start)
    assert start == 2 and _max_diff(whole, resumed) <= 1e-6, _max_diff(whole, resumed)
    assert resumed.recorder.values == whole.recorder.values and len(resumed.recorder.losses) == len(
        whole.recorder.losses
    )
    assert _max_diff(whole, cut) > 1e-3  # (the interrupted fit did stop early)


@pytest.mark.slow
def test_fine_tune_resume_gives_the_same_weights(tmp_path, one_thread):
    "`--pretrained` runs fastai's `fine_tune` as two fits: a run killed in the second resumes exactly, from either fit's checkpoint"
    from fastai.basics import Callback, CancelFitException
    from effnet_fastai.checkpoint import Checkpoint, load_checkpoint
    from effnet_fastai.train import fit_job

    class InterruptUnfrozen(Callback):
        order = Checkpoint.order + 1

        def before_fit(self):  # keep the checkpoint of the frozen fit, as a kill early in the unfrozen one leaves it
            if self.learn.checkpoint.stage == 1:
                shutil.copy(tmp_path / "cut.pth", tmp_path / "frozen.pth")

        def after_epoch(self):
            if self.learn.checkpoint.stage == 1 and self.epoch == 0:
                raise CancelFitException

    whole = _tiny(tmp_path, Checkpoint("whole.pth"))
    with _quiet(whole):
        fit_job(whole, 2, 2e-3, pretrained=True)
    cut = _tiny(tmp_path, [Checkpoint("cut.pth"), InterruptUnfrozen()])
    with _quiet(cut):
        fit_job(cut, 2, 2e-3, pretrained=True)
    assert _max_diff(whole, cut) > 1e-3
    for fn, where in ("frozen.pth", (0, 1, 1)), ("cut.pth", (1, 1, 2)):  # (fit, epochs done, epochs of that fit)
        ck = load_checkpoint(tmp_path / fn)
        assert (ck["stage"], ck["epoch"], ck["n_epoch"]) == where
        resumed = _tiny(tmp_path, Checkpoint("resumed.pth"))
        with _quiet(resumed):
            fit_job(resumed, 2, 2e-3, pretrained=True, ck=ck)
        assert _max_diff(whole, resumed) <= 1e-6, (fn, _max_diff(whole, resumed))


@pytest.mark.slow
def test_failing_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    "A write that fails half-way (as a kill or a full disk would) leaves the previous checkpoint whole and resumable"
    from effnet_fastai.checkpoint import Checkpoint, load_checkpoint

    real_save, calls = torch.save, []

    def failing_save(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) < 2:
            return real_save(obj, f, *args, **kwargs)
        real_save(obj, f, *args, **kwargs)
        Path(f).write_bytes(Path(f).read_bytes()[:1000])
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    learn = _tiny(tmp_path, Checkpoint("ck.pth", history="history.csv"))
    with pytest.raises(OSError, match="No space left"):
        _quiet_fit(learn, 3, 3e-3)
    monkeypatch.undo()
    assert (
        len(calls) == 2 and Path(calls[1]).parent == tmp_path and not Path(calls[1]).exists()
    )  # the partial file is gone
    ck = load_checkpoint(tmp_path / "ck.pth")
    assert (ck["epoch"], len(pd.read_csv(tmp_path / "history.csv"))) == (1, 1)
    assert sorted(o.name for o in tmp_path.iterdir()) == ["ck.pth", "history.csv"]
    learn = _tiny(tmp_path, Checkpoint("ck.pth"))
    _quiet_fit(learn, 3, 3e-3, start_epoch=learn.resume_from(ck))
    assert load_checkpoint(tmp_path / "ck.pth")["epoch"] == 3
