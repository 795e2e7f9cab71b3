"""``forgetlab fv extract`` / ``evaluate``: the real command and its files; bad input gives one error line."""

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from forgetlab.cli.main import app
from forgetlab.models.tokenizers import build_bpe_tokenizer
from forgetlab.models.zoo import random_model, tiny_config

WORDS = ("red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "fish", "bird", "car", "road", "hat", "cup", "pen",
         "box", "map", "key", "door", "lamp", "star", "rock", "leaf", "ship", "apple", "banana", "river", "mountain",
         "window", "garden")
N_LAYERS, N_HEADS = 2, 4
EXTRACT = ["--engine", "exact", "--n-prompts", "8", "--n-cie-prompts", "3", "--shots", "3", "--top-k", "4", "--no-progress"]


def forgetlab(*args):
    return subprocess.run([sys.executable, "-m", "forgetlab.cli", *map(str, args)], env=dict(os.environ),
                          capture_output=True, text=True, timeout=300)


def one_error_line(exit_code: int, stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert exit_code == 2, (exit_code, stderr)
    assert len(lines) == 1 and lines[0].startswith("forgetlab: error: "), stderr
    return lines[0]


def invoke(*args):
    result = CliRunner().invoke(app, ["fv", *map(str, args)])
    return result.exit_code, result.stderr


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A saved tiny random Llama with its BPE tokenizer, and a task file."""
    root = tmp_path_factory.mktemp("fv_cli")
    pairs = [{"input": w, "output": w.upper()} for w in WORDS]
    (root / "task.json").write_text(json.dumps(pairs))
    tokenizer = build_bpe_tokenizer([f"Q: {p['input']}\nA: {p['output']}\n\n" for p in pairs] * 4, vocab_size=330)
    model = random_model(tiny_config("llama", len(tokenizer), n_layers=N_LAYERS, n_heads=N_HEADS))
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    return root


@pytest.fixture(scope="module")
def extracted(files):
    proc = forgetlab("fv", "extract", "--model", files / "model", "--task", files / "task.json", "--out", files / "out",
                     *EXTRACT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return files, proc


def test_extract_writes_the_contract(extracted):
    root, proc = extracted
    out = root / "out"
    meta = json.loads((out / "fv.json").read_text())
    assert {"engine", "n_layers", "n_heads", "cie", "top_heads", "seconds"} <= set(meta)
    assert meta["engine"] == "exact" and meta["n_layers"] == N_LAYERS and meta["n_heads"] == N_HEADS
    assert len(meta["cie"]) == N_LAYERS and all(len(row) == N_HEADS for row in meta["cie"])
    assert len(meta["top_heads"]) == 4 and len({tuple(h) for h in meta["top_heads"]}) == 4
    assert all(0 <= l < N_LAYERS and 0 <= h < N_HEADS for l, h in meta["top_heads"])
    # the top heads are the largest mean CIEs, best first
    ranked = [meta["cie"][l][h] for l, h in meta["top_heads"]]
    rest = [meta["cie"][l][h] for l in range(N_LAYERS) for h in range(N_HEADS) if [l, h] not in meta["top_heads"]]
    assert ranked == sorted(ranked, reverse=True) and min(ranked) >= max(rest)
    assert meta["seconds"] >= 0 and meta["settings"]["shots"] == 3
    tensors = load_file(str(out / "fv.safetensors"))
    assert tuple(tensors["mean_activations"].shape) == (N_LAYERS, N_HEADS, 16)
    assert tuple(tensors["function_vector"].shape) == (64,)
    assert (out / "cie_heatmap.png").read_bytes()[:4] == b"\x89PNG"
    assert "wrote" in proc.stdout and proc.stderr.strip() == ""


def test_evaluate_writes_scores(extracted):
    root, _ = extracted
    proc = forgetlab("fv", "evaluate", "--model", root / "model", "--task", root / "task.json", "--fv", root / "out",
                     "--out", root / "eval", "--n-prompts", "5", "--shots", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((root / "eval" / "fv_eval.json").read_text())
    for key in ("zero_shot", "zero_shot_fv", "few_shot", "shuffled", "shuffled_fv"):
        assert 0.0 <= result[key]["top1"] <= 1.0 and 0.0 <= result[key]["string_match"] <= 1.0, key
    assert len(result["zero_shot_fv_top1_by_layer"]) == N_LAYERS
    assert all(0.0 <= x <= 1.0 for x in result["zero_shot_fv_top1_by_layer"])
    assert result["edit_layer"] in range(N_LAYERS) and result["fv"] == str(root / "out")
    assert (root / "eval" / "fv_layer_sweep.png").is_file()


def _extract_args(root, **change):
    args = {"--model": root / "model", "--task": root / "task.json", "--out": root / "bad_out", "--shots": 3,
            "--n-prompts": 4, "--n-cie-prompts": 2, "--top-k": 4}
    args.update(change)
    return [x for kv in args.items() for x in kv] + ["--no-progress"]


def test_missing_task_file(files):
    line = one_error_line(*invoke("extract", *_extract_args(files, **{"--task": files / "nope.json"})))
    assert "nope.json does not exist" in line
    assert not (files / "bad_out").exists()


def test_malformed_task_file(files):
    (files / "broken.json").write_text('[{"input": "a", "output": ')
    line = one_error_line(*invoke("extract", *_extract_args(files, **{"--task": files / "broken.json"})))
    assert "is not valid JSON" in line


def test_task_file_that_is_not_an_array(files):
    (files / "object.json").write_text('{"input": "a", "output": "b"}')
    assert "not an array" in one_error_line(*invoke("extract", *_extract_args(files, **{"--task": files / "object.json"})))


def test_too_few_examples_for_the_shots(files):
    line = one_error_line(*invoke("extract", *_extract_args(files, **{"--shots": 25})))
    assert "fewer than the 25 shots" in line and "--shots 21" in line  # queries come from valid: all 21 can be shown
    assert not (files / "bad_out").exists()


def test_top_k_larger_than_the_heads(files):
    line = one_error_line(*invoke("extract", *_extract_args(files, **{"--top-k": 9})))
    assert "top-k=9 is out of range: the model has 8 heads (2 layers x 4); choose 1..8" in line
    assert not (files / "bad_out").exists()


def test_unknown_engine(files):
    line = one_error_line(*invoke("extract", *_extract_args(files, **{"--engine": "fast"})))
    assert "unknown CIE engine 'fast'" in line


def test_missing_model_directory(files):
    line = one_error_line(*invoke("extract", *_extract_args(files, **{"--model": files / "no_model"})))
    assert "no_model is not a Hugging Face checkpoint directory (no config.json)" in line


def test_model_without_tokenizer(files):
    bare = files / "bare"
    bare.mkdir(exist_ok=True)
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((files / "model" / name).read_bytes())
    line = one_error_line(*invoke("extract", *_extract_args(files, **{"--model": bare})))
    assert "has no loadable tokenizer" in line


def test_model_with_corrupt_weights_or_an_unknown_dtype(files):
    """A truncated weights file (a copy that stopped half-way) is one line naming the model, not a traceback."""
    broken = files / "broken"
    broken.mkdir(exist_ok=True)
    for name in os.listdir(files / "model"):
        data = (files / "model" / name).read_bytes()
        (broken / name).write_bytes(data[: len(data) // 2] if name == "model.safetensors" else data)
    line = one_error_line(*invoke("extract", *_extract_args(files, **{"--model": broken})))
    assert f"--model {broken}: its weights cannot be loaded" in line
    line = one_error_line(*invoke("extract", *_extract_args(files), "--dtype", "float8"))
    assert "--dtype float8 is unknown; use auto, float32, bfloat16, float16" in line


def test_evaluate_layer_out_of_range(extracted):
    root, _ = extracted
    line = one_error_line(*invoke("evaluate", "--model", root / "model", "--task", root / "task.json", "--fv", root / "out",
                                  "--out", root / "bad_eval", "--n-prompts", "3", "--shots", "3", "--layer", "5"))
    assert "layer 5 is out of range; the model has layers 0..1" in line
    assert not (root / "bad_eval" / "fv_eval.json").exists()


def test_evaluate_without_an_extracted_vector(files):
    line = one_error_line(*invoke("evaluate", "--model", files / "model", "--task", files / "task.json", "--fv",
                                  files / "nothing", "--out", files / "bad_eval"))
    assert "holds no fv.json and fv.safetensors" in line


@pytest.mark.slow
def test_error_in_a_real_process_is_one_line(files):
    """Loading the model happens before this error: nothing else (warnings, progress) reaches stderr."""
    proc = forgetlab("fv", "extract", *_extract_args(files, **{"--top-k": 99}))
    assert "top-k=99 is out of range" in one_error_line(proc.returncode, proc.stderr)


def test_fv_from_another_model_is_refused(extracted, tmp_path):
    root, _ = extracted
    from forgetlab.models.tokenizers import build_bpe_tokenizer as bpe

    tokenizer = bpe([f"Q: {w}\nA: {w.upper()}\n\n" for w in WORDS] * 4, vocab_size=330)
    wider = random_model(tiny_config("llama", len(tokenizer), n_layers=3, n_heads=N_HEADS, d_model=32))
    wider.save_pretrained(tmp_path / "other")
    tokenizer.save_pretrained(tmp_path / "other")
    code, err = invoke("evaluate", "--model", tmp_path / "other", "--task", root / "task.json", "--fv", root / "out",
                       "--out", tmp_path / "eval")
    line = one_error_line(code, err)
    assert "extracted from a model with 2 layers" in line and "this model has 3" in line and "fv extract" in line
    assert not (tmp_path / "eval").exists()


def test_universal_heads_average_the_tasks_and_rebuild_each_fv(extracted, tmp_path):
    import numpy as np

    files, _ = extracted
    # a second task on the same model: reverse the words
    pairs = [{"input": w, "output": w[::-1]} for w in WORDS]
    (files / "task2.json").write_text(json.dumps(pairs))
    code, err = invoke("extract", "--model", files / "model", "--task", files / "task2.json", "--out", files / "out2", *EXTRACT)
    assert code == 0, err
    out = tmp_path / "uni"
    code, err = invoke("universal", files / "out", files / "out2", "--top-k", 3, "--model", files / "model", "--out", out)
    assert code == 0, err
    saved = json.loads((out / "universal.json").read_text())
    # independent: each task's CIE averaged over its prompts, then over the two tasks, ranked by numpy
    per_task = [load_file(d / "fv.safetensors")["cie_per_prompt"].numpy().mean(0) for d in (files / "out", files / "out2")]
    mean = (per_task[0] + per_task[1]) / 2
    order = np.argsort(-mean.flatten(), kind="stable")[:3]
    assert saved["heads"] == [[int(i) // N_HEADS, int(i) % N_HEADS] for i in order]
    assert np.allclose(saved["mean_cie"], mean, atol=1e-7) and (out / "universal_cie.png").is_file()
    vectors = load_file(out / "universal_fvs.safetensors")
    assert set(vectors) == set(saved["tasks"]) and vectors[saved["tasks"][0]].shape == (tiny_config("llama", 10).hidden_size,)
    # one task alone: its universal heads are its own top heads, so the rebuilt FV is the extracted one
    code, err = invoke("universal", files / "out", "--top-k", 4, "--model", files / "model", "--out", tmp_path / "one")
    assert code == 0, err
    own = json.loads((files / "out" / "fv.json").read_text())
    assert json.loads((tmp_path / "one" / "universal.json").read_text())["heads"] == own["top_heads"]
    rebuilt = load_file(tmp_path / "one" / "universal_fvs.safetensors")[own["task"]]
    assert np.allclose(rebuilt.numpy(), load_file(files / "out" / "fv.safetensors")["function_vector"].numpy(), atol=1e-5)
    assert "given twice" in one_error_line(*invoke("universal", files / "out", files / "out", "--out", tmp_path / "x"))
    import shutil

    shutil.copytree(files / "out2", tmp_path / "other")
    meta = json.loads((tmp_path / "other" / "fv.json").read_text())
    (tmp_path / "other" / "fv.json").write_text(json.dumps({**meta, "n_layers": 3}))  # as if from a deeper model
    assert "different shapes" in one_error_line(*invoke("universal", files / "out", tmp_path / "other", "--out", tmp_path / "x"))
    # a --model that is not a checkpoint: one line, and no empty --out left behind
    line = one_error_line(*invoke("universal", files / "out", "--top-k", 3, "--model", tmp_path / "nothing", "--out",
                                  tmp_path / "y"))
    assert "is not a Hugging Face checkpoint directory" in line and not (tmp_path / "y").exists()


def test_extract_does_not_replace_another_tasks_fv_without_overwrite(extracted):
    root, _ = extracted
    other = root / "other_task.json"
    other.write_text((root / "task.json").read_text())
    before = (root / "out" / "fv.json").read_text()
    line = one_error_line(*invoke("extract", *_extract_args(root, **{"--task": other, "--out": root / "out"})))
    assert "holds the FV of task task from" in line and "pass --overwrite to replace it" in line
    assert (root / "out" / "fv.json").read_text() == before
    result = CliRunner().invoke(app, ["fv", "extract", *map(str, _extract_args(root, **{"--task": other, "--out": root / "out_other"}))])
    assert result.exit_code == 0, result.output
    again = CliRunner().invoke(app, ["fv", "extract", *map(str, _extract_args(root, **{"--task": other, "--out": root / "out_other"}))])
    assert again.exit_code == 0, again.output  # the same task and model again refreshes it


@pytest.mark.parametrize("change, message", [
    (lambda meta: [meta], "(it holds a JSON list, not an object)"),
    (lambda meta: {}, "(no task, n_layers, n_heads, head_dim, top_heads, seconds, settings)"),
    (lambda meta: {k: v for k, v in meta.items() if k != "settings"}, "(no settings)"),
    (lambda meta: {**meta, "settings": {k: v for k, v in meta["settings"].items() if k != "prompt_format"}},
     "(settings is not an object with a prompt_format object)"),
    (lambda meta: {**meta, "settings": {**meta["settings"], "colour": "red"}}, "(unknown settings entries colour)"),
    (lambda meta: {**meta, "settings": {**meta["settings"], "prompt_format": {"sep": "x"}}},
     "(unknown settings.prompt_format entries sep)"),
    (lambda meta: {**meta, "n_layers": "2"}, "(task, n_layers, n_heads, head_dim, top_heads or seconds is not of the kind it "
                                            "writes)"),
])
def test_an_fv_json_that_extract_did_not_write_is_one_line(extracted, tmp_path, change, message):
    """An fv.json beside valid tensors that lacks an entry, or holds a setting this version does not know: one line
    naming the file, what is wrong and how to fix it (not a KeyError or TypeError traceback); nothing is written."""
    import shutil

    root, _ = extracted
    shutil.copytree(root / "out", tmp_path / "fv")
    meta = json.loads((tmp_path / "fv" / "fv.json").read_text())
    (tmp_path / "fv" / "fv.json").write_text(json.dumps(change(meta)))
    line = one_error_line(*invoke("evaluate", "--model", root / "model", "--task", root / "task.json", "--fv",
                                  tmp_path / "fv", "--out", tmp_path / "eval"))
    assert f"{tmp_path / 'fv' / 'fv.json'} is not an fv.json as `forgetlab fv extract` writes it {message}" in line
    assert f"run `forgetlab fv extract --out {tmp_path / 'fv'}` again" in line
    assert not (tmp_path / "eval").exists()
    line = one_error_line(*invoke("universal", tmp_path / "fv", "--out", tmp_path / "uni"))
    assert message in line and not (tmp_path / "uni").exists()


def test_an_fv_json_with_entries_load_does_not_read_still_loads(extracted, tmp_path):
    """Notes added beside what extract writes, and a setting absent (as in a file older than the setting), load."""
    import shutil

    from forgetlab.fv.extract import FunctionVectorResult, FVSettings

    root, _ = extracted
    shutil.copytree(root / "out", tmp_path / "fv")
    meta = json.loads((tmp_path / "fv" / "fv.json").read_text())
    del meta["settings"]["max_rows"]
    (tmp_path / "fv" / "fv.json").write_text(json.dumps({**meta, "note": "baseline"}))
    assert FunctionVectorResult.load(tmp_path / "fv").settings.max_rows == FVSettings().max_rows


def test_universal_never_leaves_another_runs_fvs_beside_its_json(extracted, tmp_path):
    """universal.json records the digest of the FVs it was written with (as fv.json does): a run without --model into
    the same --out removes the FVs of an earlier run, and FVs of another run beside a universal.json are refused."""
    import shutil

    import torch

    from forgetlab.fv.extract import load_universal_fvs

    root, _ = extracted
    out = tmp_path / "uni"
    code, err = invoke("universal", root / "out", "--top-k", 4, "--model", root / "model", "--out", out)
    assert code == 0, err
    saved = json.loads((out / "universal.json").read_text())
    assert len(saved["tensors_sha256"]) == 64
    vectors = load_universal_fvs(out)
    assert torch.equal(vectors["task"], load_file(out / "universal_fvs.safetensors")["task"])
    # another run's FVs (other heads) copied beside this universal.json: refused by the digest
    code, err = invoke("universal", root / "out", "--top-k", 2, "--model", root / "model", "--out", tmp_path / "other")
    assert code == 0, err
    shutil.copy(tmp_path / "other" / "universal_fvs.safetensors", out / "universal_fvs.safetensors")
    with pytest.raises(ValueError, match=r"universal_fvs.safetensors is not the file .*universal.json was saved with"):
        load_universal_fvs(out)
    # again without --model into the same --out: the old FVs go, and universal.json says there are none
    code, err = invoke("universal", root / "out", "--top-k", 3, "--out", out)
    assert code == 0, err
    assert {p.name for p in out.iterdir()} == {"universal.json", "universal_cie.png"}
    saved = json.loads((out / "universal.json").read_text())
    assert saved["tensors_sha256"] is None and saved["top_k"] == 3 and saved["model"] == ""
    with pytest.raises(FileNotFoundError, match="written without --model, so it has no FVs"):
        load_universal_fvs(out)


def test_a_corrupt_tensors_file_without_a_recorded_digest_is_one_line(extracted, tmp_path):
    """An fv.safetensors saved before its digest was recorded, then damaged: the digest cannot catch it, so reading
    it must (one line, not safetensors' own error); and extract into a folder whose fv.json is not an object does not
    crash on it."""
    import shutil

    root, _ = extracted
    shutil.copytree(root / "out", tmp_path / "fv")
    meta = json.loads((tmp_path / "fv" / "fv.json").read_text())
    del meta["tensors_sha256"]
    (tmp_path / "fv" / "fv.json").write_text(json.dumps(meta))
    (tmp_path / "fv" / "fv.safetensors").write_bytes(b"not a safetensors file")
    line = one_error_line(*invoke("evaluate", "--model", root / "model", "--task", root / "task.json", "--fv",
                                  tmp_path / "fv", "--out", tmp_path / "eval"))
    assert f"{tmp_path / 'fv'}/fv.safetensors cannot be read" in line and "again" in line
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "fv.json").write_text("[1, 2]")
    line = one_error_line(*invoke("extract", "--model", root / "model", "--task", root / "task.json", "--out",
                                  tmp_path / "odd"))
    assert f"--out {tmp_path / 'odd'} holds an fv.json that is not an FV's; pass --overwrite" in line
