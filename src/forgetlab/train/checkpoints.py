"""Resumable training state and final phase checkpoints, written atomically.

Weights go to safetensors; the optimizer state (needed for an exact resume) to a torch file in the
same directory; the directory is swapped in whole, so a kill never leaves a torn checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from forgetlab.utils.io import fresh_tmp_dir, replace_dir

STATE = "resume-state"


def save_training_state(state_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, step: int,
                        rows: list[dict], seconds: float, pending_losses: list[float]) -> None:
    final = Path(state_dir) / STATE
    tmp = fresh_tmp_dir(final)
    weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(weights, str(tmp / "model.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, "rows": rows, "seconds": seconds,
                                                  "pending_losses": pending_losses}))
    replace_dir(tmp, final)


def load_training_state(state_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict | None:
    """Restore model and optimizer from ``state_dir`` if a state is there; return step/rows/seconds."""
    final = Path(state_dir) / STATE
    if not (final / "state.json").is_file():
        return None
    device = next(model.parameters()).device
    model.load_state_dict({k: v.to(device) for k, v in load_file(str(final / "model.safetensors")).items()})
    optimizer.load_state_dict(torch.load(final / "optimizer.pt", map_location=device, weights_only=True))
    return json.loads((final / "state.json").read_text())


def save_model_dir(model, tokenizer, out_dir: Path) -> None:
    """A normal HF checkpoint directory (safetensors + config + tokenizer), swapped in atomically."""
    tmp = fresh_tmp_dir(Path(out_dir))
    model.save_pretrained(str(tmp), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    replace_dir(tmp, Path(out_dir))
