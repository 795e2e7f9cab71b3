"""Resumable training state and final phase checkpoints, written atomically.

Weights go to safetensors; the optimizer state and the random-number streams (needed for an exact
resume) to torch files in the same directory; the directory is swapped in whole, so a kill never leaves
a torn checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from forgetlab.utils.io import fresh_tmp_dir, replace_dir

STATE = "resume-state"


def save_training_state(state_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, step: int,
                        rows: list[dict], seconds: float, pending_losses: list[float],
                        loss_terms: dict[str, list[float]] | None = None) -> None:
    final = Path(state_dir) / STATE
    tmp = fresh_tmp_dir(final)
    # only what the phase trains: the frozen rest is the phase's starting model, which a resume rebuilds first (a
    # LoRA step on a 7B model saves megabytes, not the 13 GB base)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k in trainable}
    save_file(weights, str(tmp / "model.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    # the random streams too, so dropout after a resume draws the masks it would have drawn
    torch.save({"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
               tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, "rows": rows, "seconds": seconds,
                                                  "pending_losses": pending_losses, "loss_terms": loss_terms or {}}))
    replace_dir(tmp, final)


def load_training_state(state_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict | None:
    """Restore model and optimizer from ``state_dir`` if a state is there; return step/rows/seconds. A kill in the
    middle of the swap leaves the previous state as ``.old``, which is read then."""
    final = swapped_in(Path(state_dir) / STATE)
    if final is None:
        return None
    device = next(model.parameters()).device
    loaded = model.load_state_dict({k: v.to(device) for k, v in load_file(str(final / "model.safetensors")).items()},
                                   strict=False)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    wrong = loaded.unexpected_keys + sorted(set(loaded.missing_keys) & trainable)
    if wrong:
        raise ValueError(f"{final} does not hold this phase's trained weights (e.g. {wrong[0]}); remove it to start the "
                         "phase again")
    optimizer.load_state_dict(torch.load(final / "optimizer.pt", map_location=device, weights_only=True))
    if (final / "rng.pt").is_file():  # states written before the random streams were kept have none
        rng = torch.load(final / "rng.pt", weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if rng["cuda"] and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(rng["cuda"])
    return json.loads((final / "state.json").read_text())


BETWEEN = "between-phases"


def save_between_phases(state_dir: Path, weights: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor],
                        meta: dict) -> None:
    """What a sequence of phases needs to go on after its last finished phase: the model's weights as they stand
    (those the start cannot rebuild), method state as named tensors, and ``meta`` (scores so far); one directory,
    swapped in whole."""
    final = Path(state_dir) / BETWEEN
    tmp = fresh_tmp_dir(final)
    for name, values in (("model", weights), ("tensors", tensors)):  # clone: tied weights share storage
        save_file({k: v.detach().cpu().clone().contiguous() for k, v in values.items()}, str(tmp / f"{name}.safetensors"))
    (tmp / "state.json").write_text(json.dumps(meta))
    replace_dir(tmp, final)


def load_between_phases(state_dir: Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]] | None:
    """``(meta, model weights, tensors)`` saved by :func:`save_between_phases`, or None. A kill in the middle
    of the swap leaves the previous state as ``.old``, which is read then."""
    final = swapped_in(Path(state_dir) / BETWEEN)
    if final is None:
        return None
    return (json.loads((final / "state.json").read_text()), load_file(str(final / "model.safetensors")),
            load_file(str(final / "tensors.safetensors")))


def swapped_in(final: Path) -> Path | None:
    """The state directory :func:`replace_dir` left: ``final``, or ``final.old`` when a kill came between its two
    renames; None when neither holds a finished state (``state.json`` is written last)."""
    for candidate in (final, final.with_name(final.name + ".old")):
        if (candidate / "state.json").is_file():
            return candidate
    return None


def save_model_dir(model, tokenizer, out_dir: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """A normal HF checkpoint directory (safetensors + config + tokenizer), swapped in atomically;
    ``state_dict`` replaces the model's own weights (e.g. a LoRA model's merged ones)."""
    tmp = fresh_tmp_dir(Path(out_dir))
    model.save_pretrained(str(tmp), safe_serialization=True, state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    replace_dir(tmp, Path(out_dir))
