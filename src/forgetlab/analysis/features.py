"""Feature shift: how the hidden state at the last prompt token moves between checkpoints, per layer.

For a fixed prompt set, each checkpoint's features at every layer (the embedding output is layer 0; the last
layer's, as Hugging Face returns it, is after the final norm, so its scale and per-dimension gain are not those
of the layers below) are reduced by PCA. Per layer and pair (reference, other): the angle between the first principal
components (sign-invariant: a PC is a line, so arccos |cos|), the mean shift ‖μ_other − μ_ref‖
relative to the reference features' RMS norm, and the angle between the mean-shift direction and the
reference PC1 (also sign-invariant).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from forgetlab.eval.exact_match import left_pad


@torch.no_grad()
def last_token_features(model: torch.nn.Module, prompts: Sequence[Sequence[int]], pad_id: int,
                        batch_size: int = 64) -> np.ndarray:
    """(n_layers + 1, n_prompts, hidden) float32: hidden states at each prompt's last token."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    chunks = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = left_pad(prompts[start:start + batch_size], pad_id)
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                    position_ids=(mask.cumsum(-1) - 1).clamp(min=0).to(device), output_hidden_states=True)
        chunks.append(torch.stack([h[:, -1].float() for h in out.hidden_states]).cpu())
    model.train(was_training)
    return torch.cat(chunks, dim=1).numpy()


def first_pc(x: np.ndarray) -> np.ndarray:
    centered = x - x.mean(0, keepdims=True)
    return np.linalg.svd(centered, full_matrices=False)[2][0]


def line_angle_deg(u: np.ndarray, v: np.ndarray) -> float:
    """Angle between two lines (sign-invariant), in [0, 90] degrees."""
    cos = abs(float(u @ v)) / max(float(np.linalg.norm(u) * np.linalg.norm(v)), 1e-30)
    return float(np.degrees(np.arccos(min(1.0, cos))))


def feature_shift(reference: np.ndarray, other: np.ndarray) -> list[dict]:
    """Per layer: pc1_angle_deg, mean_shift (relative to the reference features' RMS norm), shift_vs_pc1_angle_deg.

    Where the reference features do not vary (e.g. the embedding of a last token that every prompt
    shares) there is no principal component: the angles are None; so is the PC1 angle where only the
    other checkpoint's features do not vary.
    """
    rows = []
    for layer, (ref, oth) in enumerate(zip(reference, other)):
        shift = oth.mean(0) - ref.mean(0)
        rms = float(np.sqrt((ref ** 2).sum(1).mean())) or 1e-30
        varies, other_varies = (_spread(x) > 1e-5 * rms for x in (ref, oth))
        pc_ref = first_pc(ref) if varies else None
        rows.append({"layer": layer,
                     "pc1_angle_deg": line_angle_deg(pc_ref, first_pc(oth)) if varies and other_varies else None,
                     "mean_shift": float(np.linalg.norm(shift)) / rms,
                     "shift_vs_pc1_angle_deg": line_angle_deg(shift, pc_ref) if varies and np.linalg.norm(shift) > 0 else None})
    return rows


def _spread(x: np.ndarray) -> float:
    return float(np.sqrt(((x - x.mean(0)) ** 2).sum(1).mean()))


def pca_scatter(reference: np.ndarray, others: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Every feature set projected onto the reference's first two principal components (for the scatter plot)."""
    mean = reference.mean(0, keepdims=True)
    basis = np.linalg.svd(reference - mean, full_matrices=False)[2][:2]
    return [(x - mean) @ basis.T for x in [reference, *others]]
