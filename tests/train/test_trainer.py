"""The loop's pure pieces against closed forms, and exact resume."""

import math

import pytest
import torch

from forgetlab.models.build import ModelConfig, build_model
from forgetlab.train.data import pack_texts, qa_dataset
from forgetlab.train.trainer import EvalSchedule, PhaseConfig, lr_at, micro_batch_rows, train_phase


def test_lr_warmup_then_cosine_closed_form():
    cfg = PhaseConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10)
    assert lr_at(0, 110, cfg) == 0.1 and lr_at(9, 110, cfg) == 1.0
    assert math.isclose(lr_at(10, 110, cfg), 1.0)
    assert math.isclose(lr_at(60, 110, cfg), 0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))  # halfway: 0.55
    assert math.isclose(lr_at(110, 110, cfg), 0.1)
    assert lr_at(50, 110, PhaseConfig(lr=0.3, schedule="constant")) == 0.3


def test_each_epoch_is_a_permutation_without_repeats():
    rows = torch.cat([micro_batch_rows(m, 10, 4, seed=3) for m in range(3)])  # 3 micro-batches = one epoch of 10
    assert sorted(rows.tolist()) == list(range(10))
    assert not torch.equal(torch.cat([micro_batch_rows(m, 10, 4, seed=3) for m in range(3, 6)]), rows)


def test_eval_schedule_dense_then_sparse():
    s = EvalSchedule(dense_every=5, dense_until=20, every=50)
    assert [t for t in range(0, 120) if s.due(t, 120)] == [0, 5, 10, 15, 20, 50, 100]
    assert s.due(120, 120)


def test_total_steps_from_epochs_and_accumulation():
    assert PhaseConfig(epochs=2, batch_size=4, grad_accum=2).total_steps(10) == 3  # 2 * ceil(10/4) = 6 micro -> 3
    assert PhaseConfig(max_steps=7).total_steps(10) == 7


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("setting, message", [
    ({"lr": NAN}, "task.lr=nan is not a finite number; give a finite value"),
    ({"lr": INF}, "task.lr=inf is not a finite number; give a finite value"),
    ({"epochs": NAN}, "task.epochs=nan is not a finite number; give a finite value"),
    ({"epochs": INF, "max_steps": 5}, "task.epochs=inf is not a finite number; give a finite value"),
    ({"grad_clip": NAN}, "task.grad_clip=nan is not a finite number; give a finite value"),
    ({"weight_decay": -INF}, "task.weight_decay=-inf is not a finite number; give a finite value"),
    ({"min_lr_ratio": NAN}, "task.min_lr_ratio=nan is not a finite number; give a finite value"),
    # a NaN in a whole-number setting (a hand-edited config.json) fails its range check
    ({"warmup_steps": NAN}, "task.warmup_steps=nan must not be negative (0 turns it off)"),
    ({"batch_size": NAN}, "task.batch_size=nan must be at least 1"),
    ({"max_steps": NAN}, "task: set a positive epochs or max_steps (got epochs=1.0, max_steps=nan)"),
    ({"lr": 0.0}, "task.lr=0.0 must be positive"),
    ({"grad_clip": -1.0}, "task.grad_clip=-1.0 must not be negative (0 turns it off)"),
    ({"epochs": 0.0, "max_steps": 0}, "task: set a positive epochs or max_steps (got epochs=0.0, max_steps=0)"),
])
def test_phase_settings_that_are_not_finite_or_out_of_range_are_refused(setting, message):
    """NaN is false against every bound, so ``x < 0`` lets it through: each check is written so that it fails."""
    with pytest.raises(ValueError) as err:
        PhaseConfig(**setting).validate("task")
    assert str(err.value) == message


def _setup(seed=0):
    model = build_model(ModelConfig(d_model=32, n_layers=2, n_heads=2, max_positions=32), 30, 0, 1, 2, seed=seed)
    g = torch.Generator().manual_seed(1)
    data = pack_texts([torch.randint(3, 30, (9,), generator=g).tolist() for _ in range(40)], eos_id=1, block_size=16)
    return model, data


def test_resume_after_kill_is_bit_exact(tmp_path):
    cfg = PhaseConfig(lr=1e-2, warmup_steps=2, max_steps=12, batch_size=4, checkpoint_every=5,
                      eval=EvalSchedule(dense_every=0, every=4))
    ref, data = _setup()
    out_ref = train_phase(ref, data, cfg, phase="p", state_dir=tmp_path / "a", seed=7, evaluate=lambda: {}, progress=False)

    # Interrupted run: stop after 6 steps (a checkpoint exists at step 5), then resume in a fresh model.
    part, _ = _setup()
    short = PhaseConfig(**{**cfg.__dict__, "max_steps": 12})
    calls = {"n": 0}

    class Killed(Exception):
        pass

    def evaluate():
        calls["n"] += 1
        if calls["n"] == 3:  # at step 8, after the checkpoint of step 5
            raise Killed
        return {}

    try:
        train_phase(part, data, short, phase="p", state_dir=tmp_path / "b", seed=7, evaluate=evaluate, progress=False)
    except Killed:
        pass
    resumed, _ = _setup(seed=123)  # different init: everything must come from the checkpoint
    out = train_phase(resumed, data, cfg, phase="p", state_dir=tmp_path / "b", seed=7, evaluate=lambda: {}, progress=False)
    assert out.steps == out_ref.steps == 12
    for (name, a), b in zip(ref.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert [(r["step"], r["task"], r["metric"]) for r in out.rows] == [(s, "train", "loss") for s in (4, 8, 12)]
    assert [r["value"] for r in out.rows] == [r["value"] for r in out_ref.rows]
    assert out.loss_terms.keys() == {"lm"} and out.loss_terms == pytest.approx(out_ref.loss_terms, rel=1e-6)


def test_logged_training_loss_is_the_mean_of_its_own_window_across_a_resume(tmp_path):
    """With lr=0 the weights never move, so the ``train/loss`` logged at steps 4, 8 and 12 must be the mean of the
    model's loss on the micro-batches of steps 1-4, 5-8 and 9-12, computed here directly, plus a method term that
    is the sum of the micro-batch's row ids (constant in the weights; it makes the windows differ, where a random
    model's losses are all about log 30). The run is killed at the evaluation of step 8 and resumed from step 5, so
    step 5's loss must come back from the checkpoint. A running mean never reset at an evaluation, or a resume that
    forgets the window's pending losses, logs other numbers."""
    cfg = PhaseConfig(lr=0.0, max_steps=12, batch_size=4, checkpoint_every=5, eval=EvalSchedule(dense_every=0, every=4))
    model, data = _setup()

    def offset(rows, batch, run_forward):
        return {"offset": rows.sum().float()}

    class Killed(Exception):
        pass

    calls = {"n": 0}

    def evaluate():
        calls["n"] += 1
        if calls["n"] == 3:  # steps 0, 4, then 8: after the checkpoint of step 5
            raise Killed
        return {}

    with pytest.raises(Killed):
        train_phase(model, data, cfg, phase="p", state_dir=tmp_path, seed=7, evaluate=evaluate, extra_loss=offset,
                    progress=False)
    resumed, _ = _setup(seed=123)
    out = train_phase(resumed, data, cfg, phase="p", state_dir=tmp_path, seed=7, evaluate=lambda: {}, extra_loss=offset,
                      progress=False)

    reference, _ = _setup()  # the untouched weights both runs kept
    per_step = []
    with torch.no_grad():
        for m in range(12):
            rows = micro_batch_rows(m, len(data), 4, seed=7)
            per_step.append(reference(**data.batch(rows)).loss.item() + int(rows.sum()))
    hand = {s: sum(per_step[s - 4 : s]) / 4 for s in (4, 8, 12)}
    logged = {r["step"]: r["value"] for r in out.rows if (r["task"], r["metric"]) == ("train", "loss")}
    assert logged == pytest.approx(hand, rel=1e-5)
    for s in (8, 12):  # the windows differ: a mean over the whole phase so far would show
        assert abs(sum(per_step[:s]) / s - hand[s]) > 1.0


def test_only_trainable_parameters_change(tmp_path):
    model, data = _setup()
    frozen = model.model.layers[0]
    for p in frozen.parameters():
        p.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_phase(model, data, PhaseConfig(lr=1e-2, max_steps=3, batch_size=4, checkpoint_every=0), phase="p",
                state_dir=tmp_path, seed=0, progress=False)
    after = model.state_dict()
    for k in before:
        assert torch.equal(before[k], after[k]) == k.startswith("model.layers.0."), k


def test_early_stop_ends_the_phase(tmp_path):
    model, data = _setup()
    out = train_phase(model, data, PhaseConfig(max_steps=50, batch_size=4, checkpoint_every=0,
                                               eval=EvalSchedule(dense_every=2, dense_until=50)),
                      phase="p", state_dir=tmp_path, seed=0, evaluate=lambda: {"t": {"em": 1.0}},
                      stop=lambda s: s["t"]["em"] >= 0.9, progress=False)
    assert out.stopped_early and out.steps == 0


def test_early_stop_after_some_steps_ends_the_phase_at_that_evaluation(tmp_path):
    """The metric reads 0, 0, 1 at the evaluations of steps 0, 2 and 4 (and 1 ever after): the phase ends at
    step 4 exactly (the stop inside the loop, not the one before its first step), with no optimizer step after
    it: its weights are those of a run of 4 steps (constant lr, so both runs share the schedule)."""
    cfg = PhaseConfig(lr=1e-2, schedule="constant", max_steps=50, batch_size=4, checkpoint_every=0,
                      eval=EvalSchedule(dense_every=2, dense_until=50))
    model, data = _setup()
    metric, stepped, lines = [0.0, 0.0], [], []
    out = train_phase(model, data, cfg, phase="p", state_dir=tmp_path / "a", seed=0,
                      evaluate=lambda: {"t": {"em": metric.pop(0) if metric else 1.0}},
                      stop=lambda s: s["t"]["em"] >= 0.9, on_step=stepped.append, log=lines.append, progress=False)
    assert stepped == [1, 2, 3, 4]
    assert out.steps == 4 and out.stopped_early
    assert [(r["step"], r["value"]) for r in out.rows if r["metric"] == "em"] == [(0, 0.0), (2, 0.0), (4, 1.0)]
    assert lines[-1] == "[p] early stop at step 4"
    four, _ = _setup()
    short = train_phase(four, data, PhaseConfig(**{**cfg.__dict__, "max_steps": 4}), phase="p",
                        state_dir=tmp_path / "b", seed=0, progress=False)
    assert short.steps == 4 and not short.stopped_early
    for (name, a), b in zip(four.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name


def test_drop_last_gives_full_batches_only():
    sizes = [len(micro_batch_rows(m, 10, 4, seed=0, drop_last=True)) for m in range(6)]
    assert sizes == [4] * 6  # two full batches per epoch of 10 rows
    rows = torch.cat([micro_batch_rows(m, 10, 4, seed=0, drop_last=True) for m in range(2)])
    assert len(set(rows.tolist())) == 8


def test_loss_terms_are_means_per_micro_batch(tmp_path):
    """With every micro-batch holding all rows and a zero learning rate, ``lm`` is the loss of the whole
    set each time; named terms are averaged as returned, a bare tensor is called ``extra``."""
    model, data = _setup()
    n = len(data)
    cfg = PhaseConfig(lr=0.0, max_steps=3, batch_size=n, grad_accum=2, checkpoint_every=0)
    calls = []

    def named(rows, batch, run_forward):
        calls.append(len(rows))
        return {"half": 0.5 * run_forward().loss, "count": torch.tensor(2.0 * len(calls))}

    out = train_phase(model, data, cfg, phase="p", state_dir=tmp_path / "a", seed=0, extra_loss=named, progress=False)
    with torch.no_grad():
        whole = model(**data.batch(torch.arange(n))).loss.item()
    assert calls == [n] * 6
    assert out.loss_terms == pytest.approx({"lm": whole, "half": whole / 2, "count": 7.0}, rel=1e-5)
    bare = train_phase(model, data, cfg, phase="p", state_dir=tmp_path / "b", seed=0, progress=False,
                       extra_loss=lambda rows, batch, run_forward: run_forward().loss * 0 + 1.5)
    assert bare.loss_terms == pytest.approx({"lm": whole, "extra": 1.5}, rel=1e-5)


def test_run_forward_runs_the_model_once_per_micro_batch_however_often_it_is_asked(tmp_path):
    """A method that reads the outputs (FVG's hooks) and another that reads them again (a penalty) share one pass:
    a second pass would cost a step its time, hold a second graph, and draw dropout masks the run then lacks."""
    model, data = _setup()
    passes = []
    handle = model.register_forward_hook(lambda module, args, output: passes.append(1))
    cfg = PhaseConfig(lr=1e-3, max_steps=2, batch_size=2, grad_accum=3, checkpoint_every=0)

    def twice(rows, batch, run_forward):
        first = run_forward()
        assert run_forward() is first
        return {"zero": 0.0 * first.loss}

    train_phase(model, data, cfg, phase="p", state_dir=tmp_path / "a", seed=0, extra_loss=twice, progress=False)
    handle.remove()
    assert len(passes) == 2 * 3


def _qa_setup(seed=0, n=8):
    """Padded question-answer rows whose answers hold 1 to 8 tokens: micro-batches differ in labelled tokens."""
    model, _ = _setup(seed)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 30, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]
    answers = [torch.randint(3, 30, (1 + (7 * i) % 8,), generator=g).tolist() for i in range(n)]
    return model, qa_dataset(prompts, answers, eos_id=1, pad_id=0)


def _step_gradients(tmp_path, monkeypatch, extra_loss=None):
    """The gradient one step of ``train_phase`` applies to 4 padded rows taken as 1 x 4, 2 x 2 and 4 x 1 micro-batches
    (read where it is clipped), each from a fresh model; ``extra_loss(model)`` gives the step's method term."""
    import forgetlab.train.trainer as trainer

    grads = []
    real_clip = torch.nn.utils.clip_grad_norm_

    def capture(params, max_norm):
        params = list(params)
        grads.append(torch.cat([p.grad.flatten() for p in params]).clone())
        return real_clip(params, max_norm)

    monkeypatch.setattr(trainer.torch.nn.utils, "clip_grad_norm_", capture)
    for batch_size, accum in ((4, 1), (2, 2), (1, 4)):
        model, data = _qa_setup(n=4)
        cfg = PhaseConfig(lr=1e-2, max_steps=1, batch_size=batch_size, grad_accum=accum, grad_clip=1e9, checkpoint_every=0)
        train_phase(model, data, cfg, phase="p", state_dir=tmp_path / f"{batch_size}", seed=0, progress=False,
                    extra_loss=None if extra_loss is None else extra_loss(model))
    return grads


def test_accumulated_micro_batches_give_the_gradient_of_the_whole_batch(tmp_path, monkeypatch):
    """Each layout gives the gradient of the mean loss over all 4 rows' answer tokens, computed here in one pass
    (averaging the micro-batches' own token means would weigh a short answer's tokens more)."""
    grads = _step_gradients(tmp_path, monkeypatch)
    model, data = _qa_setup(n=4)
    model.train()
    model(**data.batch(torch.arange(4))).loss.backward()  # HF: the mean over the 4 rows' labelled tokens
    reference = torch.cat([p.grad.flatten() for p in model.parameters()])
    for got in grads:
        torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-6)
    halves = [model(**data.batch(torch.tensor(rows))).loss.item() for rows in ([0, 1], [2, 3])]
    assert abs(halves[0] - halves[1]) > 1e-2  # the halves' own means differ: the weighting is what the test checks


def test_a_method_term_is_averaged_over_the_micro_batches_of_a_step(tmp_path, monkeypatch):
    """A method term of known gradient, ½‖θ‖² per micro-batch, adds exactly θ to the step's gradient in every
    layout (summing it over micro-batches would multiply it by their count)."""
    def half_square(model):
        return lambda rows, batch, run_forward: 0.5 * sum(p.pow(2).sum() for p in model.parameters())

    grads = _step_gradients(tmp_path, monkeypatch, half_square)
    model, data = _qa_setup(n=4)
    model.train()
    model(**data.batch(torch.arange(4))).loss.backward()
    reference = torch.cat([(p.grad + p.detach()).flatten() for p in model.parameters()])  # d(½‖θ‖²)/dθ = θ
    for got in grads:
        torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-6)


def _optimizer_steps(model, data, cfg, state_dir):
    """What the optimizer sees at each of its steps in ``train_phase``: learning rates and the gradient's norm."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    seen = []

    def record(optimizer, args, kwargs):
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        seen.append({"lr": [group["lr"] for group in optimizer.param_groups],
                     "norm": float(torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in params])))})

    handle = register_optimizer_step_pre_hook(record)
    try:
        train_phase(model, data, cfg, phase="p", state_dir=state_dir, seed=0, progress=False)
    finally:
        handle.remove()
    return seen


def test_each_optimizer_step_gets_the_learning_rate_of_its_own_step(tmp_path):
    model, data = _setup()
    cfg = PhaseConfig(lr=1e-2, warmup_steps=3, max_steps=8, min_lr_ratio=0.1, batch_size=4, checkpoint_every=0)
    seen = _optimizer_steps(model, data, cfg, tmp_path)
    # by hand: warmup 1/3, 2/3, 3/3 of the peak, then cosine over the 5 steps left down to a tenth
    hand = [1e-2 * (s + 1) / 3 for s in range(3)] + [
        1e-3 + 0.5 * (1e-2 - 1e-3) * (1 + math.cos(math.pi * (s - 3) / 5)) for s in range(3, 8)]
    for step, expected in zip(seen, hand, strict=True):
        assert step["lr"] == pytest.approx([expected, expected])


def test_gradients_are_clipped_to_the_configured_norm(tmp_path):
    free = _optimizer_steps(*_setup(), PhaseConfig(lr=1e-2, max_steps=2, batch_size=4, grad_clip=0.0,
                                                   checkpoint_every=0), tmp_path / "free")
    assert free[0]["norm"] > 0.5  # the unclipped gradient of the first step, for scale
    clipped = _optimizer_steps(*_setup(), PhaseConfig(lr=1e-2, max_steps=2, batch_size=4, grad_clip=0.5,
                                                      checkpoint_every=0), tmp_path / "clipped")
    assert [step["norm"] for step in clipped] == pytest.approx([0.5, 0.5], rel=1e-5)
    loose = _optimizer_steps(*_setup(), PhaseConfig(lr=1e-2, max_steps=1, batch_size=4, grad_clip=1e6,
                                                    checkpoint_every=0), tmp_path / "loose")
    assert loose[0]["norm"] == pytest.approx(free[0]["norm"], rel=1e-6)  # a bound above the norm changes nothing


def test_weight_decay_skips_norms_and_biases():
    from forgetlab.models.zoo import random_model, tiny_config
    from forgetlab.train.trainer import make_optimizer

    model = random_model(tiny_config("gpt2", 40))  # GPT-2: biases and LayerNorm weights and biases
    optimizer = make_optimizer(model, PhaseConfig(weight_decay=0.1))
    decay_of = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    for name, param in model.named_parameters():
        vector = name.endswith(".bias") or ".ln_" in name or name.startswith("transformer.ln_f")
        assert decay_of[id(param)] == (0.0 if vector else 0.1), name
    assert sum(decay_of.values()) > 0 and 0.0 in decay_of.values()


def test_an_epoch_ends_where_its_rows_end(tmp_path):
    """33 rows, micro-batches of 8, windows of 4, one epoch: 5 micro-batches (the last of 1 row) in 2 steps, every
    row trained exactly once (the last step takes only what is left of the epoch)."""
    model, data = _qa_setup(n=33)
    cfg = PhaseConfig(lr=0.0, epochs=1, batch_size=8, grad_accum=4, checkpoint_every=0)
    seen = []
    out = train_phase(model, data, cfg, phase="p", state_dir=tmp_path, seed=0, progress=False,
                      extra_loss=lambda rows, batch, run_forward: seen.append(rows.tolist()) or run_forward().loss * 0)
    assert out.steps == cfg.total_steps(33) == 2 and [len(r) for r in seen] == [8, 8, 8, 8, 1]
    assert sorted(sum(seen, [])) == list(range(33))


def test_a_loss_that_is_not_finite_stops_the_phase_with_one_clear_line(tmp_path):
    model, data = _setup()
    cfg = PhaseConfig(lr=1e-3, max_steps=3, batch_size=4, checkpoint_every=0)
    with pytest.raises(ValueError, match=r"\[p\] the training loss became nan at step 1; lower the learning rate"):
        train_phase(model, data, cfg, phase="p", state_dir=tmp_path, seed=0, progress=False,
                    extra_loss=lambda rows, batch, run_forward: run_forward().loss * float("nan"))


def test_a_kill_between_the_two_renames_of_a_state_swap_resumes_from_the_older_state(tmp_path):
    """replace_dir moves the state to .old, then the new one in; killed in between, only .old holds a state."""
    import os

    from forgetlab.train.checkpoints import STATE, load_training_state, save_training_state
    from forgetlab.train.trainer import make_optimizer

    model, _ = _setup()
    optimizer = make_optimizer(model, PhaseConfig())
    save_training_state(tmp_path, model, optimizer, step=5, rows=[], seconds=1.0, pending_losses=[])
    os.replace(tmp_path / STATE, tmp_path / f"{STATE}.old")  # the first rename done, the second not
    (tmp_path / f"{STATE}.tmp").mkdir()                        # the new state, unfinished
    fresh, _ = _setup(seed=9)
    state = load_training_state(tmp_path, fresh, make_optimizer(fresh, PhaseConfig()))
    assert state is not None and state["step"] == 5
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)


def test_a_micro_batch_with_nothing_to_learn_is_refused(tmp_path):
    from forgetlab.train.data import IGNORE, TokenDataset

    model, data = _setup()
    labels = data.labels.clone()
    labels[:] = IGNORE
    empty = TokenDataset(data.input_ids, labels, data.attention_mask)
    with pytest.raises(ValueError, match="has no token to learn"):
        train_phase(model, empty, PhaseConfig(max_steps=1, batch_size=4, checkpoint_every=0), phase="p",
                    state_dir=tmp_path, seed=0, progress=False)


def test_a_new_swap_after_a_killed_one_keeps_the_older_state_until_the_new_one_is_in(tmp_path, monkeypatch):
    """After a kill between the renames only ``.old`` holds a state; the next swap must not delete it first."""
    from forgetlab.utils import io

    final, old, tmp = tmp_path / "state", tmp_path / "state.old", tmp_path / "state.tmp"
    old.mkdir()
    (old / "state.json").write_text("{}")
    tmp.mkdir()
    (tmp / "state.json").write_text('{"new": 1}')

    def killed(src, dst):
        raise OSError("killed before the new state moved in")

    monkeypatch.setattr(io.os, "replace", killed)
    with pytest.raises(OSError, match="killed"):
        io.replace_dir(tmp, final)
    assert (old / "state.json").is_file()
    monkeypatch.undo()
    io.replace_dir(tmp, final)
    assert (final / "state.json").read_text() == '{"new": 1}' and not old.exists()
