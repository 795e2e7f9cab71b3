"""The extract / evaluate API: each output recomputed independently, the saved files, bad settings."""

import json
import shutil
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from forgetlab.fv.cie import causal_indirect_effect, mean_head_activations
from forgetlab.fv.evaluate import FVEvalSettings, evaluate_function_vector, first_token_correct
from forgetlab.fv.extract import FunctionVectorResult, FVSettings, extract_function_vector
from forgetlab.fv.hooks import add_to_residual
from forgetlab.fv.prompts import batches
from forgetlab.fv.tasks import ICLTask, PromptFormat, counterfactuals, sample_prompts
from forgetlab.fv.vectors import function_vector

SETTINGS = FVSettings(engine="exact", n_prompts=8, n_cie_prompts=3, shots=3, top_k=4, seed=0, batch_size=4)


@pytest.fixture(scope="module")
def extracted(make_adapter, bpe_tokenizer, upper_task):
    a = make_adapter("llama", init_range=0.2, vocab=len(bpe_tokenizer))
    return a, extract_function_vector(a, bpe_tokenizer, upper_task, SETTINGS, model_name="tiny")


def test_extract_recomputes_independently(extracted, bpe_tokenizer, upper_task):
    a, r = extracted
    fmt = PromptFormat()
    splits = upper_task.splits(SETTINGS.seed)
    clean = sample_prompts(splits, 8, shots=3, seed=0)
    mean = mean_head_activations(a, batches(bpe_tokenizer, clean, fmt, 8))
    torch.testing.assert_close(r.mean_activations, mean, rtol=1e-4, atol=1e-6)
    cf = counterfactuals(sample_prompts(splits, 3, shots=3, seed=1), seed=0)
    naive = causal_indirect_effect(a, list(batches(bpe_tokenizer, cf, fmt, 3)), mean, engine="naive")
    assert r.cie_per_prompt.shape == (3, a.n_layers, a.n_heads)
    assert (r.cie_per_prompt - naive).abs().max() <= 1e-5
    assert r.cie.shape == (a.n_layers, a.n_heads) and torch.allclose(r.cie, naive.mean(0), atol=1e-5)
    # top heads: the 4 largest mean CIEs, best first
    flat = sorted(((float(r.cie[l, h]), (l, h)) for l in range(a.n_layers) for h in range(a.n_heads)), reverse=True)
    assert r.top_heads == [head for _, head in flat[:4]]
    torch.testing.assert_close(r.vector, function_vector(a, r.mean_activations, r.top_heads))
    assert r.vector.shape == (a.hidden_size,) and r.vector.abs().max() > 0
    assert (r.task, r.model, r.n_layers, r.n_heads, r.head_dim) == ("upper", "tiny", 3, 4, 16)
    assert r.seconds > 0


def test_engines_agree_through_the_api(extracted, bpe_tokenizer, upper_task):
    a, exact = extracted
    naive = extract_function_vector(a, bpe_tokenizer, upper_task, replace(SETTINGS, engine="naive"))
    assert (naive.cie_per_prompt - exact.cie_per_prompt).abs().max() <= 1e-5
    assert naive.top_heads == exact.top_heads
    attribution = extract_function_vector(a, bpe_tokenizer, upper_task, replace(SETTINGS, engine="attribution"))
    assert attribution.cie_per_prompt.shape == exact.cie_per_prompt.shape
    assert torch.equal(attribution.mean_activations, exact.mean_activations)


def test_save_and_load_round_trip(extracted, tmp_path):
    _, r = extracted
    r.save(tmp_path / "out")
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} == {"fv.json", "fv.safetensors", "cie_heatmap.png"}
    assert (out / "cie_heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    meta = json.loads((out / "fv.json").read_text())
    assert meta["engine"] == "exact" and meta["n_layers"] == 3 and meta["n_heads"] == 4 and meta["task"] == "upper"
    assert torch.allclose(torch.tensor(meta["cie"]), r.cie)
    assert meta["top_heads"] == [list(h) for h in r.top_heads]
    tensors = load_file(str(out / "fv.safetensors"))
    assert set(tensors) == {"mean_activations", "function_vector", "cie_per_prompt"}

    back = FunctionVectorResult.load(out)
    assert back.settings == r.settings and back.top_heads == r.top_heads
    assert (back.task, back.model, back.n_layers, back.n_heads, back.head_dim, back.seconds) == \
        (r.task, r.model, r.n_layers, r.n_heads, r.head_dim, r.seconds)
    for name in ("cie_per_prompt", "mean_activations", "vector"):
        assert torch.equal(getattr(back, name), getattr(r, name)), name
    # saving again over the same directory works and leaves no temporary files
    back.save(out)
    assert {p.name for p in out.iterdir()} == {"fv.json", "fv.safetensors", "cie_heatmap.png"}


def test_a_save_interrupted_between_its_two_files_is_caught_on_load(extracted, tmp_path):
    """fv.json names the tensors it was written with: new tensors beside an old fv.json (a kill between the two
    writes) are refused, while a file saved before the digest was recorded still loads."""
    from dataclasses import replace

    _, r = extracted
    r.save(tmp_path / "a")
    replace(r, vector=r.vector + 1).save(tmp_path / "b")
    shutil.copy(tmp_path / "b" / "fv.safetensors", tmp_path / "a" / "fv.safetensors")
    with pytest.raises(ValueError, match="is not the file .*fv.json was saved with"):
        FunctionVectorResult.load(tmp_path / "a")
    meta = json.loads((tmp_path / "b" / "fv.json").read_text())
    del meta["tensors_sha256"]
    (tmp_path / "b" / "fv.json").write_text(json.dumps(meta))
    assert torch.equal(FunctionVectorResult.load(tmp_path / "b").vector, r.vector + 1)


def test_load_from_an_empty_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no fv.json and fv.safetensors"):
        FunctionVectorResult.load(tmp_path)


@pytest.mark.parametrize("change, message", [
    ({"engine": "fast"}, "unknown CIE engine 'fast'"),
    ({"top_k": 13}, "top-k=13 is out of range: the model has 12 heads (3 layers x 4); choose 1..12"),
    ({"top_k": 0}, "top-k=0 is out of range"),
    ({"n_prompts": 0}, "n_prompts=0 must be positive"),
    ({"n_cie_prompts": -1}, "n_cie_prompts=-1 must be positive"),
    ({"max_rows": 0}, "max_rows=0 must be positive"),
    ({"shots": -1}, "shots=-1: the CIE shuffles the demonstrations' answers"),
    ({"shots": 1}, "takes at least 2 demonstrations per prompt"),
    ({"shots": 22}, "fewer than the 22 shots"),
])
def test_bad_settings(change, message, make_adapter, bpe_tokenizer, upper_task):
    a = make_adapter("llama", vocab=len(bpe_tokenizer))
    with pytest.raises(ValueError) as err:
        extract_function_vector(a, bpe_tokenizer, upper_task, replace(SETTINGS, **change))
    assert message in str(err.value)


def test_too_small_a_task(make_adapter, bpe_tokenizer):
    a = make_adapter("llama", vocab=len(bpe_tokenizer))
    task = ICLTask.from_pairs("three", [("a", "A"), ("b", "B"), ("c", "C"), ("d", "D")])  # 3 train, 1 test, 0 valid
    with pytest.raises(ValueError, match="no valid examples"):
        extract_function_vector(a, bpe_tokenizer, task, SETTINGS)


EVAL = FVEvalSettings(n_prompts=5, shots=3, batch_size=4, max_new_tokens=3)


def test_evaluate(extracted, bpe_tokenizer, upper_task, monkeypatch):
    import forgetlab.fv.evaluate as fv_evaluate

    a, r = extracted
    a.model.train()
    swept = []
    real_sweep = fv_evaluate.sweep_layers
    monkeypatch.setattr(fv_evaluate, "sweep_layers", lambda ad, bl, *args: swept.append(bl) or real_sweep(ad, bl, *args))
    result = evaluate_function_vector(a, bpe_tokenizer, upper_task, r.vector, EVAL)
    assert a.model.training  # evaluation put the model back as it found it
    a.model.eval()
    assert result["layers"] == [0, 1, 2] and len(result["zero_shot_fv_top1_by_layer"]) == 3
    by_layer = result["zero_shot_fv_top1_by_layer"]
    assert result["best_layer"] == max(range(3), key=lambda i: by_layer[i]) and result["edit_layer"] == result["best_layer"]
    for key in ("zero_shot", "zero_shot_fv", "few_shot", "shuffled", "shuffled_fv"):
        assert set(result[key]) == {"top1", "string_match"}
        assert all(0.0 <= result[key][m] <= 1.0 for m in ("top1", "string_match")), key
    # the layer is chosen on valid queries, the scores are on test queries: each sweep equals single-layer edits
    splits = upper_task.splits(EVAL.seed)
    test = [p.zero_shot() for p in sample_prompts(splits, EVAL.n_prompts, EVAL.shots, EVAL.seed + 2, query_split="test")]
    valid = [p.zero_shot() for p in sample_prompts(splits, EVAL.n_prompts, EVAL.shots, EVAL.seed + 3, query_split="valid")]
    assert not {p.query for p in test} & {p.query for p in valid}
    ids = lambda batch_list: [row.tolist() for b in batch_list for row in b.input_ids]  # noqa: E731
    assert ids(swept[0]) == ids(batches(bpe_tokenizer, valid, EVAL.prompt_format, EVAL.batch_size))  # valid, not test

    def edited_top1(prompts, layer):
        with add_to_residual(a, r.vector, layer, EVAL.alpha):
            return torch.cat([first_token_correct(a, b) for b in batches(bpe_tokenizer, prompts, EVAL.prompt_format, 4)]
                             ).float().mean().item()

    assert by_layer == pytest.approx([edited_top1(valid, layer) for layer in range(3)])
    plain_valid = torch.cat([first_token_correct(a, b) for b in batches(bpe_tokenizer, valid, EVAL.prompt_format, 4)])
    assert result["zero_shot_valid_top1"] == pytest.approx(plain_valid.float().mean().item())  # the sweep's baseline
    assert result["zero_shot_fv"]["top1"] == pytest.approx(edited_top1(test, result["edit_layer"]))
    json.dumps(result)  # the CLI writes it as JSON

    fixed = evaluate_function_vector(a, bpe_tokenizer, upper_task, r.vector, replace(EVAL, layer=2), layers=[0, 2])
    assert fixed["edit_layer"] == 2 and fixed["layers"] == [0, 2] and len(fixed["zero_shot_fv_top1_by_layer"]) == 2
    assert fixed["zero_shot_fv"]["top1"] == pytest.approx(edited_top1(test, 2))
    assert fixed["zero_shot"] == result["zero_shot"]  # no vector, same prompts, same scores


def test_evaluate_bad_inputs(extracted, bpe_tokenizer, upper_task):
    a, r = extracted
    with pytest.raises(ValueError, match=r"function vector has shape \(63,\); this model needs \(64,\)"):
        evaluate_function_vector(a, bpe_tokenizer, upper_task, r.vector[:-1], EVAL)
    with pytest.raises(ValueError, match="layer 3 is out of range; the model has layers 0..2"):
        evaluate_function_vector(a, bpe_tokenizer, upper_task, r.vector, replace(EVAL, layer=3))
    with pytest.raises(ValueError, match="layer -1 is out of range"):
        evaluate_function_vector(a, bpe_tokenizer, upper_task, r.vector, EVAL, layers=[-1, 0])
    a.model.train()  # an error while prompts are drawn gives the caller's model back in its own mode
    with pytest.raises(ValueError, match="fewer than the 99 shots"):
        evaluate_function_vector(a, bpe_tokenizer, upper_task, r.vector, replace(EVAL, shots=99))
    assert a.model.training
    a.model.eval()


def test_evaluate_scores_each_prompt_kind_on_its_own_prompts(extracted, bpe_tokenizer, upper_task, monkeypatch):
    """Each score is of the prompts it is named after: few-shot test queries with train demonstrations, the same
    queries bare, and the same demonstrations with their labels permuted; the vector goes in at the requested layer
    (``layer=0``), for the shuffled prompts as for the bare ones, while the best sweep layer is one of ``layers``."""
    from collections import Counter

    import forgetlab.fv.evaluate as fv_evaluate

    a, r = extracted
    calls = []
    real_score = fv_evaluate._score

    def record(adapter, tokenizer, prompts, settings, vector=None, layer=None):
        calls.append((prompts, None if vector is None else layer))
        return real_score(adapter, tokenizer, prompts, settings, vector, layer)

    monkeypatch.setattr(fv_evaluate, "_score", record)
    result = evaluate_function_vector(a, bpe_tokenizer, upper_task, r.vector, replace(EVAL, layer=0), layers=[1, 2])
    assert len(calls) == 5
    (zero, zero_layer), (zero_fv, zero_fv_layer), (few, few_layer), (shuffled, sh_layer), (shuffled_fv, sh_fv_layer) = calls
    assert (zero_layer, zero_fv_layer, few_layer, sh_layer, sh_fv_layer) == (None, 0, None, None, 0)
    splits = upper_task.splits(EVAL.seed)
    assert len(few) == EVAL.n_prompts and {(p.query, p.answer) for p in few} <= set(splits.test)
    assert all(len(p.demos) == EVAL.shots and set(p.demos) <= set(splits.train) for p in few)
    assert zero == zero_fv and [(p.demos, p.query, p.answer) for p in zero] == [((), p.query, p.answer) for p in few]
    assert shuffled == shuffled_fv and [(p.query, p.answer) for p in shuffled] == [(p.query, p.answer) for p in few]
    for s, f in zip(shuffled, few):
        assert [x for x, _ in s.demos] == [x for x, _ in f.demos]
        assert Counter(y for _, y in s.demos) == Counter(y for _, y in f.demos)
    assert sum(s.demos != f.demos for s, f in zip(shuffled, few)) >= 2  # the labels really moved
    # the best layer is a layer of the sweep (by its valid accuracy), not a position in the list of layers
    valid = [p.zero_shot() for p in sample_prompts(splits, EVAL.n_prompts, EVAL.shots, EVAL.seed + 3, query_split="valid")]
    by_hand = []
    for layer in (1, 2):
        with add_to_residual(a, r.vector, layer, EVAL.alpha):
            by_hand.append(torch.cat([first_token_correct(a, b) for b in batches(bpe_tokenizer, valid, EVAL.prompt_format, 4)]
                                     ).float().mean().item())
    assert result["zero_shot_fv_top1_by_layer"] == pytest.approx(by_hand)
    assert result["best_layer"] == (2 if by_hand[1] > by_hand[0] else 1) and result["edit_layer"] == 0


def test_generated_match_cuts_the_continuation_at_the_stop(bpe_tokenizer):
    """A hand example with a scripted model: the continuation counts up to the first newline, stripped, so
    " RED\\n\\nQ: blue" answers "RED", " RED" does not answer "BLUE" and " BLUE\\n" answers "BLUE": 2 of 3."""
    from types import SimpleNamespace

    from forgetlab.fv.evaluate import generated_match
    from forgetlab.fv.prompts import PromptBatch

    continuations = [" RED\n\nQ: blue", " RED", " BLUE\n"]
    batch_list = [PromptBatch(torch.tensor([[0, 5 + i, 6]]), torch.ones(1, 3, dtype=torch.long), torch.tensor([7]))
                  for i in range(3)]
    script = {5 + i: bpe_tokenizer.encode(text, add_special_tokens=False) for i, text in enumerate(continuations)}

    def generate(input_ids, attention_mask, max_new_tokens, **kwargs):
        return torch.cat([input_ids, torch.tensor([script[int(input_ids[0, 1])]])], dim=1)

    adapter = SimpleNamespace(model=SimpleNamespace(generate=generate))
    assert generated_match(adapter, bpe_tokenizer, batch_list, ["RED", "BLUE", "BLUE"], max_new_tokens=8) == pytest.approx(2 / 3)
    assert generated_match(adapter, bpe_tokenizer, batch_list, ["RED", "RED", "BLUE"], max_new_tokens=8) == pytest.approx(1.0)
