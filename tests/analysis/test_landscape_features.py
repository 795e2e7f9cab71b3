"""Loss landscape, trajectory projection and feature shift against closed forms."""

import numpy as np
import pytest
import torch

from forgetlab.analysis.features import feature_shift, first_pc, line_angle_deg
from forgetlab.analysis.landscape import directions, loss_grid, parameters_of, project


class Quadratic(torch.nn.Module):
    """loss(θ) = ½ θᵀAθ + bᵀθ over two parameter tensors (a vector and a matrix)."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(3, generator=g, dtype=torch.float64))
        self.m = torch.nn.Parameter(torch.randn(2, 2, generator=g, dtype=torch.float64))
        n = 7
        r = torch.randn(n, n, generator=g, dtype=torch.float64)
        self.register_buffer("A", r @ r.T + torch.eye(n, dtype=torch.float64))
        self.register_buffer("b", torch.randn(n, generator=g, dtype=torch.float64))

    def flat(self):
        return torch.cat([self.w.flatten(), self.m.flatten()])

    def loss(self):
        t = self.flat()
        return float(0.5 * t @ self.A @ t + self.b @ t)


def set_flat(model, t):
    with torch.no_grad():
        model.w.copy_(t[:3])
        model.m.copy_(t[3:].view(2, 2))


def test_landscape_of_a_quadratic_equals_its_closed_form():
    model = Quadratic()
    g = torch.Generator().manual_seed(5)
    t0, t1, t2 = (torch.randn(7, generator=g, dtype=torch.float64) for _ in range(3))
    params = []
    for t in (t0, t1, t2):
        set_flat(model, t)
        params.append({n: p.detach().clone() for n, p in model.named_parameters()})
    d1, d2 = directions(*params)
    alphas, betas = np.linspace(-1, 2, 4), np.linspace(-0.5, 1.5, 3)
    grid = loss_grid(model, params[0], d1, d2, alphas, betas, {"q": lambda m: m.loss()})
    D1, D2 = t1 - t0, t2 - t1
    A, b = model.A, model.b
    for j, beta in enumerate(betas):
        for i, alpha in enumerate(alphas):
            t = t0 + alpha * D1 + beta * D2
            assert grid.losses["q"][j, i] == pytest.approx(float(0.5 * t @ A @ t + b @ t), rel=1e-9)
    assert torch.equal(model.flat(), t2)  # weights restored afterwards


def test_orthogonalized_direction_is_orthogonal_and_filter_norm_matches_rows():
    g = torch.Generator().manual_seed(1)
    p = [{"w": torch.randn(4, 3, generator=g), "b": torch.randn(4, generator=g)} for _ in range(3)]
    d1, d2 = directions(*p, orthogonalize=True)
    assert float((d1["w"] * d2["w"]).sum() + (d1["b"] * d2["b"]).sum()) == pytest.approx(0.0, abs=1e-5)
    f1, _ = directions(*p, filter_normalize=True)
    assert torch.allclose(f1["w"].norm(dim=1), p[0]["w"].norm(dim=1), atol=1e-5)
    assert torch.count_nonzero(f1["b"]) == 0


def test_filter_normalisation_rescales_output_units_also_of_gpt2_conv1d_and_orthogonalises_after():
    from forgetlab.analysis.landscape import filter_axes
    from forgetlab.models.zoo import random_model, tiny_config

    model = random_model(tiny_config("gpt2", vocab_size=50), seed=0)
    axes = filter_axes(model)
    fc = "transformer.h.0.mlp.c_fc.weight"  # Conv1D: (in, out), its output units are columns
    assert axes[fc] == 1 and model.transformer.h[0].mlp.c_fc.weight.shape[1] == model.transformer.h[0].mlp.c_fc.nf
    assert "transformer.wte.weight" not in axes  # an embedding is indexed by token, its rows as they are
    theta = parameters_of(model)
    g = torch.Generator().manual_seed(3)
    p1 = {n: t + torch.randn(t.shape, generator=g) for n, t in theta.items()}
    p2 = {n: t + torch.randn(t.shape, generator=g) for n, t in p1.items()}
    f1, f2 = directions(theta, p1, p2, filter_normalize=True, axes=axes)
    assert torch.allclose(f1[fc].norm(dim=0), theta[fc].norm(dim=0), rtol=1e-4)  # each output unit, by hand
    assert torch.allclose(f2[fc].norm(dim=0), theta[fc].norm(dim=0), rtol=1e-4)
    linear = "lm_head.weight" if "lm_head.weight" in theta else "transformer.wte.weight"
    assert torch.allclose(f1[linear].norm(dim=1), theta[linear].norm(dim=1), rtol=1e-4)
    o1, o2 = directions(theta, p1, p2, orthogonalize=True, filter_normalize=True, axes=axes)
    dot = sum(float((o1[n].double() * o2[n].double()).sum()) for n in o1)
    assert abs(dot) <= 1e-6 * sum(float(o2[n].double().norm() ** 2) for n in o2)  # both options: still orthogonal
    assert torch.equal(o1[fc], f1[fc])  # d1 is only normalised


def test_a_degenerate_plane_is_refused_in_one_line():
    t0 = {"w": torch.zeros(3)}
    t1 = {"w": torch.ones(3)}
    with pytest.raises(ValueError, match="parallel"):
        directions(t0, t1, {"w": 3 * torch.ones(3)})
    with pytest.raises(ValueError, match="theta1 - theta0 is zero"):
        directions(t0, t0, t1)
    with pytest.raises(ValueError, match="theta2 - theta1 is zero"):
        directions(t0, t1, t1)


def test_projection_recovers_known_coefficients_over_all_parameters():
    g = torch.Generator().manual_seed(2)
    shapes = {"a": (50, 20), "b": (300,)}
    t0, t1, t2 = ({n: torch.randn(*s, generator=g, dtype=torch.float64) for n, s in shapes.items()} for _ in range(3))
    d1, d2 = directions(t0, t1, t2)
    coeffs = [(0.5, -1.0), (2.0, 3.5), (-0.25, 0.0)]
    points = [{n: t0[n] + a * d1[n] + b * d2[n] for n in shapes} for a, b in coeffs]
    assert np.allclose(project(t0, d1, d2, points), coeffs, atol=1e-9)
    # a component orthogonal to the plane does not move the least-squares coordinates
    flat1 = torch.cat([d1[n].flatten() for n in shapes])
    flat2 = torch.cat([d2[n].flatten() for n in shapes])
    noise = torch.randn(flat1.numel(), generator=g, dtype=torch.float64)
    basis = torch.linalg.qr(torch.stack([flat1, flat2], 1))[0]
    noise = noise - basis @ (basis.T @ noise)
    chunks = dict(zip(shapes, noise.split([50 * 20, 300])))
    noisy = [{n: pt[n] + chunks[n].view(shapes[n]) for n in shapes} for pt in points]
    assert np.allclose(project(t0, d1, d2, noisy), coeffs, atol=1e-8)


def test_parameters_of_reads_every_floating_parameter():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    assert set(parameters_of(model)) == {"0.weight", "0.bias", "1.weight", "1.bias"}


def test_pc_angle_is_sign_invariant_and_finds_a_rotation():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 3)) * np.array([5.0, 1.0, 0.5])
    pc = first_pc(x)
    assert line_angle_deg(pc, -pc) == pytest.approx(0.0, abs=1e-6)
    assert line_angle_deg(pc, np.array([1.0, 0, 0])) < 2.0
    theta = np.radians(30)
    rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    rows = feature_shift(x[None], (x @ rot.T + np.array([3.0, 0, 0]))[None])
    assert rows[0]["pc1_angle_deg"] == pytest.approx(30.0, abs=2.0)
    rms = np.sqrt((x ** 2).sum(1).mean())
    assert rows[0]["mean_shift"] == pytest.approx(np.linalg.norm((x @ rot.T).mean(0) + [3, 0, 0] - x.mean(0)) / rms, rel=1e-6)
    constant = feature_shift(np.ones((1, 10, 3)), np.ones((1, 10, 3)) * 2)  # no variation: no principal component
    assert constant[0]["pc1_angle_deg"] is None and constant[0]["mean_shift"] == pytest.approx(1.0)
    collapsed = feature_shift(x[None], np.ones((1, 500, 3)))  # the other checkpoint maps every prompt to one point
    assert collapsed[0]["pc1_angle_deg"] is None and collapsed[0]["shift_vs_pc1_angle_deg"] is not None
    flipped = feature_shift(x[None], (-(x - x.mean(0)) + x.mean(0))[None])  # every component's sign flipped
    assert flipped[0]["pc1_angle_deg"] == pytest.approx(0.0, abs=1e-5)


def test_shift_angle_is_measured_against_the_reference_pc1():
    """The mean-shift direction is compared with the reference's PC1, not the other checkpoint's."""
    # reference: zero mean, spread 4 along x and 1 along y → PC1 = x exactly
    ref = np.array([[4.0, 0, 0], [-4.0, 0, 0], [0, 1.0, 0], [0, -1.0, 0]])
    # other: the reference turned by 90° in the xy-plane (PC1 = y), then moved by 2·(cos 60°, sin 60°, 0)
    shift = np.array([1.0, np.sqrt(3.0), 0.0])
    other = np.array([[0, 4.0, 0], [0, -4.0, 0], [-1.0, 0, 0], [1.0, 0, 0]]) + shift
    row = feature_shift(ref[None], other[None])[0]
    assert row["shift_vs_pc1_angle_deg"] == pytest.approx(60.0, abs=1e-6)  # to x; to the other's PC1 (y) it is 30°
    assert row["pc1_angle_deg"] == pytest.approx(90.0, abs=1e-6)
    # |shift| = 2; RMS norm of the reference = √((16 + 16 + 1 + 1) / 4) = √8.5
    assert row["mean_shift"] == pytest.approx(2.0 / np.sqrt(8.5), rel=1e-9)


@pytest.mark.parametrize("architecture", ["gpt_neox", "llama", "gpt2"])
def test_dataset_loss_equals_the_models_own_label_loss(architecture):
    """Unembedding only the labelled positions gives Hugging Face's mean answer-token loss."""
    from forgetlab.analysis.landscape import dataset_loss
    from forgetlab.models.zoo import random_model, tiny_config
    from forgetlab.train.data import qa_dataset

    model = random_model(tiny_config(architecture, vocab_size=50), seed=1)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 50, (int(n),), generator=g).tolist() for n in torch.randint(3, 9, (7,), generator=g)]
    answers = [torch.randint(3, 50, (int(n),), generator=g).tolist() for n in torch.randint(1, 4, (7,), generator=g)]
    data = qa_dataset(prompts, answers, eos_id=1, pad_id=2)
    with torch.no_grad():
        reference = float(model(input_ids=data.input_ids, attention_mask=data.attention_mask, labels=data.labels).loss)
    assert dataset_loss(model, data, batch_size=3) == pytest.approx(reference, rel=1e-5)


@pytest.mark.parametrize("spread", ["decades", "narrow", "flat"])
def test_landscape_figure_draws_any_spread_of_losses(tmp_path, spread):
    """Log-spaced colours need positive losses spanning a range: a few decades (the usual plane), a narrow band (no
    1-2-5 tick inside it) and a flat grid (a task the plane does not change) all draw, with the trajectory numbered."""
    from forgetlab.report.analysis import plot_landscape

    alphas, betas = np.linspace(-1, 1, 5), np.linspace(0, 2, 4)
    grid = {"decades": np.geomspace(0.01, 10, 20).reshape(4, 5), "narrow": np.linspace(1.54, 1.76, 20).reshape(4, 5),
            "flat": np.full((4, 5), 2.0)}[spread]
    path = tmp_path / "landscape.png"
    plot_landscape(alphas, betas, {"task0": grid, "task1": grid[::-1]}, path, np.array([[0.0, 0.0], [1.0, 1.0]]),
                   ["a", "b"])
    assert path.stat().st_size > 10_000


@pytest.mark.parametrize("architecture", ["gpt2", "gpt_neox", "llama"])
def test_last_token_features_equal_each_prompts_own_unpadded_forward_pass(architecture):
    """Left padding in batches of 3 over prompts of mixed lengths: every layer's feature of every prompt is the hidden
    state at its last token when it runs alone, unpadded (GPT-2's learned positions need the shifted position ids)."""
    from forgetlab.analysis.features import last_token_features
    from forgetlab.models.zoo import random_model, tiny_config

    model = random_model(tiny_config(architecture, vocab_size=50, n_layers=2), seed=3)
    g = torch.Generator().manual_seed(1)
    lengths = [5, 1, 8, 3, 8, 2, 6, 4]  # 3 batches (3, 3, 2), each with rows of different lengths
    prompts = [torch.randint(3, 50, (n,), generator=g).tolist() for n in lengths]
    features = last_token_features(model, prompts, pad_id=2, batch_size=3)
    assert features.shape == (2 + 1, len(prompts), 64) and features.dtype == np.float32
    with torch.no_grad():
        for i, p in enumerate(prompts):
            hidden = model(input_ids=torch.tensor([p]), output_hidden_states=True).hidden_states
            alone = np.stack([h[0, -1].numpy() for h in hidden])  # layer 0: the embedding output
            assert np.allclose(features[:, i], alone, rtol=1e-5, atol=1e-5), (i, np.abs(features[:, i] - alone).max())
    assert not np.allclose(features[:, 0], features[:, 1], atol=1e-3)  # prompts differ, so must their features
