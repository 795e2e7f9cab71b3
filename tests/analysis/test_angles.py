"""Weight-update angles against constructed subspaces, and fused q/k/v splits against the models' own split."""

import csv
import math
import subprocess
import sys

import pytest
import torch

from forgetlab.analysis.angles import COLUMNS, chance_angle, effective_rank, subspace_angles, update_angles
from forgetlab.analysis.weights import weight_matrices
from forgetlab.models.zoo import random_model, tiny_config


def orthonormal(n, seed=0):
    return torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))[0]


def test_identical_subspaces_give_zero_and_orthogonal_ninety():
    q = orthonormal(40)
    a = q[:, :4] @ torch.randn(4, 25, dtype=torch.float64)
    b = q[:, :4] @ torch.randn(4, 25, dtype=torch.float64)  # same column space, other coefficients
    r_a, r_b, angles = subspace_angles(a, b)
    assert (r_a, r_b) == (4, 4) and angles.max() < 1e-4
    _, _, angles = subspace_angles(a, q[:, 10:13] @ torch.randn(3, 25, dtype=torch.float64))
    assert torch.allclose(angles, torch.full_like(angles, 90.0), atol=1e-6)


@pytest.mark.parametrize("degrees", [10.0, 37.5, 80.0])
def test_a_rotation_by_a_known_angle_is_measured(degrees):
    q = orthonormal(30, seed=1)
    v = torch.randn(20, dtype=torch.float64)
    theta = math.radians(degrees)
    rotated = math.cos(theta) * q[:, 0] + math.sin(theta) * q[:, 1]
    _, _, angles = subspace_angles(torch.outer(q[:, 0], v), torch.outer(rotated, v))
    assert angles.tolist() == pytest.approx([degrees], abs=1e-6)


def test_effective_rank_of_a_known_spectrum():
    q, p = orthonormal(20, 2), orthonormal(20, 3)
    sigma = torch.tensor([10.0, 3.0, 1.0, 0.1] + [0.0] * 16, dtype=torch.float64)
    m = q @ torch.diag(sigma) @ p.T
    s = torch.linalg.svdvals(m)
    # energies 100, 9, 1, 0.01 of 110.01; cumulative shares 0.909, 0.9908, 0.99991, 1
    assert [effective_rank(s, e) for e in (0.90, 0.99, 0.995, 0.99995)] == [1, 2, 3, 4]
    assert effective_rank(torch.zeros(5)) == 0
    # energy 1.0 is the full rank, never one more, whatever the rounding of the running sum
    spectra = [torch.rand(768, generator=torch.Generator().manual_seed(i)).sort(descending=True).values for i in range(20)]
    assert all(effective_rank(s, 1.0) == 768 for s in spectra)


@pytest.mark.parametrize("rank,dim", [(1, 4), (10, 128), (100, 128)])
def test_chance_angle_is_the_rms_projection_of_random_directions(rank, dim):
    # independent: project many random unit vectors on a random rank-dimensional subspace, average cos²
    g = torch.Generator().manual_seed(rank)
    basis = torch.linalg.qr(torch.randn(dim, rank, generator=g, dtype=torch.float64))[0]
    u = torch.randn(dim, 20000, generator=g, dtype=torch.float64)
    cos2 = (torch.linalg.vector_norm(basis.T @ (u / u.norm(dim=0)), dim=0) ** 2).mean().item()
    assert chance_angle(rank, dim) == pytest.approx(math.degrees(math.acos(math.sqrt(cos2))), abs=0.3)
    assert chance_angle(0, dim) == 90.0 and chance_angle(dim, dim) == 0.0


def test_neox_fused_qkv_split_matches_the_models_own_per_head_split():
    model = random_model(tiny_config("gpt_neox", 50, n_layers=1, n_heads=4, d_model=32))
    mats = weight_matrices(model)
    attn = model.gpt_neox.layers[0].attention
    x = torch.randn(3, 32)
    qkv = attn.query_key_value(x).view(3, 4, 3 * 8)   # what the model does: per head [q k v]
    q, k, v = qkv.chunk(3, dim=-1)
    bias = attn.query_key_value.bias.view(4, 3, 8)
    for name, part, b in (("q", q, bias[:, 0]), ("k", k, bias[:, 1]), ("v", v, bias[:, 2])):
        ours = x @ mats[(0, name)].T + b.reshape(-1)
        assert torch.allclose(ours, part.reshape(3, 32), atol=1e-5), name
    naive_q = attn.query_key_value.weight[:32]  # the reference code's [Q; K; V] assumption
    assert not torch.allclose(naive_q, mats[(0, "q")])


def test_gpt2_fused_c_attn_split_matches_the_model():
    model = random_model(tiny_config("gpt2", 50, n_layers=1, n_heads=4, d_model=32))
    mats = weight_matrices(model)
    attn = model.transformer.h[0].attn
    x = torch.randn(3, 32)
    q, k, v = attn.c_attn(x).split(32, dim=-1)
    for name, part in (("q", q), ("k", k), ("v", v)):
        bias = dict(zip("qkv", attn.c_attn.bias.split(32)))[name]
        assert torch.allclose(x @ mats[(0, name)].T + bias, part, atol=1e-5)


def test_components_and_layers_of_a_llama():
    mats = weight_matrices(random_model(tiny_config("llama_gqa", 50, n_layers=2)))
    assert {c for (l, c) in mats if l == 1} == {"q", "k", "v", "attn_out", "mlp_gate", "mlp_up", "mlp_down"}
    assert {c for (l, c) in mats if l == -1} == {"embedding", "unembedding"}
    assert mats[(0, "k")].shape[0] == mats[(0, "q")].shape[0] // 2  # GQA: half the key heads


def test_a_learned_position_embedding_is_an_embedding_layer_matrix():
    model = random_model(tiny_config("gpt2", 50, n_layers=1, n_heads=4, d_model=32))
    mats = weight_matrices(model)
    assert {c for (l, c) in mats if l == -1} == {"embedding", "position_embedding", "unembedding"}
    assert torch.equal(mats[(-1, "position_embedding")], model.transformer.wpe.weight)


def test_update_angles_of_models_rank_the_same_update_at_zero():
    a1 = random_model(tiny_config("llama", 50, n_layers=1), seed=0)
    a2 = random_model(tiny_config("llama", 50, n_layers=1), seed=1)
    rows = update_angles(a1, a2, a1, a2, device="cpu")
    assert rows and all(r.mean_angle_deg < 0.01 for r in rows)
    assert {r.layer for r in rows} == {-1, 0}


def test_angles_cli_writes_the_contract(tmp_path):
    paths = []
    for i in range(4):
        model = random_model(tiny_config("gpt_neox", 50, n_layers=2), seed=i)
        model.save_pretrained(tmp_path / f"m{i}")
        paths.append(tmp_path / f"m{i}")
    out = tmp_path / "angles"
    proc = subprocess.run([sys.executable, "-m", "forgetlab.cli", "analyze", "angles", "--a1", str(paths[0]), "--a2", str(paths[1]),
                           "--b1", str(paths[2]), "--b2", str(paths[3]), "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = list(csv.DictReader(open(out / "angles.csv")))
    assert list(rows[0]) == list(COLUMNS)[:len(rows[0])] and list(COLUMNS[:6]) == list(rows[0])[:6]
    assert {r["component"] for r in rows if r["layer"] == "-1"} == {"embedding", "unembedding"}
    assert all(0 <= float(r["mean_angle_deg"]) <= 90 for r in rows)
    q0 = next(r for r in rows if r["layer"] == "0" and r["component"] == "q")  # rows of q: the hidden size, 64
    assert float(q0["chance_angle_deg"]) == pytest.approx(math.degrees(math.acos(math.sqrt(int(q0["rank_a"]) / 64))), abs=1e-3)
    assert (out / "angles.png").stat().st_size > 0
    bad = subprocess.run([sys.executable, "-m", "forgetlab.cli", "analyze", "angles", "--a1", str(tmp_path / "nope"),
                          "--a2", str(paths[1]), "--b1", str(paths[2]), "--b2", str(paths[3]), "--out", str(out)],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "config.json" in bad.stderr


def test_angles_are_one_per_vector_of_b_in_b_singular_order():
    """Angles are of ΔB's top vectors (one each, in σ order) to span(ΔA), not the other way round."""
    e = torch.eye(6, dtype=torch.float64)
    v = orthonormal(5, seed=4)
    delta_a = torch.outer(e[:, 0], v[:, 0])                                      # span(A) = e1
    delta_b = 2 * torch.outer(e[:, 1], v[:, 1]) + torch.outer(e[:, 0], v[:, 2])  # top e2 (σ=2), then e1 (σ=1)
    # σ_B² = 4, 1: 80% of the energy after one vector, so both count. e2 ⟂ e1 → 90°, e1 ∈ span(A) → 0°
    r_a, r_b, angles = subspace_angles(delta_a, delta_b)
    assert (r_a, r_b) == (1, 2)
    assert angles.tolist() == pytest.approx([90.0, 0.0], abs=1e-6)
    # reverse: B's only vector e1 lies in span(e2, e1) → a single 0°
    r_a, r_b, angles = subspace_angles(delta_b, delta_a)
    assert (r_a, r_b) == (2, 1)
    assert angles.tolist() == pytest.approx([0.0], abs=1e-6)


def test_effective_rank_with_tied_singular_values_takes_the_first_k_reaching_the_energy():
    """Ties put the cumulative share exactly on the threshold: '≥' means the first k that reaches it."""
    # σ² = 1,1,1,1: shares 0.25, 0.5, 0.75, 1 → 0.5 is reached at k=2, 0.75 at k=3
    assert effective_rank(torch.ones(4), 0.5) == 2
    assert effective_rank(torch.ones(4), 0.75) == 3
    # energy is on σ², not σ: σ = 2,1,1,1,1 → σ² = 4,1,1,1,1 of 8, shares 0.5, 0.625, 0.75, ...
    # (on σ it would be 2/6 = 0.33 and give 2)
    s = torch.tensor([2.0, 1.0, 1.0, 1.0, 1.0])
    assert [effective_rank(s, e) for e in (0.5, 0.625, 0.75)] == [1, 2, 3]


def test_update_angles_of_four_different_models_use_each_phase_own_update():
    """ΔA = a2 − a1 and ΔB = b2 − b1 with four different models, known low-rank updates of different ranks,
    and non-square matrices: catches a mixed-up or swapped delta and a chance level on the wrong axis."""
    cfg = tiny_config("llama", 50, n_layers=1)
    a1, a2, b1, b2 = (random_model(cfg, seed=s) for s in (10, 11, 12, 13))
    w_a1, w_a2, w_b1, w_b2 = (weight_matrices(m) for m in (a1, a2, b1, b2))
    # rows of each (out, in) matrix: the space the left singular vectors live in
    rows_of = {"embedding": 50, "unembedding": 50, "q": 64, "k": 64, "v": 64, "attn_out": 64,
               "mlp_gate": 128, "mlp_up": 128, "mlp_down": 64}
    with torch.no_grad():
        for key in w_a1:
            m, n = w_a1[key].shape
            assert m == rows_of[key[1]]
            e = torch.eye(m)
            v = orthonormal(n, seed=5)[:, :5].float()
            # A: 3·e1 v1ᵀ + 2·e2 v2ᵀ   (σ² 9, 4: rank 2 at 99%, ‖ΔA‖ = √13)
            w_a2[key].copy_(w_a1[key] + 3 * torch.outer(e[0], v[:, 0]) + 2 * torch.outer(e[1], v[:, 1]))
            # B: 3·e1 + 2·e3 + 1·(e2+e4)/√2  (σ² 9, 4, 1: 13/14 < 99%, rank 3, ‖ΔB‖ = √14)
            u3 = (e[1] + e[3]) / math.sqrt(2)
            w_b2[key].copy_(w_b1[key] + 3 * torch.outer(e[0], v[:, 2]) + 2 * torch.outer(e[2], v[:, 3])
                            + torch.outer(u3, v[:, 4]))
    rows = update_angles(a1, a2, b1, b2, device="cpu")
    assert {(r.layer, r.component) for r in rows} == set(w_a1)
    assert any(rows_of[r.component] != w_a1[(r.layer, r.component)].shape[1] for r in rows)  # non-square present
    for r in rows:
        # B's vectors to span(e1, e2): e1 → 0°, e3 → 90°, (e2+e4)/√2 → arccos(1/√2) = 45°
        assert (r.rank_a, r.rank_b) == (2, 3), r
        assert r.min_angle_deg == pytest.approx(0.0, abs=1e-3)
        assert r.max_angle_deg == pytest.approx(90.0, abs=1e-3)
        assert r.mean_angle_deg == pytest.approx(45.0, abs=1e-3)
        assert r.norm_a == pytest.approx(math.sqrt(13), rel=1e-5)
        assert r.norm_b == pytest.approx(math.sqrt(14), rel=1e-5)
        # chance: a random unit vector of R^rows against the rank-2 span of A
        assert r.chance_angle_deg == pytest.approx(math.degrees(math.acos(math.sqrt(2 / rows_of[r.component]))), abs=1e-6)


def test_a_matrix_one_phase_left_unchanged_has_no_angle_and_is_named(tmp_path):
    """A frozen matrix (ΔB = 0, as under the Freeze method) has rank 0 and no angle: NaN in the CSV, null in the JSON,
    listed under ``not_updated``, a layer mean over the angles that exist, and no numpy warning about empty means."""
    import json
    import warnings

    from typer.testing import CliRunner

    from forgetlab.cli.main import app

    models = [random_model(tiny_config("llama", 50, n_layers=2), seed=i) for i in range(3)]
    frozen = random_model(tiny_config("llama", 50, n_layers=2), seed=2)  # b2: b1 with only layer 1 trained
    with torch.no_grad():
        for name, p in frozen.named_parameters():
            if ".layers.1." in name:
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    paths = []
    for i, model in enumerate([*models, frozen]):
        model.save_pretrained(tmp_path / f"m{i}")
        paths.append(tmp_path / f"m{i}")
    out = tmp_path / "angles"
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        result = CliRunner().invoke(app, ["analyze", "angles", "--a1", str(paths[0]), "--a2", str(paths[1]), "--b1",
                                          str(paths[2]), "--b2", str(paths[3]), "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(open(out / "angles.csv")))
    for r in rows:
        moved = r["layer"] == "1" and r["component"] not in ("embedding", "unembedding")
        assert (int(r["rank_b"]) > 0) == moved, r
        assert math.isnan(float(r["mean_angle_deg"])) != moved, r
    data = json.loads((out / "angles.json").read_text())
    assert data["not_updated"]["a"] == []
    assert sorted(data["not_updated"]["b"]) == sorted(f"{r['layer']}/{r['component']}" for r in rows
                                                      if not (r["layer"] == "1"))
    assert data["mean_angle_deg_by_layer"]["0"] is None and data["mean_angle_deg_by_layer"]["-1"] is None
    layer1 = [float(r["mean_angle_deg"]) for r in rows if r["layer"] == "1"]
    assert data["mean_angle_deg_by_layer"]["1"] == pytest.approx(sum(layer1) / len(layer1), rel=1e-5)
    assert data["chance_angle_deg_by_layer"]["0"] is None
    assert "not updated in phase B" in result.output


def test_angles_over_training_follow_each_window_by_hand(tmp_path):
    """Phase A moves one matrix along u; the later phase's first window moves it along u again (0°), its second
    along a direction orthogonal to u (90°): the windows are consecutive pairs, each against A's subspace, and
    the CLI writes them (CSV, JSON per component, PNG) as update_angles gives them pair by pair."""
    import json

    from typer.testing import CliRunner

    from forgetlab.analysis.angles import angles_over_training, component_means
    from forgetlab.cli.main import app

    base = random_model(tiny_config("llama", 50, n_layers=1), seed=0)
    name = "model.layers.0.self_attn.q_proj.weight"
    rows_out, cols_in = dict(base.named_parameters())[name].shape
    q = orthonormal(rows_out, seed=3)
    u, u_perp = q[:, 0].float(), q[:, 1].float()
    v = torch.randn(cols_in, generator=torch.Generator().manual_seed(4))

    def moved(*updates):
        model = random_model(tiny_config("llama", 50, n_layers=1), seed=0)
        with torch.no_grad():
            for direction, scale in updates:
                dict(model.named_parameters())[name].add_(scale * torch.outer(direction, v))
        return model

    a2 = moved((u, 1.0))
    c0, c1, c2 = a2, moved((u, 1.0), (u, 2.0)), moved((u, 1.0), (u, 2.0), (u_perp, 0.5))
    windows = angles_over_training(base, a2, iter([c0, c1, c2]), device="cpu")
    assert len(windows) == 2
    (early,), (late,) = ([r for r in w if r.layer == 0 and r.component == "q"] for w in windows)
    assert (early.rank_a, early.rank_b, late.rank_b) == (1, 1, 1)
    assert early.mean_angle_deg == pytest.approx(0.0, abs=1e-3) and late.mean_angle_deg == pytest.approx(90.0, abs=1e-3)
    assert all(r.rank_b == 0 for w in windows for r in w if (r.layer, r.component) != (0, "q"))  # nothing else moved
    means = component_means(windows[1])
    assert means["q"]["below_chance_deg"] == pytest.approx(chance_angle(1, rows_out) - 90.0, abs=1e-3)
    assert means["k"]["mean_angle_deg"] is None

    paths = []
    for i, model in enumerate([base, a2, c0, c1, c2]):
        model.save_pretrained(tmp_path / f"m{i}")
        paths.append(str(tmp_path / f"m{i}"))
    out = tmp_path / "aot"
    result = CliRunner().invoke(app, ["analyze", "angles-over-training", "--a1", paths[0], "--a2", paths[1], "--checkpoint",
                                      paths[2], "--checkpoint", paths[3], "--checkpoint", paths[4], "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(open(out / "angles_over_training.csv")))
    q_rows = [r for r in rows if r["layer"] == "0" and r["component"] == "q"]
    assert [(r["window"], r["b1"], r["b2"]) for r in q_rows] == [("0", paths[2], paths[3]), ("1", paths[3], paths[4])]
    assert [float(r["mean_angle_deg"]) for r in q_rows] == pytest.approx([0.0, 90.0], abs=1e-3)
    data = json.loads((out / "angles_over_training.json").read_text())
    assert [w["by_component"]["q"]["mean_angle_deg"] for w in data["windows"]] == pytest.approx([0.0, 90.0], abs=1e-3)
    assert (out / "angles_over_training.png").stat().st_size > 0
    one = CliRunner().invoke(app, ["analyze", "angles-over-training", "--a1", paths[0], "--a2", paths[1], "--checkpoint",
                                   paths[2], "--out", str(tmp_path / "x")])
    assert one.exit_code == 2 and "at least two checkpoints" in one.output and not (tmp_path / "x").exists()


# per architecture: component -> the module (under a decoder layer) it must come from; q/k/v of fused projections
# are checked against the models' own splits above
LAYER_MODULES = {
    "gpt2": {"attn_out": "attn.c_proj", "mlp_in": "mlp.c_fc", "mlp_out": "mlp.c_proj"},
    "gpt_neox": {"attn_out": "attention.dense", "mlp_in": "mlp.dense_h_to_4h", "mlp_out": "mlp.dense_4h_to_h"},
    "gptj": {"q": "attn.q_proj", "k": "attn.k_proj", "v": "attn.v_proj", "attn_out": "attn.out_proj",
             "mlp_in": "mlp.fc_in", "mlp_out": "mlp.fc_out"},
    "llama": {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "attn_out": "self_attn.o_proj",
              "mlp_gate": "mlp.gate_proj", "mlp_up": "mlp.up_proj", "mlp_down": "mlp.down_proj"},
}


@pytest.mark.parametrize("architecture", list(LAYER_MODULES))
def test_every_layer_component_is_its_own_modules_weight_in_out_in_orientation(architecture):
    """Each layer has every component, and each is the (out, in) matrix of the module named for it: W x equals what
    the module itself computes (minus its bias), whatever its storage (GPT-2's Conv1D keeps (in, out)). Catches
    GPT-2's attention c_proj taken for the MLP's (attn_out lost, mlp_out the wrong matrix) and a missed transpose."""
    model = random_model(tiny_config(architecture, 50, n_layers=2, n_heads=4, d_model=32), seed=1)
    mats = weight_matrices(model)
    layers = model.transformer.h if architecture in ("gpt2", "gptj") else (
        model.gpt_neox.layers if architecture == "gpt_neox" else model.model.layers)
    expected = set(LAYER_MODULES[architecture]) | {"q", "k", "v"}
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(0))
    for index, layer in enumerate(layers):
        assert {c for (l, c) in mats if l == index} == expected, index
        for component, path in LAYER_MODULES[architecture].items():
            module = layer.get_submodule(path)
            w = mats[(index, component)]
            rows = x[:, :w.shape[1]]
            with torch.no_grad():
                own = module(rows) - module(torch.zeros_like(rows))
            assert torch.allclose(rows @ w.T, own, atol=1e-5), (index, component)
    # the two layers' matrices are different tensors (not layer 0's read twice)
    assert all(not torch.equal(mats[(0, c)], mats[(1, c)]) for c in expected)
