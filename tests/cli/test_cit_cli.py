"""``forgetlab cit`` from the command line: a run and its analysis end to end (the output contract), and
bad input (one line, exit code 2, and no run directory left behind to block the corrected command)."""

import json

import numpy as np
import torch
import pytest
from typer.testing import CliRunner

from forgetlab.cli.main import app

SMALL = ["--max-train", "12", "--epochs", "1", "--lr", "1e-3", "--no-progress", "--set", "general_prompts=2",
         "--set", "max_new_tokens=3", "--set", "train.batch_size=4", "--set", "train.grad_accum=1"]


def cit(*args):
    return CliRunner().invoke(app, ["cit", *map(str, args)])


def one_error_line(result) -> str:
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert len(lines) == 1 and lines[0].startswith("forgetlab: error: "), result.stderr
    return lines[0]


@pytest.mark.slow
def test_run_and_analyze_from_the_command_line(icl_world_dir, tmp_path, monkeypatch):
    from forgetlab.train import distributed

    left = []  # a finished command takes the process group of a launched run down (a no-op in one process)
    monkeypatch.setattr(distributed, "leave", lambda: left.append("leave"))
    out = tmp_path / "run"
    result = cit("run", "--world", icl_world_dir, "--sequence", "0", "--method", "inclora", *SMALL, "--out", out)
    assert result.exit_code == 0, result.output
    assert left == ["leave"]
    results = json.loads((out / "results.json").read_text())
    assert {"method", "fvg", "initial", "final", "FP", "AP", "forget", "R"} <= set(results)
    assert results["method"] == "inclora" and results["fvg"] is False
    assert set(results["initial"]) >= {"GP", "IP"} and set(results["final"]) >= {"GP", "IP"}
    R = np.array(results["R"])
    assert R.shape == (6, 5) and results["AP"] == pytest.approx(np.diag(R[1:]).mean())
    assert results["FP"] == pytest.approx(R[-1].mean()) and f"AP={results['AP']:.1f}" in result.output
    config = json.loads((out / "config.json").read_text())  # every option and --set reached the run
    assert (config["n_train"], config["train"]["epochs"], config["train"]["lr"], config["general_prompts"]) == (12, 1.0, 1e-3, 2)
    assert (out / "report.md").is_file() and (out / "scores.png").is_file()
    assert len(json.loads((out / "environment.json").read_text())["runs"]) == 1  # one start, one entry

    analyzed = cit("analyze", out, "--prompts", "4", "--eval-prompts", "6", "--no-progress")
    assert analyzed.exit_code == 0, analyzed.output
    assert "it/s" not in analyzed.output and "[cit analyze] task-05" in analyzed.output  # no bars; the log stays
    drift = json.loads((out / "drift.json").read_text())
    assert set(drift["summary"]) == {"fv_cosine", "zero_shot_fv_cosine", "hidden_cosine", "icl_hidden_cosine", "param_distance"}
    for measure, fit in drift["summary"].items():
        assert f"{measure}: R² pooled {'-' if fit['pooled_r2'] is None else format(fit['pooled_r2'], '.2f')}," in analyzed.output
    assert (out / "interventions.json").is_file() and (out / "drift.md").is_file()
    assert "drift_tasks.png, interventions.json" in " ".join(analyzed.output.split())  # rich wraps long lines
    for option in ("--prompts", "--eval-prompts"):
        refused = cit("analyze", out, option, "0", "--out", out / "none")
        assert f"{option} 0 must be at least 1" in one_error_line(refused) and not (out / "none").exists()


def ni_file(path, n, definition="Always answer yes."):
    path.write_text(json.dumps({"Definition": [definition], "Positive Examples": [],
                                "Instances": [{"id": str(i), "input": f"question {i}", "output": ["yes"]} for i in range(n)]}))
    return path


def fv_of_another_model(out, like=None):
    """An FV saved by `forgetlab fv extract` from a 3-layer, 4-head random GPT-2 (the tiny Llama has 2 layers), or
    from a GPT-2 of the same sizes as the model in ``like``."""
    from transformers import AutoConfig

    from forgetlab.fv.extract import FunctionVectorResult, FVSettings
    from forgetlab.models.adapter import adapt
    from forgetlab.models.zoo import random_model, tiny_config

    if like is None:
        adapter = adapt(random_model(tiny_config("gpt2", 50)))
    else:
        sizes = AutoConfig.from_pretrained(like)
        adapter = adapt(random_model(tiny_config("gpt2", 50, n_layers=sizes.num_hidden_layers,
                                                 n_heads=sizes.num_attention_heads, d_model=sizes.hidden_size)))
    shape = (adapter.n_layers, adapter.n_heads, adapter.head_dim)
    FunctionVectorResult("good", FVSettings(top_k=1), *shape, torch.zeros(1, *shape[:2]), [(0, 0)], torch.zeros(shape),
                         torch.zeros(adapter.hidden_size), 0.0, architecture=adapter.architecture).save(out)


@pytest.mark.parametrize("case, message", [
    ("empty", "has no instances"),
    ("few", "has 50 instances, not more than the 100 held out"),
    ("jsonl", "unknown"),
    ("general", "the 5-shot prompts need 5"),
    ("lora", "lora_targets ['c_attn'] are not modules of this LlamaForCausalLM"),
    ("lora_block", "lora_targets ['mlp'] name LlamaMLP modules of this LlamaForCausalLM, which LoRA cannot adapt"),
    ("ni_field", "instance 3 has unknown field(s) 'label'; an instance holds id, input, output"),
    ("template", "--set template: template '{defintion} {input}' does not render (KeyError: 'defintion')"),
    ("model", "is not a Hugging Face checkpoint directory"),
    ("weights", "has no weights (model.safetensors or pytorch_model.bin)"),
    ("config", "config.json cannot be read"),
    ("method", "method"),
    ("fv_missing", "has no FV for task good"),
    ("fv_shape", "the FV of good in fvg_config.fv_dir was extracted from a model with 3 layers x 4 heads"),
    ("fv_class", "the FV of good in fvg_config.fv_dir was extracted from a GPT2LMHeadModel; this model is a LlamaForCausalLM"),
    ("fvg_rows", "--fvg cannot extract a function vector from 8 training rows of task 'good'"),
    ("fvg_layer", "fvg_config.layer=2 is out of range: the model has 2 layers"),
])
def test_bad_input_is_one_line_and_writes_nothing(case, message, tiny_llama_dir, tmp_path, monkeypatch):
    from forgetlab.train import distributed

    left = []  # a failed run does not take the process group down: its peers may be stuck in a collective
    monkeypatch.setattr(distributed, "leave", lambda: left.append("leave"))
    good = ni_file(tmp_path / "good.json", 120)
    args = {"--model": tiny_llama_dir, "--sequence": good, "--method": "seq"}
    extra = []
    if case == "empty":
        args["--sequence"] = ni_file(tmp_path / "empty.json", 0)
    elif case == "few":
        args["--sequence"] = f"{good},{ni_file(tmp_path / 'few.json', 50)}"
    elif case == "jsonl":
        (tmp_path / "bad.jsonl").write_text(json.dumps({"instruction": "x", "input": "y", "output": "z", "label": 1}) + "\n")
        args["--sequence"] = tmp_path / "bad.jsonl"
    elif case == "general":
        extra = ["--general", ni_file(tmp_path / "small_general.json", 103)]
    elif case == "lora":
        args["--method"], extra = "lora", ["--set", "lora_targets=[c_attn]"]
    elif case == "lora_block":  # a module of that name exists, but it is a block, not a layer PEFT can wrap
        args["--method"], extra = "lora", ["--set", "lora_targets=[mlp]"]
    elif case == "ni_field":
        data = json.loads(good.read_text())
        data["Instances"][3]["label"] = "yes"
        args["--sequence"] = tmp_path / "labelled.json"
        args["--sequence"].write_text(json.dumps(data))
    elif case == "template":
        extra = ["--set", "template={defintion} {input}"]
    elif case == "model":
        args["--model"] = tmp_path / "no-model"
    elif case in ("weights", "config"):  # a half-copied checkpoint: config but no weights, or a config that is not JSON
        import shutil

        args["--model"] = shutil.copytree(tiny_llama_dir, tmp_path / "broken")
        if case == "weights":
            for weights in args["--model"].glob("*.safetensors"):
                weights.unlink()
        else:
            (args["--model"] / "config.json").write_text("{not json")
    elif case == "method":
        args["--method"] = "qlora"
    elif case.startswith("fv_"):  # FVs from files: a task's FV absent, or extracted from another model's shape
        (tmp_path / "fvs").mkdir()
        if case == "fv_shape":
            fv_of_another_model(tmp_path / "fvs" / "good")
        elif case == "fv_class":  # every size the tiny Llama's: only the class tells (as Mistral-7B from Llama-2-7B)
            fv_of_another_model(tmp_path / "fvs" / "good", like=tiny_llama_dir)
        extra = ["--fvg", "--set", f"fvg_config.fv_dir={tmp_path / 'fvs'}"]
    elif case == "fvg_rows":  # too few training rows to split into demonstrations and queries for the FV
        extra = ["--fvg", "--max-train", "8"]
    elif case == "fvg_layer":
        extra = ["--fvg", "--set", "fvg_config.layer=2"]
    out = tmp_path / "run"
    line = one_error_line(cit("run", *[x for kv in args.items() for x in kv], *extra, "--no-progress", "--out", out))
    assert message in line
    assert not out.exists()  # nothing written: the corrected command can use the same --out
    assert left == []


def kill_processes_naming(text: str) -> None:
    """SIGKILL every process whose command line contains ``text`` (Linux /proc)."""
    import os
    import signal
    from pathlib import Path

    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if text in command and int(pid) != os.getpid():
                os.kill(int(pid), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            continue


@pytest.mark.slow
def test_two_processes_under_torchrun_write_one_run(icl_world_dir, tmp_path, torchrun):
    """``torchrun --nproc_per_node 2 -m forgetlab cit run`` (gloo on CPUs): one run directory, written once, whose
    model is the one a single process trains (LoRA dropout off, so both draw the same computation); killed and
    resumed, the same model bit for bit; an odd batch size is refused before anything is written; other commands
    refuse to run under the launcher."""
    import subprocess

    from safetensors.torch import load_file

    args = ["-m", "forgetlab", "cit", "run", "--world", str(icl_world_dir), "--sequence", "0", "--method", "inclora",
            *SMALL, "--set", "lora_dropout=0", "--set", "n_train=8"]
    proc = torchrun(*args, "--out", tmp_path / "two")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("AP=") == 1  # the summary is printed once
    assert cit(*args[3:], "--out", tmp_path / "one").exit_code == 0
    one, two = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("one", "two"))
    assert np.array(two["R"]).shape == np.array(one["R"]).shape
    assert two["initial"] == one["initial"]  # general tasks scored in shares by the two processes, gathered
    w_one, w_two = (load_file(tmp_path / name / "model" / "model.safetensors") for name in ("one", "two"))
    for key, value in w_one.items():
        torch.testing.assert_close(w_two[key], value, rtol=1e-4, atol=1e-5)
    assert not (tmp_path / "two" / "state").exists() and (tmp_path / "two" / "checkpoints").is_dir()
    # killed after its second task and resumed, still on two processes: the same model as the uninterrupted run
    import time

    killed = subprocess.Popen([*torchrun.prefix, *args, "--out", str(tmp_path / "killed")], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env=torchrun.env())
    state = tmp_path / "killed" / "state" / "between-phases" / "state.json"
    deadline = time.time() + 300
    while time.time() < deadline and killed.poll() is None and not (state.is_file() and '"completed": 2' in state.read_text()):
        time.sleep(0.05)
    kill_processes_naming(str(tmp_path / "killed"))  # torchrun and its workers (in their own process groups)
    killed.wait()
    time.sleep(1)
    assert not (tmp_path / "killed" / "results.json").exists(), "the run finished before it could be killed"
    resumed = torchrun(*args, "--out", tmp_path / "killed", "--resume")
    assert resumed.returncode == 0 and "resuming after task 2/5" in resumed.stdout + resumed.stderr, resumed.stderr[-3000:]
    w_resumed = load_file(tmp_path / "killed" / "model" / "model.safetensors")
    assert all(torch.equal(w_resumed[k], w_two[k]) for k in w_two)
    odd = torchrun(*args, "--set", "train.batch_size=3", "--out", tmp_path / "odd", timeout=300)
    assert odd.returncode != 0 and not (tmp_path / "odd").exists()
    assert odd.stderr.count("train.batch_size=3 does not split over 2 processes") == 1
    refused = torchrun("-m", "forgetlab", "cit", "analyze", tmp_path / "two", timeout=300)
    assert refused.returncode != 0 and "`forgetlab cit analyze` runs in one process" in refused.stderr


def test_analyze_names_a_directory_of_another_command(tmp_path):
    from forgetlab.experiments.presets import preset_config
    from forgetlab.utils.io import atomic_write_json

    atomic_write_json(tmp_path / "config.json", preset_config("smoke"))  # a biography run's config
    (tmp_path / "results.json").write_text("{}")
    line = one_error_line(cit("analyze", tmp_path))
    assert f"{tmp_path} is not a `forgetlab cit run` directory (its config.json is another command's)" in line


def test_a_model_of_another_vocabulary_is_refused_on_a_world(icl_world_dir, tiny_llama_dir, tmp_path):
    out = tmp_path / "run"
    line = one_error_line(cit("run", "--world", icl_world_dir, "--model", tiny_llama_dir, "--sequence", "0", *SMALL,
                              "--out", out))
    assert f"--model {tiny_llama_dir} has another vocabulary" in line and not out.exists()
