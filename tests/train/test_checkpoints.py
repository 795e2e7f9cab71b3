"""The resumable training state: weights, optimizer moments, random stream and bookkeeping come back as saved, and
of two finished states on disk the newer one is read."""

import shutil

import torch

from forgetlab.train.checkpoints import STATE, load_training_state, save_training_state


def _trained(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    for _ in range(2):  # Adam moments and a step count that differ from a fresh optimizer's
        opt.zero_grad()
        model(torch.randn(4, 3)).pow(2).sum().backward()
        opt.step()
    return model, opt


def test_resume_restores_weights_optimizer_random_stream_and_bookkeeping(tmp_path):
    """A dropout mask drawn after a resume must be the one the uninterrupted run drew next, so the saved CPU stream
    comes back: the numbers drawn right after saving are drawn again right after loading, in a process whose
    stream has moved on."""
    model, opt = _trained(0)
    save_training_state(tmp_path, model, opt, step=7, rows=[{"step": 5, "value": 0.5}], seconds=1.5,
                        pending_losses=[0.25], loss_terms={"lm": [2.0]})
    next_draws = torch.rand(5)
    torch.manual_seed(1234)
    torch.rand(100)
    fresh, fresh_opt = _trained(1)
    state = load_training_state(tmp_path, fresh, fresh_opt)
    assert torch.equal(torch.rand(5), next_draws)
    assert state == {"step": 7, "rows": [{"step": 5, "value": 0.5}], "seconds": 1.5, "pending_losses": [0.25],
                     "loss_terms": {"lm": [2.0]}}
    for name, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name
    saved, restored = opt.state_dict()["state"], fresh_opt.state_dict()["state"]
    assert saved.keys() == restored.keys()
    for k in saved:
        for field in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(restored[k][field], saved[k][field]), (k, field)


def test_the_newer_state_wins_over_a_leftover_old_one(tmp_path):
    """A kill after the new state was renamed in but before the ``.old`` copy was deleted leaves both: the new one
    (step 2) is the one to resume from, not the older (step 1)."""
    model, opt = _trained(0)
    save_training_state(tmp_path, model, opt, step=1, rows=[], seconds=0.0, pending_losses=[])
    shutil.copytree(tmp_path / STATE, tmp_path / "older")
    save_training_state(tmp_path, model, opt, step=2, rows=[], seconds=0.0, pending_losses=[])
    shutil.move(tmp_path / "older", tmp_path / (STATE + ".old"))
    assert load_training_state(tmp_path, *_trained(1))["step"] == 2
    shutil.rmtree(tmp_path / STATE)  # killed between the two renames: only the older state is finished
    assert load_training_state(tmp_path, *_trained(1))["step"] == 1


def test_the_state_holds_what_the_phase_trains_and_a_state_without_it_is_refused(tmp_path):
    """Frozen weights (a LoRA base, Freeze's bottom layers) are the phase's starting model, which a resume rebuilds
    before reading the state: only the trained ones are saved, and they come back over that model."""
    import pytest
    from safetensors.torch import load_file, save_file

    model, opt = _trained(0)
    model.bias.requires_grad_(False)  # frozen: stays as the resumed run's start has it
    save_training_state(tmp_path, model, opt, step=3, rows=[], seconds=0.0, pending_losses=[])
    held = load_file(tmp_path / STATE / "model.safetensors")
    assert sorted(held) == ["weight"]
    fresh, fresh_opt = _trained(1)
    fresh.bias.requires_grad_(False)
    start_bias = fresh.bias.detach().clone()
    load_training_state(tmp_path, fresh, fresh_opt)
    assert torch.equal(fresh.weight, model.weight) and torch.equal(fresh.bias, start_bias)
    fresh.bias.requires_grad_(True)  # a phase that trains the bias cannot resume from a state without it
    with pytest.raises(ValueError, match="does not hold this phase's trained weights \\(e.g. bias\\)"):
        load_training_state(tmp_path, fresh, fresh_opt)
    save_file({"weight": held["weight"], "other": held["weight"].clone()}, str(tmp_path / STATE / "model.safetensors"))
    with pytest.raises(ValueError, match="e.g. other"):
        load_training_state(tmp_path, fresh, fresh_opt)
