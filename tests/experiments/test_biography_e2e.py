"""End to end at smoke size: the real command, its files, the phase cache, and resume after SIGKILL."""

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

KEYS = ["task0_before", "task0_min_during_task1", "task0_after_task1", "task1_after", "task0_recovered",
        "task0_recovery_control", "task0_final", "spurious_share"]  # spurious_share last: not a fraction


def forgetlab(*args, cache, **kw):
    env = {**os.environ, "FORGETLAB_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-m", "forgetlab.cli", *args], env=env, capture_output=True, text=True, **kw)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("smoke")
    t = time.perf_counter()
    proc = forgetlab("biography", "run", "--preset", "smoke", "--out", str(root / "run"), "--no-progress", cache=root / "cache")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return root, proc, time.perf_counter() - t


def test_smoke_run_writes_the_contract(smoke_run):
    root, proc, seconds = smoke_run
    run = root / "run"
    results = json.loads((run / "results.json").read_text())
    for key in KEYS[:-1]:
        assert 0.0 <= results[key] <= 1.0, (key, results[key])
    from forgetlab.metrics.cl import spurious_share  # defined only where task 0 dropped (not always so in smoke)

    share = spurious_share(results["task0_before"], results["task0_final"], results["task0_recovered"])
    assert results["spurious_share"] == (None if math.isnan(share) else pytest.approx(share))
    assert results["task0_final"] == results["task0_after_task1"]  # one new task
    assert results["method"] == "seq" and results["preset"] == "smoke" and results["seed"] == 0
    assert results["seconds"] > 0
    for phase in ("pretrain", "task0", "task1", "recovery", "recovery_control"):
        assert 0.0 <= results["task0_recall"][phase] <= 1.0, phase
    rows = list(csv.DictReader((run / "curves.csv").open()))
    assert list(rows[0]) == ["phase", "step", "task", "metric", "value"]
    phases = {r["phase"] for r in rows}
    assert {"task0", "task1", "recovery", "recovery_control"} <= phases
    assert all(0.0 <= float(r["value"]) <= 1.0 for r in rows if r["metric"] == "em")
    # The step-wise minimum really is the minimum of the logged task-0 curve during task 1.
    during = [float(r["value"]) for r in rows if r["phase"] == "task1" and r["task"] == "task0" and r["metric"] == "em"]
    assert math.isclose(min(during), results["task0_min_during_task1"], rel_tol=1e-5)
    assert (run / "curves.png").stat().st_size > 10_000
    report = (run / "report.md").read_text()
    share_cell = "–" if results["spurious_share"] is None else f"{results['spurious_share']:.3f}"
    assert f"| spurious share of the drop | {share_cell} |" in report and "(curves.png)" in report
    assert json.loads((run / "config.json").read_text())["preset"] == "smoke"
    environment = json.loads((run / "environment.json").read_text())["runs"]  # the libraries it was computed with
    assert environment[0]["command"][:4] == ["forgetlab", "biography", "run", "--preset"] and environment[0]["packages"]["torch"]
    for phase in ("pretrain", "task0", "task1", "recovery"):
        assert (run / "checkpoints" / phase / "model.safetensors").is_file()
        assert (run / "checkpoints" / phase / "tokenizer.json").is_file()
    # The summary table is printed.
    assert "spurious share" in proc.stdout


def test_summary_of_hand_made_phases_with_two_new_tasks():
    """The smoke run has one new task, so "after task 1" and "final" coincide there. Hand-made phase results of a
    run with two: task-0 EM 0.8 before, lowest 0.3 while task 1 is learned (a lower 0.1 while task 0 itself was
    learned does not count), 0.5 after task 1, 0.2 after task 2, recovered to 0.6 from there: the spurious share
    is (0.6 - 0.2) / (0.8 - 0.2) = 2/3, and the per-attribute scores are those after task 1."""
    from types import SimpleNamespace

    from forgetlab.experiments.biography import summarize
    from forgetlab.experiments.config import BiographyRunConfig

    def phase(task0, task1, task2, steps=10, **task0_extra):
        return SimpleNamespace(info={"steps": steps, "final": {"task0": {"em": task0, **task0_extra}, "task1": {"em": task1},
                                                               "task2": {"em": task2}}})

    phases = {"pretrain": phase(0.0, 0.0, 0.0), "task0": phase(0.8, 0.05, 0.0, em_major=0.9),
              "task1": phase(0.5, 0.9, 0.1, steps=7, em_major=0.4), "task2": phase(0.2, 0.7, 0.95),
              "recovery": phase(0.6, 0.7, 0.9), "recovery_control": phase(0.25, 0.7, 0.9)}
    rows = [{"phase": "task0", "step": 1, "task": "task0", "metric": "em", "value": 0.1},
            {"phase": "task1", "step": 1, "task": "task0", "metric": "em", "value": 0.3},
            {"phase": "task1", "step": 2, "task": "task1", "metric": "em", "value": 0.2},  # another task
            {"phase": "task1", "step": 2, "task": "task0", "metric": "recall", "value": 0.05},  # another metric
            {"phase": "task1", "step": 3, "task": "task0", "metric": "em", "value": 0.5},
            {"phase": "task2", "step": 1, "task": "task0", "metric": "em", "value": 0.15}]  # after task 1
    out = summarize(BiographyRunConfig(), phases, rows, n_tasks=2, seconds=1.0)
    assert (out["task0_before"], out["task0_min_during_task1"], out["task0_after_task1"], out["task0_final"]) == (
        0.8, 0.3, 0.5, 0.2)
    assert (out["task1_after"], out["task0_recovered"], out["task0_recovery_control"], out["task1_steps"]) == (
        0.9, 0.6, 0.25, 7)
    assert out["spurious_share"] == pytest.approx(2 / 3)
    assert out["per_attribute_after_task1"] == {"em_major": 0.4}
    assert out["score_matrix"]["rows"] == ["pretrain", "task0", "task1", "task2"]
    assert out["score_matrix"]["R"] == [[0.0, 0.0, 0.0], [0.8, 0.05, 0.0], [0.5, 0.9, 0.1], [0.2, 0.7, 0.95]]


def test_checkpoint_loads_with_auto_classes(smoke_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, _, _ = smoke_run
    ckpt = root / "run" / "checkpoints" / "task1"
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    tok = AutoTokenizer.from_pretrained(ckpt)
    assert tok.eos_token_id is not None and model.config.vocab_size == len(tok)


def test_second_method_reuses_cached_phases(smoke_run):
    root, _, _ = smoke_run
    proc = forgetlab("biography", "run", "--preset", "smoke", "--out", str(root / "freeze"), "--method", "freeze",
                     "--freeze-layers", "1", "--snapshot-steps", "3", "--no-progress", cache=root / "cache")
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = proc.stdout + proc.stderr
    assert "[pretrain] cached" in log and "[task0] cached" in log
    assert "[task1] cached" not in log
    first = json.loads((root / "run" / "results.json").read_text())
    second = json.loads((root / "freeze" / "results.json").read_text())
    assert second["method"] == "freeze" and second["task0_before"] == first["task0_before"]
    # The snapshot is the model after 3 task-1 steps: moved from task 0, not yet at the end, layer 0 frozen.
    from safetensors.torch import load_file

    ckpts = root / "freeze" / "checkpoints"
    snap, start, end = (load_file(ckpts / n / "model.safetensors") for n in ("task1-step-3", "task0", "task1"))
    moved = [k for k in snap if not torch.equal(snap[k], start[k])]
    assert moved and any(not torch.equal(snap[k], end[k]) for k in moved)
    assert all(".layers.0." not in k and "embed" not in k for k in moved)


def test_ewc_holds_task1_weights_nearer_task0_than_seq(smoke_run):
    from safetensors.torch import load_file

    root, _, _ = smoke_run
    proc = forgetlab("biography", "run", "--preset", "smoke", "--out", str(root / "ewc"), "--method", "ewc",
                     "--ewc-strength", "1e7", "--no-progress", cache=root / "cache")
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((root / "ewc" / "results.json").read_text())
    assert results["method"] == "ewc" and results["ewc_strength"] == 1e7
    start = load_file(root / "run" / "checkpoints" / "task0" / "model.safetensors")

    def moved(run):
        end = load_file(root / run / "checkpoints" / "task1" / "model.safetensors")
        return sum(float((end[k] - start[k]).float().pow(2).sum()) for k in start) ** 0.5

    assert 0 < moved("ewc") < 0.8 * moved("run")  # the same task-1 steps, pulled back towards task 0
    bad = forgetlab("biography", "run", "--preset", "smoke", "--out", str(root / "bad"), "--ewc-strength", "5",
                    "--no-progress", cache=root / "cache")
    assert bad.returncode == 2 and "needs --method ewc" in bad.stderr


def test_sigkill_then_resume_gives_the_same_results(smoke_run, tmp_path):
    root, _, _ = smoke_run
    reference = json.loads((root / "run" / "results.json").read_text())
    cache, out = tmp_path / "cache", tmp_path / "run"
    env = {**os.environ, "FORGETLAB_CACHE": str(cache)}
    proc = subprocess.Popen([sys.executable, "-m", "forgetlab.cli", "biography", "run", "--preset", "smoke",
                             "--out", str(out), "--no-progress"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 900  # generous: CI machines may be slow or busy
    while time.time() < deadline and proc.poll() is None and not list(cache.glob("task1-*/work/resume-state/state.json")):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(cache.glob("task1-*/work/resume-state")), "the run finished before it could be killed mid-task"
    assert not (out / "results.json").exists()
    again = forgetlab("biography", "run", "--preset", "smoke", "--out", str(out), "--resume", "--no-progress", cache=cache)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming at step" in again.stdout + again.stderr
    resumed = json.loads((out / "results.json").read_text())
    for key in KEYS:
        assert resumed[key] == reference[key], key


def test_recover_any_checkpoint(smoke_run):
    root, _, _ = smoke_run
    run = root / "run"
    proc = forgetlab("biography", "recover", "--model", str(run / "checkpoints" / "task1"), "--run", str(run),
                     "--out", str(root / "rec"), cache=root / "cache")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rec = json.loads((root / "rec" / "recovery.json").read_text())
    results = json.loads((run / "results.json").read_text())
    # Same checkpoint, same recovery settings: the numbers of the run itself.
    assert rec["current"] == results["task0_after_task1"]
    assert rec["recovered"] == results["task0_recovered"]
    assert rec["before"] == results["task0_before"]
    assert rec["spurious_share"] == results["spurious_share"] or rec["spurious_share"] == pytest.approx(results["spurious_share"])


def test_recover_refuses_a_checkpoint_of_another_vocabulary(smoke_run, tmp_path):
    from forgetlab.models.tokenizers import build_word_tokenizer
    from forgetlab.models.zoo import random_model, tiny_config

    root, _, _ = smoke_run
    tok = build_word_tokenizer(["other", "words", "entirely"])
    model = random_model(tiny_config("llama", len(tok) + 400, n_layers=1))  # larger: it would not fail on an index
    model.save_pretrained(tmp_path / "other")
    tok.save_pretrained(tmp_path / "other")
    proc = forgetlab("biography", "recover", "--model", str(tmp_path / "other"), "--run", str(root / "run"),
                     "--out", str(tmp_path / "rec"), cache=root / "cache")
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "does not share the vocabulary of the run" in lines[0], proc.stderr
    assert not (tmp_path / "rec" / "recovery.json").exists()


def test_generate_writes_the_world(tmp_path):
    proc = forgetlab("biography", "generate", "--preset", "smoke", "--out", str(tmp_path / "w"), cache=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("world.json", "pretrain.txt", "qa_task0_train.jsonl", "qa_task0_test.jsonl", "qa_task1.jsonl",
                 "tokenizer/tokenizer.json"):
        assert (tmp_path / "w" / name).is_file(), name
    lines = (tmp_path / "w" / "pretrain.txt").read_text().splitlines()
    assert len(lines) == 120 * 5


def test_start_from_a_local_checkpoint(smoke_run, tmp_path):
    """Any local HF checkpoint can be the starting model; its own tokenizer is used."""
    root, _, _ = smoke_run
    ckpt = root / "run" / "checkpoints" / "pretrain"
    proc = forgetlab("biography", "run", "--preset", "smoke", "--out", str(tmp_path / "run"), "--no-progress",
                     "--set", f"model.checkpoint={ckpt}", "--set", "pretrain.max_steps=2", cache=tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert 0 <= results["task0_before"] <= 1


def test_compiled_pretraining_is_reproducible(tmp_path):
    """Same seed, two processes, compiled CPU kernels: bit-identical weights (they differed before)."""
    weights = []
    for i in range(2):
        proc = forgetlab("biography", "run", "--preset", "smoke", "--out", str(tmp_path / f"run{i}"), "--no-progress",
                         "--set", "pretrain.compile=true", "--set", "task.max_steps=5", cache=tmp_path / f"cache{i}")
        assert proc.returncode == 0, proc.stderr[-2000:]
        weights.append((tmp_path / f"run{i}" / "checkpoints" / "pretrain" / "model.safetensors").read_bytes())
    assert weights[0] == weights[1]


@pytest.mark.slow
def test_two_processes_under_torchrun(smoke_run, tmp_path, torchrun):
    """``torchrun --nproc_per_node 2 -m forgetlab biography run`` (gloo on CPUs): every phase trains data-parallel, the
    main process alone writes the run and the phase cache, the summary is printed once, and the numbers are valid;
    the other biography commands refuse to start under the launcher."""
    env = torchrun.env(FORGETLAB_CACHE=str(tmp_path / "cache"))
    proc = torchrun("-m", "forgetlab", "biography", "run", "--preset", "smoke", "--out", tmp_path / "run", "--no-progress",
                    env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("spurious share of the drop") == 1
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    for key in KEYS[:-1]:
        assert 0.0 <= results[key] <= 1.0, (key, results[key])
    done = sorted(p.parent.name.split("-")[0] for p in (tmp_path / "cache").glob("*/done.json"))
    assert done == ["pretrain", "recovery", "recovery_control", "task0", "task1"]
    assert not list((tmp_path / "cache").glob("*/work"))  # the main process cleaned up each phase's resumable state
    # the same run trained by one process reaches the same task-0 extraction within a few questions
    single = json.loads((smoke_run[0] / "run" / "results.json").read_text())
    assert abs(results["task0_before"] - single["task0_before"]) < 0.1
    refused = torchrun("-m", "forgetlab", "biography", "generate", "--preset", "smoke", "--out", tmp_path / "w", env=env,
                       timeout=300)
    assert refused.returncode != 0 and refused.stderr.count("`forgetlab biography generate` runs in one process") == 1


def test_phase_keys_name_the_number_of_processes(monkeypatch):
    """A phase trained by several processes is cached apart from the one-process phase of the same config; one
    process keeps the plain config hash, so existing caches stay valid."""
    from forgetlab.experiments import biography
    from forgetlab.utils.io import config_hash

    assert biography.phase_key("task0", "abc", {"lr": 1e-3}) == config_hash("task0", "abc", {"lr": 1e-3})
    monkeypatch.setattr(biography.distributed, "world_size", lambda: 2)
    two = biography.phase_key("task0", "abc", {"lr": 1e-3})
    monkeypatch.setattr(biography.distributed, "world_size", lambda: 8)
    assert len({two, biography.phase_key("task0", "abc", {"lr": 1e-3}), config_hash("task0", "abc", {"lr": 1e-3})}) == 3


def test_a_setting_changes_the_cache_key_of_exactly_the_phases_it_changes():
    """A phase is reused from the cache when its key matches, so every setting that changes what a phase computes
    must change its key (and that of every phase trained from it), and a setting that changes only later phases must
    leave the earlier keys alone (else the cache is never reused). The dependencies, by hand: pretraining reads the
    world, the model, block_size, its own settings, the evaluation settings and the seed; task 0 starts from it;
    task 1 from task 0 with the task settings, the method and the snapshot steps; the recovery from task 1 and the
    control from pretraining, both with the recovery settings. The preset's name changes nothing."""
    from types import SimpleNamespace

    from forgetlab.experiments.biography import BiographyExperiment
    from forgetlab.experiments.presets import preset_config
    from forgetlab.utils.io import apply_overrides

    def keys(cfg) -> dict[str, str]:
        out = {}
        exp = object.__new__(BiographyExperiment)  # no world, no training: only the keys each phase asks the cache for
        exp.cfg, exp.n_tasks = cfg, 1
        exp._phase = lambda name, key, *args, **kw: out.__setitem__(name, key) or SimpleNamespace(model_dir=name)
        pre, pre_key = exp.pretrain()
        t0, k0 = exp.task0(pre, pre_key)
        t1, k1 = exp.new_task(1, t0, k0)
        exp.recovery(t1, k1)
        exp.recovery(pre, pre_key, name="recovery_control")
        return out

    base_cfg = preset_config("smoke")
    base = keys(base_cfg)
    assert len(set(base.values())) == 5 and keys(preset_config("smoke")) == base
    everything = set(base)
    cases = {  # setting -> the phases whose key must change; the others' keys must not
        "block_size=32": everything, "eval.max_questions=7": everything, "model.n_layers=3": everything,
        "seed=1": everything, "pretrain.lr=0.5": everything, "world.n_majors=12": everything,
        "task0.lr=0.5": {"task0", "task1", "recovery"},
        "task.lr=0.5": {"task1", "recovery"}, "method.replay=0.5": {"task1", "recovery"},
        "method.name=freeze": {"task1", "recovery"},
        "snapshot_steps=3": {"task1"},  # the recovery's key follows task 1's: not asserted either way
        "recovery.lr=0.5": {"recovery", "recovery_control"},
        "preset=other": set(),
    }
    for setting, changed in cases.items():
        new = keys(apply_overrides(base_cfg, [setting]))
        for phase in everything - ({"recovery"} if setting.startswith("snapshot_steps") else set()):
            assert (new[phase] != base[phase]) == (phase in changed), (setting, phase)


def test_recover_keys_its_cached_phase_by_the_checkpoints_weights_and_reads_before_from_the_run(tmp_path, monkeypatch):
    """``biography recover`` caches its re-alignment by the checkpoint's path, its weight files and the run's config:
    the same files give the same key (the cache is reused), weights rewritten in place give another (a retrained
    checkpoint at the same path is not handed the old one's recovery). ``before`` is the run's task0_before, and the
    spurious share (0.6 − 0.2) / (0.8 − 0.2) = 2/3 with the stand-in scores below."""
    from types import SimpleNamespace

    from forgetlab.experiments import recover
    from forgetlab.experiments.presets import preset_config
    from forgetlab.models.tokenizers import build_word_tokenizer
    from forgetlab.models.zoo import random_model, tiny_config
    from forgetlab.utils.io import atomic_write_json

    tok = build_word_tokenizer(["a", "b", "c"])
    ckpt, run = tmp_path / "ckpt", tmp_path / "run"
    random_model(tiny_config("llama", len(tok), n_layers=1), seed=0).save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    atomic_write_json(run / "config.json", preset_config("smoke"))
    atomic_write_json(run / "results.json", {"task0_before": 0.8, "task0_final": 0.3})
    keys = []

    class Experiment:  # the run's world and training stand in: only what recover_checkpoint asks of them
        def __init__(self, cfg, cache_dir, log, progress):
            self.tokenizer = tok

        def full_eval(self, model, tasks):
            return {"task0": {"em": 0.2}}

        def recovery(self, source, key):
            keys.append(key)
            return SimpleNamespace(info={"final": {"task0": {"em": 0.6}}, "steps": 9})

    monkeypatch.setattr(recover, "BiographyExperiment", Experiment)
    out = recover.recover_checkpoint(ckpt, run, out=tmp_path / "rec", log=lambda s: None)
    assert out == {"model": str(ckpt), "before": 0.8, "current": 0.2, "recovered": 0.6,
                   "spurious_share": pytest.approx(2 / 3), "recovery_steps": 9}
    assert json.loads((tmp_path / "rec" / "recovery.json").read_text())["before"] == 0.8
    recover.recover_checkpoint(ckpt, run, out=tmp_path / "rec", log=lambda s: None)
    time.sleep(0.01)  # a later modification time even on coarse clocks
    random_model(tiny_config("llama", len(tok), n_layers=1), seed=1).save_pretrained(ckpt)  # retrained in place
    recover.recover_checkpoint(ckpt, run, out=tmp_path / "rec", log=lambda s: None)
    assert keys[0] == keys[1] != keys[2]


def test_analyze_a_run_takes_its_own_checkpoints_and_world(smoke_run, tmp_path, monkeypatch):
    """``biography analyze`` on a run with task-1 snapshots at steps 2 and 4: the angles compare task 1 with task 0's
    update, the windows run task0 → step 2 → step 4 → task1, the landscape's plane goes through step 2 with
    d1 = step 4 − step 2 and d2 = end − step 4 (so those three project to (0, 0), (1, 0), (1, 1)), and the QA rows are
    those `biography generate` writes for the run's preset and seed. A run without snapshots skips what needs them."""
    from forgetlab.analysis import outputs
    from forgetlab.experiments.biography_analysis import analyze_biography_run

    root, _, _ = smoke_run
    run = root / "snap"
    proc = forgetlab("biography", "run", "--preset", "smoke", "--out", str(run), "--snapshot-steps", "2,4", "--no-progress",
                     cache=root / "cache")
    assert proc.returncode == 0, proc.stderr[-2000:]
    logs = []
    done = analyze_biography_run(run, grid=(3, 2), progress=False, log=logs.append)
    out, ckpt = run / "analysis", run / "checkpoints"
    assert set(done) == {"angles", "angles-over-training", "features", "landscape"}
    assert (done["angles"]["a1"], done["angles"]["a2"], done["angles"]["b2"]) == tuple(
        str(ckpt / n) for n in ("pretrain", "task0", "task1"))
    order = [str(ckpt / n) for n in ("task0", "task1-step-2", "task1-step-4", "task1")]
    assert [(w["b1"], w["b2"]) for w in done["angles-over-training"]["windows"]] == list(zip(order, order[1:]))
    assert list(done["features"]["pairs"]) == ["task0→task1-step-2", "task0→task1-step-4", "task0→task1"]
    land = done["landscape"]
    assert (land["theta0"], land["theta1"], land["theta2"]) == tuple(order[1:])
    coords = {p["checkpoint"]: (p["alpha"], p["beta"]) for p in land["trajectory"]}
    assert [c for c in coords] == order
    for name, point in zip(order[1:], [(0, 0), (1, 0), (1, 1)]):
        assert coords[name] == pytest.approx(point, abs=1e-5)
    for sub, files in (("angles", "angles.csv"), ("angles-over-training", "angles_over_training.png"),
                       ("features", "features.png"), ("landscape", "landscape.png")):
        assert (out / sub / files).stat().st_size > 0
    report = (out / "analysis.md").read_text()  # the numbers a person reads are the returned ones
    first = done["angles-over-training"]["windows"][0]["by_component"]
    assert f"| task0 → task1-step-2 | {first['embedding']['below_chance_deg']:.1f} |" in report
    end = land["trajectory"][-1]
    assert f"| task1 | {end['losses']['task0']:.3f} | {end['losses']['task1']:.3f} | 1.000 | 1.000 |" in report
    assert "drawn over α ∈ [-1.00, 7.00], β ∈ [-1.00, 12.00] (3 × 2 points)" in report
    settings = json.loads((out / "analysis.json").read_text())["settings"]
    assert settings["plane"] == [2, 4] and settings["snapshots"] == [2, 4]
    generated = forgetlab("biography", "generate", "--preset", "smoke", "--out", str(tmp_path / "w"), cache=tmp_path)
    assert generated.returncode == 0, generated.stderr[-2000:]
    for name in ("qa_task0_test.jsonl", "qa_task1.jsonl"):
        assert (out / "data" / name).read_text() == (tmp_path / "w" / name).read_text()

    # again: the QA files are written anew with the same rows, the finished landscape is only redrawn, and the angles
    # and features are kept as they are (no checkpoint loaded for them); the report reads the same
    logs.clear()
    monkeypatch.setattr(outputs, "load_checkpoint", lambda *a, **k: pytest.fail("a kept analysis loaded a checkpoint"))
    again = analyze_biography_run(run, grid=(3, 2), progress=False, log=logs.append)
    monkeypatch.undo()
    assert any("redrawing landscape.png only" in line for line in logs), logs
    assert sum("already holds this analysis" in line for line in logs) == 3, logs
    assert again["angles"] == json.loads((out / "angles" / "angles.json").read_text()) and again["features"]["pairs"] == \
        json.loads(json.dumps(done["features"]["pairs"]))
    assert (out / "analysis.md").read_text() == report
    # a checkpoint written anew (a later run into the same folder) is analysed again
    os.utime(ckpt / "task1" / "config.json")
    logs.clear()
    analyze_biography_run(run, grid=(3, 2), progress=False, log=logs.append)
    assert sum("already holds this analysis" in line for line in logs) == 0, logs
    # auto: the grid spans the whole trajectory (task 0 lies before the plane's origin) with a quarter to spare
    auto = analyze_biography_run(run, tmp_path / "auto", grid=(3, 2), landscape_range="auto", progress=False,
                                 log=logs.append)["landscape"]
    alphas = [p["alpha"] for p in auto["trajectory"]]
    spare = (max(alphas) - min(alphas)) / 4
    assert auto["alphas"][0] == pytest.approx(min(alphas) - spare) and auto["alphas"][-1] == pytest.approx(max(alphas) + spare)
    assert json.loads((tmp_path / "auto" / "analysis.json").read_text())["settings"]["landscape_range"] == "auto"
    with pytest.raises(ValueError, match="use paper or auto"):
        analyze_biography_run(run, tmp_path / "bad", landscape_range="wide", log=logs.append)
    with pytest.raises(ValueError, match="this run kept 2, 4"):
        analyze_biography_run(run, tmp_path / "bad", plane=(2, 9), log=logs.append)
    assert not (tmp_path / "bad").exists()
    plain = forgetlab("biography", "analyze", str(root / "run"), "--out", str(tmp_path / "plain"), "--no-progress",
                      cache=root / "cache")
    assert plain.returncode == 0, plain.stderr[-2000:]
    said = plain.stdout + plain.stderr
    assert "angles over training skipped" in said and "loss landscape skipped" in said
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == ["analysis.json", "analysis.md", "angles", "data", "features"]
