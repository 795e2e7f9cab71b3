"""Continual instruction tuning end to end: the ICL world (full, LoRA, IncLoRA) and NI task files."""

import json
from dataclasses import replace

import numpy as np
import pytest
from safetensors.torch import load_file

from forgetlab.experiments.cit import CITConfig, run_cit, summarize
from forgetlab.experiments.icl_world import build_icl_world, preset_config
from forgetlab.models.tokenizers import build_bpe_tokenizer
from forgetlab.models.zoo import random_model, tiny_config
from forgetlab.worlds.instructions import InstructionTask


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("icl")
    build_icl_world(replace(preset_config("smoke"), eval_prompts=2), out, log=lambda s: None, progress=False)
    return out


def small(world_dir, **kw):
    base = CITConfig(world_dir=str(world_dir), sequence="0", n_train=12, general_prompts=2, max_new_tokens=3)
    return replace(base, train=replace(base.train, epochs=1, batch_size=4, grad_accum=1, lr=1e-3), **kw)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["seq", "lora", "inclora"])
def test_world_sequence_runs_and_lora_touches_only_its_targets(world_dir, tmp_path, method):
    cfg = small(world_dir, method=method)
    results = run_cit(cfg, tmp_path, log=lambda s: None, progress=False)
    R = np.array(results["R"])
    assert R.shape == (6, 5) and ((R >= 0) & (R <= 100)).all()
    assert results["AP"] == pytest.approx(np.mean(np.diag(R[1:])))
    assert results["FP"] == pytest.approx(R[-1].mean())
    assert results["forget"] == pytest.approx(results["AP"] - results["FP"])
    assert 0 <= results["final"]["GP"] <= 100 and results["fvg"] is False
    assert results["GP_drop"] == pytest.approx(results["initial"]["GP"] - results["final"]["GP"])
    assert (tmp_path / "scores.png").is_file() and json.loads((tmp_path / "results.json").read_text())["method"] == method
    before, after = load_file(world_dir / "model" / "model.safetensors"), load_file(tmp_path / "model" / "model.safetensors")
    changed = {k for k in before if not (before[k] == after[k]).all()}
    if method == "seq":
        assert any("mlp" in k for k in changed)
    else:  # LoRA on q_proj and v_proj, merged: nothing else moved
        assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)


def test_summary_of_a_hand_matrix():
    tasks = [InstructionTask("a", "d", ()), InstructionTask("b", "d", ())]
    R = [[10.0, 0.0], [80.0, 5.0], [50.0, 90.0]]
    general = [{"gp": 70.0, "ip": 60.0}, {"gp": 65.0, "ip": 58.0}, {"gp": 40.0, "ip": 50.0}]
    out = summarize(CITConfig(world_dir="x"), tasks, R, general)
    assert out["AP"] == pytest.approx(85.0) and out["FP"] == pytest.approx(70.0) and out["forget"] == pytest.approx(15.0)
    assert out["initial"] == {"GP": 70.0, "IP": 60.0} and out["final"] == {"GP": 40.0, "IP": 50.0}
    assert out["GP_drop"] == pytest.approx(30.0) and out["IP_drop"] == pytest.approx(10.0)
    assert out["bwt_gem"] == pytest.approx(-30.0)


def test_ni_files_run_with_any_model(tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for name, word in (("task001_yes", "yes"), ("task002_no", "no")):
        data = {"Definition": [f"Always answer {word}."], "Positive Examples": [],
                "Instances": [{"id": str(i), "input": f"question {i}", "output": [word]} for i in range(30)]}
        (tasks / f"{name}.json").write_text(json.dumps(data))
    tok = build_bpe_tokenizer(["Definition: Always answer yes. Now complete the following example - Input: question 1 Output: yes"] * 20,
                              vocab_size=300)
    cfg = tiny_config("llama", len(tok), n_layers=2)
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    random_model(cfg).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    base = CITConfig(model=str(tmp_path / "model"), tasks_dir=str(tasks), sequence="task001_yes,task002_no", n_train=8,
                     n_test=10, max_new_tokens=2, method="lora")
    cfg_run = replace(base, train=replace(base.train, epochs=1, batch_size=4, grad_accum=1), lora_targets=("q_proj", "v_proj"))
    results = run_cit(cfg_run, tmp_path / "run", log=lambda s: None, progress=False)
    files = replace(cfg_run, tasks_dir="", sequence=f"{tasks / 'task002_no.json'},{tasks / 'task001_yes.json'}", method="seq")
    assert run_cit(files, tmp_path / "run2", log=lambda s: None, progress=False)["tasks"] == ["task002_no", "task001_yes"]
    assert results["tasks"] == ["task001_yes", "task002_no"] and "initial" not in results
    assert np.array(results["R"]).shape == (3, 2)


def test_bad_configs_name_the_problem(world_dir):
    with pytest.raises(ValueError, match="method"):
        small(world_dir, method="qlora").validate()
    with pytest.raises(ValueError, match="--world"):
        CITConfig().validate()
    with pytest.raises(ValueError, match="numbered"):
        run_cit(small(world_dir, sequence="NI-Seq-G1"), world_dir / "x", log=lambda s: None)


@pytest.mark.slow
def test_fvg_terms_change_training_only_when_weighted_and_only_trainable_weights(world_dir, tmp_path):
    from forgetlab.methods.fvg import FVGConfig

    base = small(world_dir, method="inclora")
    plain = run_cit(base, tmp_path / "plain", log=lambda s: None, progress=False)
    zero = run_cit(replace(base, fvg=True, fvg_config=FVGConfig(alpha_fv=0.0, alpha_kl=0.0, n_prompts=4, shots=3)),
                   tmp_path / "zero", log=lambda s: None, progress=False)
    assert zero["fvg"] is True and zero["R"] == plain["R"] and zero["final"] == plain["final"]
    weighted = run_cit(replace(base, fvg=True, fvg_config=FVGConfig(alpha_fv=5.0, alpha_kl=50.0, n_prompts=4, shots=3)),
                       tmp_path / "fvg", log=lambda s: None, progress=False)
    w_plain = load_file(tmp_path / "plain" / "model" / "model.safetensors")
    w_fvg = load_file(tmp_path / "fvg" / "model" / "model.safetensors")
    w_start = load_file(world_dir / "model" / "model.safetensors")
    assert any(not (w_plain[k] == w_fvg[k]).all() for k in w_plain)  # the terms moved the weights
    moved = {k for k in w_start if not (w_start[k] == w_fvg[k]).all()}
    assert moved and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in moved)  # only LoRA targets trained
    assert weighted["fvg"] is True


@pytest.mark.slow
def test_replay_and_ewc_baselines(world_dir, tmp_path):
    logs = []
    base = small(world_dir)
    run_cit(replace(base, method="replay", replay=1.0), tmp_path / "replay", log=logs.append, progress=False)
    steps = [int(line.split("(")[1].split()[0]) for line in logs if line.startswith("[cit] after")]
    assert steps[1] > steps[0]  # task 2 trains on its rows plus as many replayed rows of task 1
    weights = {}
    for label, method, strength in (("seq", "seq", 0.0), ("ewc0", "ewc", 0.0), ("ewc", "ewc", 1e3)):
        run_cit(replace(base, method=method, ewc_strength=strength), tmp_path / label, log=lambda s: None, progress=False)
        weights[label] = load_file(tmp_path / label / "model" / "model.safetensors")
    same = lambda a, b: all((weights[a][k] == weights[b][k]).all() for k in weights[a])  # noqa: E731
    assert same("seq", "ewc0")       # a zero-weight penalty leaves training exactly as plain fine-tuning
    assert not same("seq", "ewc")    # the Fisher penalty changes the updates from task 2 on
