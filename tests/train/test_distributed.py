"""Data-parallel training (two gloo processes under torchrun) trains the model one process trains, also when the
processes' shares hold different numbers of labelled tokens."""

import sys
import textwrap

import pytest
import torch

from forgetlab.models.build import ModelConfig, build_model
from forgetlab.train import distributed
from forgetlab.train.data import pack_texts, subset
from forgetlab.train.trainer import PhaseConfig, train_phase

SETUP = '''
import torch
from forgetlab.models.build import ModelConfig, build_model
from forgetlab.train.data import qa_dataset
from forgetlab.train.trainer import EvalSchedule, PhaseConfig


def setup():
    model = build_model(ModelConfig(d_model=32, n_layers=2, n_heads=2, max_positions=32), 30, 0, 1, 2, seed=0)
    g = torch.Generator().manual_seed(1)
    # padded rows whose answers hold 1 to 8 tokens: the processes' shares hold different numbers of labelled tokens
    prompts = [torch.randint(3, 30, (4,), generator=g).tolist() for _ in range(24)]
    answers = [torch.randint(3, 30, (1 + (5 * i) % 8,), generator=g).tolist() for i in range(24)]
    cfg = PhaseConfig(lr=1e-2, warmup_steps=2, max_steps=6, batch_size=4, grad_accum=2, checkpoint_every=3,
                      eval=EvalSchedule(dense_every=2, dense_until=6))
    return model, qa_dataset(prompts, answers, eos_id=1, pad_id=0), cfg  # 24 rows: whole batches on one process or two


def extra(rows, batch, run_forward):  # a term that depends on the process's rows, as FVG's and LwF's do
    # a mean over rows (each process has half of them); a mean over positions would weigh rows by the width of the
    # share they fall in, since a batch is only as wide as its longest row
    return 0.01 * run_forward().logits[:, 0].float().pow(2).mean()
'''

WORKER = '''
import sys
from pathlib import Path

import torch
from setup_phase import extra, setup

from forgetlab.train import distributed
from forgetlab.train.trainer import train_phase

distributed.init_from_env()
out = Path(sys.argv[1])
model, data, cfg = setup()
rank = distributed.rank()
# only process 1 would stop at step 2: every process must follow the main one and train all 6 steps
outcome = train_phase(model, data, cfg, phase="p", state_dir=out / "state", seed=7, extra_loss=extra,
                      evaluate=lambda: {"t": {"em": float(rank)}}, stop=lambda s: s["t"]["em"] >= 1.0, progress=False,
                      log=lambda s: None)
mine = distributed.share(list(range(5)))  # uneven shares: 3 and 2 items
torch.save({"steps": outcome.steps, "weights": model.state_dict(), "world": distributed.world_size(), "share": mine,
            "gathered": distributed.gather_shares([10 * x for x in mine], 5)}, out / f"rank{rank}.pt")
distributed.leave()
assert not torch.distributed.is_initialized()
'''


def _setup_module(tmp_path):
    (tmp_path / "setup_phase.py").write_text(textwrap.dedent(SETUP))
    sys.path.insert(0, str(tmp_path))
    try:
        import importlib

        import setup_phase
        return importlib.reload(setup_phase)
    finally:
        sys.path.remove(str(tmp_path))


@pytest.mark.slow
def test_two_processes_train_what_one_process_trains(tmp_path, torchrun):
    setup = _setup_module(tmp_path)
    (tmp_path / "worker.py").write_text(textwrap.dedent(WORKER))
    proc = torchrun(tmp_path / "worker.py", tmp_path, timeout=300, cwd=tmp_path,
                    env=torchrun.env(PYTHONPATH=str(tmp_path)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2] and [r["steps"] for r in ranks] == [6, 6]
    assert [r["share"] for r in ranks] == [[0, 2, 4], [1, 3]]  # generation splits its prompts this way
    assert [r["gathered"] for r in ranks] == [[0, 10, 20, 30, 40]] * 2  # and every process gets all answers, in order

    model, data, cfg = setup.setup()
    single = train_phase(model, data, cfg, phase="p", state_dir=tmp_path / "single", seed=7, extra_loss=setup.extra,
                         evaluate=lambda: {"t": {"em": 0.0}}, stop=lambda s: s["t"]["em"] >= 1.0, progress=False,
                         log=lambda s: None)
    assert single.steps == 6
    start = build_model(ModelConfig(d_model=32, n_layers=2, n_heads=2, max_positions=32), 30, 0, 1, 2, seed=0).state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(ranks[0]["weights"][name], ranks[1]["weights"][name]), name  # the processes stay in step
        # the same sums in another order: Adam's normalised steps (lr 1e-2 each) agree to 1e-5
        torch.testing.assert_close(ranks[0]["weights"][name], value, rtol=1e-4, atol=1e-5)
    assert any(not torch.equal(start[k], v) for k, v in model.state_dict().items())
    assert (tmp_path / "state" / "resume-state" / "state.json").is_file()  # the main process saved the resumable state


def test_one_process_is_not_distributed(tmp_path):
    """Without a launcher nothing changes: rank 0 of 1, the main process, its own decisions."""
    assert not distributed.launched() and distributed.world_size() == 1 and distributed.is_main()
    assert distributed.agree(True) is True and distributed.main_first(lambda: 3) == 3
    assert distributed.share([1, 2, 3]) == distributed.gather_shares([1, 2, 3], 3) == [1, 2, 3]
    model = build_model(ModelConfig(d_model=32, n_layers=2, n_heads=2, max_positions=32), 30, 0, 1, 2, seed=0)
    data = subset(pack_texts([list(range(3, 12))] * 8, eos_id=1, block_size=16), torch.arange(4))
    train_phase(model, data, PhaseConfig(max_steps=1, batch_size=3, checkpoint_every=0), phase="p", state_dir=tmp_path,
                seed=0, progress=False)  # any batch size on one process


PEER = '''
import json
import sys

import torch.distributed as dist

from forgetlab.train import distributed

folder, rank = sys.argv[1], int(sys.argv[2])
dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=2)
mine = distributed.share(list(range(5)))
splits = []
for size in (3, 4):
    try:
        distributed.check_batch_split(size)
        splits.append(None)
    except ValueError as err:
        splits.append(str(err))
made = distributed.main_first(lambda: "made by rank 0")


def fail():
    raise FileNotFoundError(f"no run here (raised on rank {rank})")


try:
    distributed.main_first(fail)
    raised = None
except FileNotFoundError as err:
    raised = str(err)


def bad_json():
    json.loads("{not json")  # a ValueError subclass the other process cannot rebuild by name


def not_a_folder():
    raise NotADirectoryError(f"run.json is not a directory (raised on rank {rank})")


def disk_full():
    raise OSError(28, "No space left on device")


caught = []
for fn in (bad_json, not_a_folder, disk_full):
    try:
        distributed.main_first(fn)
    except (ValueError, OSError) as err:
        caught.append([type(err).__name__, str(err), isinstance(err, ValueError), isinstance(err, OSError)])
out = {"world": distributed.world_size(), "main": distributed.is_main(), "total": distributed.total(1.5 + rank),
       "share": mine, "gathered": distributed.gather_shares([10 * x for x in mine], 5), "splits": splits,
       "made": made, "raised": raised, "caught": caught}
with open(f"{folder}/rank{rank}.json", "w") as fh:
    json.dump(out, fh)
distributed.leave()
'''


def test_two_peers_sum_share_gather_and_split_batches(tmp_path):
    """Two gloo processes started directly (no torchrun, a few seconds): ``total`` is the sum over the processes
    (1.5 + 2.5 = 4 on both), rank r's share of 0..4 is every second item from r, ``gather_shares`` puts them back in
    order on every process, and a micro-batch of 3 rows does not split over 2 processes while 4 does. ``main_first``
    runs its function on rank 0 alone (the others get None), and a ValueError or OSError there is raised on both,
    with its message and type (rank 1: the nearest type it can rebuild), so no process waits forever."""
    import json
    import os
    import subprocess

    (tmp_path / "peer.py").write_text(PEER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "peer.py"), str(tmp_path), str(r)], env=env,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2] and [r["main"] for r in ranks] == [True, False]
    assert [r["total"] for r in ranks] == [4.0, 4.0]
    assert [r["share"] for r in ranks] == [[0, 2, 4], [1, 3]]
    assert [r["gathered"] for r in ranks] == [[0, 10, 20, 30, 40]] * 2
    for r in ranks:
        assert r["splits"][1] is None and "train.batch_size=3 does not split over 2 processes" in r["splits"][0]
    assert [r["made"] for r in ranks] == ["made by rank 0", None]
    assert [r["raised"] for r in ranks] == ["no run here (raised on rank 0)"] * 2
    # any ValueError or OSError: rank 0 raises it as it was, rank 1 as the nearest class it can rebuild
    bad_json = "Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"
    assert ranks[0]["caught"] == [["JSONDecodeError", bad_json, True, False],
                                  ["NotADirectoryError", "run.json is not a directory (raised on rank 0)", False, True],
                                  ["OSError", "[Errno 28] No space left on device", False, True]]
    assert ranks[1]["caught"] == [["ValueError", bad_json, True, False],
                                  ["NotADirectoryError", "run.json is not a directory (raised on rank 0)", False, True],
                                  ["OSError", "[Errno 28] No space left on device", False, True]]
