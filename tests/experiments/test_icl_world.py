"""The ICL-world build: episode tokens, the corpus labels, and the smoke build end to end."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from forgetlab.experiments.icl_world import (ICLCorpusConfig, episode_tokens, pretraining_data, preset_config,
                                             world_tokenizer)
from forgetlab.fv.prompts import encode_prompt
from forgetlab.fv.tasks import ICLPrompt, PromptFormat
from forgetlab.train.data import IGNORE
from forgetlab.worlds.icl import generate_icl_world

KINDS = ["ten_shot", "zero_shot_instruction", "zero_shot_bare", "shuffled_ten_shot", "fv_zero_shot", "fv_shuffled_ten_shot"]


@pytest.fixture(scope="module")
def small():
    cfg = preset_config("smoke")
    world = generate_icl_world(cfg.world)
    return cfg, world, world_tokenizer(world)


def test_episode_ids_equal_the_tokenized_prompt_text(small):
    cfg, world, tok = small
    task = world.task("pick_first")
    pairs = list(task.pairs[:3])
    ids, mask = episode_tokens(task, pairs, tok.get_vocab(), instruction=True, label_first=True)
    prompt = ICLPrompt(tuple(pairs[:2]), pairs[2][0], pairs[2][1], task.instruction)
    prompt_ids, target, _ = encode_prompt(tok, prompt, PromptFormat())
    assert ids[:len(prompt_ids)] == prompt_ids            # evaluation prompts are exactly the training text
    assert ids[len(prompt_ids)] == target
    labelled = [tok.convert_ids_to_tokens(i) for i, m in zip(ids, mask) if m]
    assert labelled == [w for _, y in pairs for w in (*y.split(), "\n")]


def test_icl_episodes_do_not_label_the_first_answer(small):
    cfg, world, tok = small
    task = world.task("add_1")
    ids, mask = episode_tokens(task, list(task.pairs[:2]), tok.get_vocab(), instruction=False, label_first=False)
    labelled = [tok.convert_ids_to_tokens(i) for i, m in zip(ids, mask) if m]
    assert labelled == [task.pairs[1][1], "\n"]


def test_corpus_rows_and_labels(small):
    cfg, world, tok = small
    data = pretraining_data(world, tok, ICLCorpusConfig(block_size=64), 5000, seed=0)
    assert data.input_ids.shape[1] == 64 and data.input_ids.numel() <= 5000 + 64
    on = data.labels != IGNORE
    assert 0.05 < on.float().mean() < 0.5
    assert torch.equal(data.labels[on], data.input_ids[on])
    test_pairs = {p for t in world.role("general") if t.family == "list" for p in t.splits(world.config.seed).test}
    text = " ".join(tok.convert_ids_to_tokens(data.input_ids.flatten().tolist()))
    for x, y in test_pairs:  # held-out list pairs never appear as Q/A pairs
        assert f"Q : {x} \n A : {y}" not in text


@pytest.mark.slow
def test_smoke_build_end_to_end(tmp_path):
    out = tmp_path / "icl"
    proc = subprocess.run([sys.executable, "-m", "forgetlab.cli", "icl-world", "build", "--preset", "smoke", "--out", str(out),
                           "--no-progress"], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    tok = AutoTokenizer.from_pretrained(out / "model")
    assert model.config.num_hidden_layers == 2 and tok.pad_token and tok.eos_token
    card = json.loads((out / "model" / "forgetlab_card.json").read_text())
    assert card["config"]["preset"] == "smoke" and card["training_tokens"] > 0
    world = json.loads((out / "world.json").read_text())
    assert {"tasks", "sequences", "config"} <= set(world) and world["tasks"][0]["splits"]["train"]
    results = json.loads((out / "eval.json").read_text())
    general = [t["name"] for t in world["tasks"] if t["role"] == "general"]
    assert sorted(results["tasks"]) == sorted(general)
    for scores in [*results["tasks"].values(), results["mean"]]:
        for kind in KINDS:
            assert 0.0 <= scores[kind] <= 1.0
    assert (out / "fv" / general[0] / "fv.json").is_file()
    new = results["new_tasks_zero_shot_instruction"]
    assert sorted(new) == sorted(t["name"] for t in world["tasks"] if t["role"] == "new")
    assert all(0.0 <= v <= 1.0 for v in new.values())
    assert results["sequences_known"] == [[n for n in seq if new[n] >= 0.9] for seq in world["sequences"]]
    again = subprocess.run([sys.executable, "-m", "forgetlab.cli", "icl-world", "build", "--preset", "smoke", "--out", str(out)],
                           capture_output=True, text=True)
    assert again.returncode == 2 and "already exists" in again.stderr
    # the training state is gone once eval.json is written; resuming the finished build trains and scores nothing
    assert not (out / "state").exists() and not (out / "state.finished").exists()
    weights = (out / "model" / "model.safetensors").stat().st_mtime_ns
    resumed = subprocess.run([sys.executable, "-m", "forgetlab.cli", "icl-world", "build", "--preset", "smoke", "--out",
                              str(out), "--resume", "--no-progress"], capture_output=True, text=True)
    assert resumed.returncode == 0 and "finished build of this config; nothing to do" in resumed.stderr + resumed.stdout
    assert json.loads((out / "eval.json").read_text()) == results
    assert (out / "model" / "model.safetensors").stat().st_mtime_ns == weights
    older = {**world, "tasks": [t for t in world["tasks"] if not t["name"].startswith("coded_")]}
    (out / "world.json").write_text(json.dumps(older))  # as a build from before the coded tasks wrote it
    rescored = subprocess.run([sys.executable, "-m", "forgetlab.cli", "icl-world", "evaluate", "--out", str(out), "--no-progress"],
                              capture_output=True, text=True)
    assert rescored.returncode == 0, rescored.stderr[-2000:]
    n_coded = len(world["tasks"]) - len(older["tasks"])
    assert json.loads((out / "world.json").read_text()) == world and f"added {n_coded} coded tasks" in rescored.stdout
    second = json.loads((out / "eval.json").read_text())
    assert second["new_tasks_zero_shot_instruction"] == new  # the coded tasks scored again, the same
    assert second["mean"] == results["mean"] and second["preset"] == "smoke"  # deterministic on the same machine
    task = next(iter(second["tasks"].values()))
    assert task["fv_zero_shot_alpha"] in (1.0, 2.0, 4.0, 8.0) and 0 <= task["fv_zero_shot_layer"] < 2


@pytest.mark.slow
def test_same_seed_same_model_and_metrics(tmp_path):
    """Reproducible from the seed: two builds give identical weights and identical eval.json means on CPU."""
    from dataclasses import replace

    from safetensors.torch import load_file

    from forgetlab.experiments.icl_world import build_icl_world, preset_config

    cfg = preset_config("smoke")
    cfg = replace(cfg, train=replace(cfg.train, max_steps=12, checkpoint_every=6), eval_prompts=3)
    runs = [build_icl_world(cfg, tmp_path / name, log=lambda s: None, progress=False) for name in ("a", "b")]
    assert runs[0]["mean"] == runs[1]["mean"]
    a, b = (load_file(tmp_path / name / "model" / "model.safetensors") for name in ("a", "b"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


@pytest.mark.parametrize("change, message", [
    ({"preset": "huge"}, "unknown icl-world preset 'huge'"),
    ({"corpus": {"instruction_fraction": 1.5}}, "corpus.instruction_fraction=1.5 must be in [0, 1]"),
    ({"corpus": {"max_shots": 0}}, "corpus.max_shots must be >= 1"),
    ({"corpus": {"block_size": 16}}, "corpus.block_size >= 32"),
])
def test_bad_build_settings_name_the_setting(change, message):
    import re
    from dataclasses import replace

    cfg = preset_config("smoke")
    if "corpus" in change:
        cfg = replace(cfg, corpus=replace(cfg.corpus, **change["corpus"]))
    else:
        cfg = replace(cfg, **change)
    with pytest.raises(ValueError, match=re.escape(message)):
        cfg.validate()


def test_reevaluate_names_a_directory_that_is_not_a_build(tmp_path):
    from forgetlab.experiments.icl_world import reevaluate

    with pytest.raises(FileNotFoundError, match="is not an icl-world build"):
        reevaluate(tmp_path)


def test_summary_means_and_gap_recovered_by_hand():
    """Means per group, split by the *world's* shared_inputs flag, and the FV's share of the ten-shot-over-bare gap,
    over tasks whose gap exceeds 0.05 only (a smaller or negative gap would divide by ~0 and swamp the mean)."""
    from forgetlab.experiments.icl_world import summarize
    from forgetlab.worlds.icl import ICLWorld, ICLWorldConfig, WorldTask

    def scores(ten, bare, fv, instr, shuffled, fv_shuffled):
        return {"family": "lookup", "ten_shot": ten, "zero_shot_instruction": instr, "zero_shot_bare": bare,
                "shuffled_ten_shot": shuffled, "fv_zero_shot": fv, "fv_zero_shot_layer": 1, "fv_zero_shot_alpha": 4.0,
                "fv_shuffled_ten_shot": fv_shuffled, "fv_shuffled_ten_shot_layer": 0, "fv_shuffled_ten_shot_alpha": 2.0}

    per_task = {"a": scores(0.9, 0.1, 0.5, 0.7, 0.4, 0.6),    # shared; gap 0.8, recovered 0.4 / 0.8 = 0.5
                "b": scores(0.3, 0.28, 0.9, 0.1, 0.2, 0.0),   # shared; gap 0.02: left out (else 31)
                "c": scores(0.6, 0.2, 0.3, 0.5, 0.6, 0.2),    # own; gap 0.4, recovered 0.1 / 0.4 = 0.25
                "d": scores(0.2, 0.4, 0.6, 0.3, 0.2, 0.4)}    # own; gap -0.2: left out (else -1)
    tasks = [WorldTask(name, "lookup", "general", "Do it .", (("x", "y"),), shared_inputs=name in "ab")
             for name in "abcd"]
    # per_task's own "shared_inputs" would say the opposite: the world decides the groups
    for name in per_task:
        per_task[name]["shared_inputs"] = name not in "ab"
    out = summarize(per_task, ICLWorld(ICLWorldConfig(), tasks, []))
    assert set(out) == {"mean", "mean_shared_inputs", "mean_own_inputs"}
    kinds = ["ten_shot", "zero_shot_instruction", "zero_shot_bare", "shuffled_ten_shot", "fv_zero_shot",
             "fv_shuffled_ten_shot"]
    for group in out.values():   # layers (ints), alphas and labels are not averaged
        assert set(group) == {*kinds, "fv_gap_recovered"}
    approx = pytest.approx
    assert out["mean"]["ten_shot"] == approx((0.9 + 0.3 + 0.6 + 0.2) / 4)
    assert out["mean"]["fv_zero_shot"] == approx((0.5 + 0.9 + 0.3 + 0.6) / 4)
    assert out["mean"]["fv_shuffled_ten_shot"] == approx((0.6 + 0.0 + 0.2 + 0.4) / 4)
    assert out["mean_shared_inputs"]["zero_shot_bare"] == approx((0.1 + 0.28) / 2)
    assert out["mean_own_inputs"]["zero_shot_instruction"] == approx((0.5 + 0.3) / 2)
    assert out["mean_own_inputs"]["shuffled_ten_shot"] == approx((0.6 + 0.2) / 2)
    assert out["mean"]["fv_gap_recovered"] == approx((0.5 + 0.25) / 2)
    assert out["mean_shared_inputs"]["fv_gap_recovered"] == approx(0.5)
    assert out["mean_own_inputs"]["fv_gap_recovered"] == approx(0.25)
    # no task in a group with a gap to recover: None, not a mean over nothing
    only_small = summarize({"b": per_task["b"], "c": per_task["c"]}, ICLWorld(ICLWorldConfig(), tasks, []))
    assert only_small["mean_shared_inputs"]["fv_gap_recovered"] is None
    assert only_small["mean"]["fv_gap_recovered"] == approx(0.25)


def test_fv_layer_and_scale_are_chosen_on_valid_queries_and_scored_on_test_queries(monkeypatch, small):
    """The scorer is stubbed to record which prompts it sees: the (scale, layer) grid is swept on valid-split
    queries only, its best cell is the one applied, and that run scores the test-split prompts of ``icl_prompts``."""
    import contextlib
    from types import SimpleNamespace

    import forgetlab.experiments.icl_world as iw
    from forgetlab.eval.icl import icl_prompts

    cfg, world, tok = small
    task = world.task("pick_first")
    splits = task.splits(cfg.world.seed)
    valid, test = {x for x, _ in splits.valid}, {x for x, _ in splits.test}
    assert valid and test and not valid & test
    swept, scored, active = [], [], []
    # accuracy per (alpha, layer); the best cell differs between the two prompt kinds
    best = {"bare": (4.0, 1), "shuffled": (1.0, 0)}

    def fake_sweep(adapter, batch_list, vector, layers, alpha):
        prompts = [p for b in batch_list for p in b]
        kind = "shuffled" if prompts[0].demos else "bare"
        swept.append((kind, prompts))
        return [0.9 if (alpha, l) == best[kind] else 0.1 + 0.01 * l for l in layers]

    @contextlib.contextmanager
    def fake_add(adapter, vector, layer, alpha):
        active.append((alpha, layer))
        yield
        active.pop()

    def fake_accuracy(adapter, tokenizer, prompts):
        scored.append((active[-1], list(prompts)))
        return 0.25

    monkeypatch.setattr(iw, "extract_function_vector",
                        lambda *a, **k: SimpleNamespace(vector=torch.zeros(4), top_heads=[(0, 1)]))
    monkeypatch.setattr(iw, "batches", lambda tokenizer, prompts, fmt, size, device: iter([list(prompts)]))
    monkeypatch.setattr(iw, "sweep_layers", fake_sweep)
    monkeypatch.setattr(iw, "add_to_residual", fake_add)
    monkeypatch.setattr(iw, "accuracy", fake_accuracy)
    adapter = SimpleNamespace(n_layers=3, model=torch.nn.Linear(1, 1))
    out = iw.fv_scores(adapter, tok, task, cfg, None)

    assert len(swept) == 2 * len(cfg.fv_alphas)                       # every scale, for each prompt kind
    for kind, prompts in swept:
        assert len(prompts) == cfg.eval_prompts and {p.query for p in prompts} <= valid, kind
        assert all(len(p.demos) == (cfg.fv.shots if kind == "shuffled" else 0) for p in prompts)
    assert (out["fv_zero_shot_alpha"], out["fv_zero_shot_layer"]) == (4.0, 1)
    assert (out["fv_shuffled_ten_shot_alpha"], out["fv_shuffled_ten_shot_layer"]) == (1.0, 0)
    assert out["fv_zero_shot"] == out["fv_shuffled_ten_shot"] == 0.25
    expected = icl_prompts(task.as_icl_task(), cfg.eval_prompts, cfg.fv.shots, cfg.seed, cfg.world.seed)
    assert scored == [((4.0, 1), expected["zero_shot_bare"]), ((1.0, 0), expected["shuffled_ten_shot"])]
    assert all(p.query in test for _, prompts in scored for p in prompts)
    assert out["fv_zero_shot_valid_by_alpha_layer"]["4.0"] == pytest.approx([0.1, 0.9, 0.12])
