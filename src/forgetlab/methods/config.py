"""Which continual method runs on tasks 1..N, and its settings."""

from __future__ import annotations

import math

from dataclasses import dataclass, field

METHODS = ("seq", "freeze", "ewc")


@dataclass(frozen=True)
class MethodConfig:
    """SEQ (plain sequential fine-tuning), Freeze or EWC; replay and early stopping combine with each."""

    name: str = field(default="seq", metadata={"help": "seq | freeze | ewc"})
    freeze_layers: int = field(default=0, metadata={"help": "freeze: number of bottom decoder layers (0..n_layers)"})
    freeze_embedding: bool = field(default=True, metadata={"help": "freeze: also freeze the input embedding"})
    replay: float = field(default=0.0, metadata={"help": "old-task rows mixed in, as a fraction of the new task's rows"})
    early_stop: float = field(default=0.0, metadata={"help": "stop a task once its accuracy reaches this (0 = off)"})
    ewc_strength: float = field(default=0.0, metadata={"help": "ewc: λ of the penalty λ/2 Σ F (θ − θ*)²"})
    ewc_batches: int = field(default=16, metadata={"help": "ewc: batches of earlier tasks' rows for the diagonal Fisher"})

    def validate(self, n_layers: int) -> None:
        if self.name not in METHODS:
            raise ValueError(f"method={self.name!r} is unknown; use one of: {', '.join(METHODS)}")
        if not 0 <= self.freeze_layers <= n_layers:
            raise ValueError(f"--freeze-layers {self.freeze_layers} is outside 0..{n_layers} (the model has {n_layers} layers)")
        if self.name == "freeze" and self.freeze_layers == 0 and not self.freeze_embedding:
            raise ValueError("method=freeze with --freeze-layers 0 and no embedding freezes nothing; set --freeze-layers K")
        if self.name != "freeze" and self.freeze_layers:
            raise ValueError(f"--freeze-layers {self.freeze_layers} needs --method freeze (method {self.name} freezes nothing)")
        if not 0 <= self.replay <= 1:
            raise ValueError(f"--replay {self.replay} must be a fraction in [0, 1]")
        if self.name == "ewc" and not 0 < self.ewc_strength < math.inf:  # written so that NaN fails too
            raise ValueError(f"method=ewc needs --ewc-strength > 0 and finite (got {self.ewc_strength}), e.g. --ewc-strength 1e4")
        if self.name != "ewc" and self.ewc_strength:
            raise ValueError(f"--ewc-strength {self.ewc_strength} needs --method ewc")
        if self.ewc_batches < 1:
            raise ValueError(f"ewc_batches={self.ewc_batches} must be at least 1")
        if not 0 <= self.early_stop <= 1:
            raise ValueError(f"--early-stop {self.early_stop} must be an accuracy in [0, 1] (0 = off)")
