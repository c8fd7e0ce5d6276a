"Two CPU processes (torchrun, gloo) train on the synthetic volumes under fastai's `distrib_ctx` and end with identical weights"

import os, sys, subprocess, textwrap
from pathlib import Path
import pytest, torch

WORKER = textwrap.dedent("""
    import os, sys, warnings, torch
    warnings.filterwarnings('ignore')
    torch.set_num_threads(1)
    from fastai.basics import *
    from fastai.distributed import *
    from fastai.callback.progress import ProgressCallback
    from effnet_fastai.data import ShapeVolumes, aug_transforms_3d
    from effnet_fastai.learner import efficientnet_learner
    out, sync_bn = Path(sys.argv[1]), sys.argv[2] == '1'
    set_seed(0)
    dls = ShapeVolumes(32, size=12, seed=0).dataloaders(bs=8, batch_tfms=aug_transforms_3d())
    learn = efficientnet_learner(dls, 'b0', metrics=accuracy)
    learn.remove_cb(ProgressCallback)
    if int(os.environ['RANK']) == 0: torch.save(learn.model.state_dict(), out/'init.pt')
    with learn.distrib_ctx(sync_bn=sync_bn, cpu=True): learn.fit(2, 1e-3)
    rank = int(os.environ['RANK'])
    torch.save({k: v for k, v in learn.model.state_dict().items()}, out/f'rank{rank}.pt')
    print('rank', rank, 'world', os.environ['WORLD_SIZE'], 'done', type(learn.model[0].stem[1]).__name__)
""")


@pytest.mark.slow
def test_two_process_gloo(tmp_path, sync_bn=False):  # SyncBatchNorm needs GPU modules (a DDP restriction)
    (tmp_path / "worker.py").write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(tmp_path / "worker.py"),
        str(tmp_path),
        str(int(sync_bn)),
    ]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("done") == 2, r.stdout
    w0, w1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert w0.keys() == w1.keys()
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    assert not torch.equal(w0["1.4.weight"], torch.load(tmp_path / "init.pt")["1.4.weight"])  # it trained
