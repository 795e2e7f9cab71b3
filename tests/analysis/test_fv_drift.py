"""FV drift measures and fits against independent computations."""

import numpy as np
import pytest
import torch

from forgetlab.analysis import fv_drift
from forgetlab.analysis.fv_drift import (MEASURES, DriftSettings, drift_fits, drift_measurements, fv_interventions,
                                         fv_with_heads, in_context_prompts, linear_fit, parameter_distance, zero_shot_prompts,
                                         prompt_end_readings)
from forgetlab.fv.extract import FVSettings, extract_function_vector
from forgetlab.fv.prompts import batches
from forgetlab.fv.tasks import PromptFormat
from forgetlab.fv.tasks import ICLTask
from forgetlab.models.adapter import adapt
from forgetlab.models.tokenizers import build_word_tokenizer
from forgetlab.models.zoo import random_model, tiny_config

WORDS = [f"w{i}" for i in range(30)]


@pytest.fixture(scope="module")
def setup():
    tok = build_word_tokenizer(WORDS + ["Q", "A", ":"])
    tasks = [ICLTask("shift", tuple((WORDS[i], WORDS[(i + 1) % 30]) for i in range(30)), "Shift ."),
             ICLTask("mirror", tuple((WORDS[i], WORDS[29 - i]) for i in range(30)), "Mirror .")]
    return tok, tasks


def test_linear_fit_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=20)
    y = 3 * x + rng.normal(size=20)
    fit = linear_fit(x, y)
    assert fit["r2"] == pytest.approx(np.corrcoef(x, y)[0, 1] ** 2)
    # the closed form of the least-squares line: slope = cov(x, y) / var(x), through the means
    slope = ((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum()
    assert fit["slope"] == pytest.approx(slope) and fit["intercept"] == pytest.approx(y.mean() - slope * x.mean())
    assert linear_fit([1, 2, 3], [2, 4, 6])["r2"] == pytest.approx(1.0)
    assert linear_fit([1, 1, 1], [1, 2, 3])["r2"] is None  # x does not vary
    assert linear_fit([1, 2], [5, 3])["r2"] is None  # a line passes through any two points: R² 1 says nothing


def test_parameter_distance_is_the_l2_norm_of_the_difference():
    a, b = (random_model(tiny_config("gpt2", 40), seed=s) for s in (0, 1))
    hand = torch.cat([(p - q).flatten() for p, q in zip(a.parameters(), b.parameters())]).detach().double().norm()
    reference = {n: p.detach().clone() for n, p in b.named_parameters()}
    assert parameter_distance(a, reference) == pytest.approx(float(hand), rel=1e-9)
    with pytest.raises(ValueError, match="merge LoRA"):
        parameter_distance(a, {})


def test_fixed_head_fv_of_the_same_model_is_the_extracted_fv(setup):
    tok, tasks = setup
    adapter = adapt(random_model(tiny_config("llama", len(tok)), seed=3))
    settings = DriftSettings(n_prompts=6, shots=4, top_k=5)
    result = extract_function_vector(adapter, tok, tasks[0], FVSettings(n_prompts=6, n_cie_prompts=3, shots=4, top_k=5))
    again, state = fv_with_heads(adapter, tok, tasks[0], result.top_heads, settings)
    assert torch.allclose(again, result.vector, atol=1e-5)
    # the same-input control: the last hidden state at the end of those in-context prompts, averaged by hand
    with torch.no_grad():
        by_hand = torch.stack([adapter.model(**next(batches(tok, [p], PromptFormat(), 1)).model_inputs(),
                                             output_hidden_states=True).hidden_states[-1][0, -1]
                               for p in in_context_prompts(tasks[0], settings)]).double().mean(0)
    assert torch.allclose(state, by_hand, atol=1e-5)


def test_zero_shot_fv_over_a_whole_layer_is_its_mean_attention_output(setup):
    # all heads of one layer: their summed contributions are that layer's o_proj output (Llama has no bias),
    # read here with a hook, one prompt at a time (no padding), and averaged by hand
    tok, tasks = setup
    model = random_model(tiny_config("llama", len(tok)), seed=4)
    adapter = adapt(model)
    prompts = zero_shot_prompts(tasks[1], DriftSettings(eval_prompts=6, shots=4))
    layer = 1
    outputs = []
    hook = model.model.layers[layer].self_attn.o_proj.register_forward_hook(lambda m, i, o: outputs.append(o[0, -1]))
    with torch.no_grad():
        for prompt in prompts:
            batch = next(batches(tok, [prompt], PromptFormat(), 1))
            model(**batch.model_inputs())
    hook.remove()
    hand = torch.stack(outputs).mean(0)
    heads = [(layer, j) for j in range(adapter.n_heads)]
    assert torch.allclose(prompt_end_readings(adapter, tok, prompts, heads)[2], hand, atol=1e-5)


def test_prompt_end_readings_score_and_state_equal_separate_passes(setup):
    """The one-pass score is first-token accuracy as `accuracy` computes it; the state is the last hidden state at the
    prompt end, averaged by hand one prompt at a time."""
    from forgetlab.eval.icl import accuracy

    tok, tasks = setup
    model = random_model(tiny_config("llama", len(tok)), seed=4)  # a seed that gets 1 of the 6 test prompts right
    adapter = adapt(model)
    prompts = zero_shot_prompts(tasks[0], DriftSettings(eval_prompts=8, shots=4))
    score, state, _ = prompt_end_readings(adapter, tok, prompts, [(0, 0)])
    assert 0 < score < 1 and score == pytest.approx(accuracy(adapter, tok, prompts))
    with torch.no_grad():
        by_hand = torch.stack([model(**next(batches(tok, [p], PromptFormat(), 1)).model_inputs(),
                                     output_hidden_states=True).hidden_states[-1][0, -1] for p in prompts]).double().mean(0)
    assert torch.allclose(state, by_hand, atol=1e-5)


def _a_model_and_a_moved_copy(tok):
    """A random model, the same weights moved a little, and drift settings small enough for a test."""
    model = random_model(tiny_config("llama", len(tok)), seed=3)
    moved = random_model(tiny_config("llama", len(tok)), seed=3)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model, moved, DriftSettings(n_prompts=6, eval_prompts=8, shots=4, top_k=5)


def test_drift_rows_of_an_unchanged_and_a_perturbed_checkpoint(setup):
    tok, tasks = setup
    model, moved, settings = _a_model_and_a_moved_copy(tok)
    rows, initial = drift_measurements([("initial", model), ("same", model), ("moved", moved)], tok, tasks, settings)
    assert len(rows) == 6 and set(initial) == {"shift", "mirror"}
    same = [r for r in rows if r["checkpoint"] == "same"]
    assert all(r["fv_cosine"] == pytest.approx(1.0, abs=1e-5) and r["hidden_cosine"] == pytest.approx(1.0)
               and r["zero_shot_fv_cosine"] == pytest.approx(1.0, abs=1e-5) and r["icl_hidden_cosine"] == pytest.approx(1.0)
               and r["param_distance"] == 0 and r["score_change"] == 0 for r in same)
    far = [r for r in rows if r["checkpoint"] == "moved"]
    assert all(r["fv_cosine"] < 0.999 and r["zero_shot_fv_cosine"] < 0.999 and r["icl_hidden_cosine"] < 0.999
               and r["param_distance"] > 0 for r in far)
    fits = drift_fits(rows)
    assert set(fits) == set(MEASURES) and "icl_hidden_cosine" in MEASURES
    assert fits["fv_cosine"]["pooled"]["n"] == 4


def test_checkpoint_mean_fit_averages_each_model_over_its_tasks():
    # three later checkpoints, two tasks each; the means are worked out by hand below
    table = {"a": [(0.9, 0.0), (0.7, -0.2)], "b": [(0.5, -0.4), (0.3, -0.6)], "c": [(1.0, 0.1), (0.8, -0.1)]}
    rows = [{"checkpoint": "initial", "index": 0, "task": t, "zero_shot": 1.0, "score_change": 0.0,
             **{m: 1.0 for m in MEASURES}, "param_distance": 0.0} for t in ("t0", "t1")]
    for i, (label, pairs) in enumerate(table.items(), 1):
        for t, (cos, change) in zip(("t0", "t1"), pairs):
            rows.append({"checkpoint": label, "index": i, "task": t, "zero_shot": 1.0 + change, "score_change": change,
                         "fv_cosine": cos, "zero_shot_fv_cosine": cos / 2,
                         "hidden_cosine": 1.0 - i / 10 + (t == "t1") / 100, "icl_hidden_cosine": 0.5,
                         "param_distance": float(i)})
    fits = drift_fits(rows)
    fit = fits["fv_cosine"]["checkpoint_mean"]
    x, y = [0.8, 0.4, 0.9], [-0.1, -0.5, 0.0]  # per checkpoint: mean cosine, mean change
    assert fit["n"] == 3 and fit["slope"] == pytest.approx(np.polyfit(x, y, 1)[0])
    assert fit["r2"] == pytest.approx(np.corrcoef(x, y)[0, 1] ** 2)
    assert fits["param_distance"]["checkpoint_mean"]["n"] == 3

    def line(x, y):  # least squares by its closed form
        x, y = np.array(x), np.array(y)
        slope = ((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum()
        return slope, y.mean() - slope * x.mean(), np.corrcoef(x, y)[0, 1] ** 2

    # pooled: the score *change* over the six later (checkpoint, task) points, the initial rows left out
    pooled = fits["fv_cosine"]["pooled"]
    slope, intercept, r2 = line([0.9, 0.7, 0.5, 0.3, 1.0, 0.8], [0.0, -0.2, -0.4, -0.6, 0.1, -0.1])
    assert pooled["n"] == 6 and (pooled["slope"], pooled["intercept"], pooled["r2"]) == pytest.approx((slope, intercept, r2))
    # per task: the *score* over the task's own checkpoints, the initial model's included (as the paper fits one task)
    t0, t1 = (line([1.0] + [table[c][k][0] for c in "abc"], [1.0] + [1.0 + table[c][k][1] for c in "abc"]) for k in (0, 1))
    per_task = fits["fv_cosine"]["per_task"]
    assert per_task["t0"]["n"] == 4 and (per_task["t0"]["slope"], per_task["t0"]["r2"]) == pytest.approx(t0[::2])
    assert per_task["t1"]["r2"] == pytest.approx(t1[2])
    assert fits["fv_cosine"]["median_task_r2"] == pytest.approx((t0[2] + t1[2]) / 2)  # the median of two


def test_intervention_recovered_share_is_of_the_drop(setup, monkeypatch):
    """recovered = (edited − final) / (initial − final): 0 = no help, 1 = back to the initial score.
    Scores, edit choice and the edit itself are stubbed so the shares are worked out by hand."""
    import contextlib
    from types import SimpleNamespace

    tok, tasks = setup
    model = random_model(tiny_config("llama", len(tok), n_layers=2), seed=0)
    edit = {"alpha": 0.0}
    # per task: test score with no edit (final), with the original FV added, with the last task's FV subtracted
    scores = {"shift": {0: 0.30, 1: 0.55, -1: 0.425}, "mirror": {0: 0.20, 1: 0.50, -1: 0.10}}

    @contextlib.contextmanager
    def fake_add(adapter, vector, layer, alpha):
        edit["alpha"] = alpha
        yield
        edit["alpha"] = 0.0

    monkeypatch.setattr(fv_drift, "zero_shot_prompts", lambda task, settings, split="test": (task.name, split))
    monkeypatch.setattr(fv_drift, "accuracy", lambda adapter, tokenizer, prompts:
                        scores[prompts[0]][int(np.sign(edit["alpha"]))] if prompts[1] == "test" else None)
    chosen_on = []

    def fake_best_edit(adapter, tokenizer, vector, prompts, alphas):
        chosen_on.append(prompts)
        return 1, alphas[-1]

    monkeypatch.setattr(fv_drift, "_best_edit", fake_best_edit)
    monkeypatch.setattr(fv_drift, "add_to_residual", fake_add)
    monkeypatch.setattr(fv_drift, "extract_function_vector", lambda *a, **k: SimpleNamespace(vector=torch.ones(64)))
    # a third task fell by less than min_drop: not forgotten, so not edited and not in the means
    kept = ICLTask("kept", tasks[0].pairs, "Keep .")
    scores["kept"] = {0: 0.48}
    # a fourth fell by exactly min_drop, 2 of 40 queries, which float64 makes 0.04999…: forgotten all the same
    edge = ICLTask("edge", tasks[0].pairs, "Edge .")
    scores["edge"] = {0: 1 / 40, 1: 2 / 40, -1: 1 / 40}
    initial = {"shift": {"score": 0.80, "fv": torch.ones(64)}, "mirror": {"score": 0.60, "fv": torch.ones(64)},
               "kept": {"score": 0.50, "fv": torch.ones(64)}, "edge": {"score": 3 / 40, "fv": torch.ones(64)}}
    assert 3 / 40 - 1 / 40 < 0.05
    out = fv_interventions(model, tok, [*tasks, kept, edge], initial, tasks[0],
                           DriftSettings(alphas=(1.0, 2.0), min_drop=0.05))
    # layer and scale are chosen on the valid queries, never on the test queries they are scored on
    assert chosen_on == [("shift", "valid")] * 2 + [("mirror", "valid")] * 2 + [("edge", "valid")] * 2
    assert out["tasks"]["kept"] == {"initial": 0.50, "final": 0.48, "forgotten": False}
    assert out["tasks"]["edge"]["forgotten"] and out["tasks"]["edge"]["add_recovered"] == pytest.approx(0.5)
    shift, mirror = out["tasks"]["shift"], out["tasks"]["mirror"]
    # shift: drop 0.8 − 0.3 = 0.5; add (0.55 − 0.3)/0.5 = 0.5; subtract (0.425 − 0.3)/0.5 = 0.25
    assert shift["forgotten"] and shift["add_recovered"] == pytest.approx(0.5)
    assert shift["subtract_recovered"] == pytest.approx(0.25)
    # mirror: drop 0.6 − 0.2 = 0.4; add (0.5 − 0.2)/0.4 = 0.75; subtract (0.1 − 0.2)/0.4 = −0.25 (made it worse)
    assert mirror["add_recovered"] == pytest.approx(0.75)
    assert mirror["subtract_recovered"] == pytest.approx(-0.25)
    assert (shift["add_alpha"], shift["subtract_alpha"]) == (2.0, -2.0)
    # pooled: points won back over points lost; shift 0.25 of 0.5, mirror 0.3 of 0.4, edge 0.025 of 0.05
    assert out["summary"] == {"forgotten_tasks": 3, "min_drop": 0.05, "mean_add_recovered": pytest.approx((0.5 + 0.75 + 0.5) / 3),
                              "mean_subtract_recovered": pytest.approx((0.25 - 0.25 + 0) / 3),
                              "pooled_add_recovered": pytest.approx((0.25 + 0.3 + 0.025) / (0.5 + 0.4 + 0.05)),
                              "pooled_subtract_recovered": pytest.approx((0.125 - 0.1 + 0) / (0.5 + 0.4 + 0.05))}
    with pytest.raises(ValueError, match="min_drop=0.0 must be in"):
        DriftSettings(min_drop=0.0).validate()


def test_best_edit_takes_the_layer_and_scale_of_the_highest_valid_score(setup, monkeypatch):
    """The argmax over the (scale, layer) grid of valid scores: a worked grid where the best layer differs by scale."""
    tok, tasks = setup
    adapter = adapt(random_model(tiny_config("llama", len(tok), n_layers=2), seed=0))
    grid = {1.0: [0.2, 0.5], 2.0: [0.6, 0.1], 4.0: [0.3, 0.55]}
    asked = []

    def fake_sweep(adapter, valid, vector, layers, alpha):
        asked.append((alpha, list(layers), sum(len(b) for b in valid)))
        return grid[alpha]

    monkeypatch.setattr(fv_drift, "sweep_layers", fake_sweep)
    prompts = zero_shot_prompts(tasks[0], DriftSettings(eval_prompts=5, shots=4), "valid")
    assert fv_drift._best_edit(adapter, tok, torch.zeros(adapter.hidden_size), prompts, (1.0, 2.0, 4.0)) == (0, 2.0)
    assert asked == [(a, [0, 1], len(prompts)) for a in (1.0, 2.0, 4.0)]  # every layer, every scale, all valid queries
    grid[4.0] = [0.3, 0.7]
    assert fv_drift._best_edit(adapter, tok, torch.zeros(adapter.hidden_size), prompts, (1.0, 2.0, 4.0)) == (1, 4.0)


def test_a_resumed_measurement_loads_no_finished_checkpoint_and_gives_the_same_rows(setup):
    """``done`` as ``on_checkpoint`` left it after the second checkpoint: the third is measured, the second never
    loaded, and the rows equal an uninterrupted measurement (the initial model is loaded again for the distances)."""
    tok, tasks = setup
    model, moved, settings = _a_model_and_a_moved_copy(tok)
    snapshots = []
    whole, _ = drift_measurements([("initial", model), ("same", model), ("moved", moved)], tok, tasks, settings,
                                  on_checkpoint=lambda rows, initial: snapshots.append((list(rows), dict(initial))))
    assert [len(rows) for rows, _ in snapshots] == [2, 4, 6]
    rows, initial = snapshots[1]

    def never():
        raise AssertionError("a finished checkpoint was loaded again")

    loaded = []
    resumed, again = drift_measurements([("initial", lambda: loaded.append("initial") or model), ("same", never),
                                         ("moved", lambda: loaded.append("moved") or moved)], tok, tasks, settings,
                                        done={"rows": rows, "initial": initial})
    assert loaded == ["initial", "moved"] and resumed == whole and set(again) == set(initial)
