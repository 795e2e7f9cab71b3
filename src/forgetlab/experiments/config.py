"""The resolved configuration of one biography experiment, saved beside its results."""

from __future__ import annotations

from dataclasses import dataclass, field

from forgetlab.methods import MethodConfig
from forgetlab.models.build import ModelConfig
from forgetlab.train.trainer import PhaseConfig
from forgetlab.worlds.biography import BiographyWorldConfig


@dataclass(frozen=True)
class EvalConfig:
    """Step-wise evaluations use a fixed seeded subset; phase-end numbers use every question."""

    max_questions: int = field(default=600, metadata={"help": "questions per task at step-wise evaluations"})
    batch_size: int = field(default=512, metadata={"help": "questions decoded together"})


@dataclass(frozen=True)
class BiographyRunConfig:
    """World, model, the phases (pretrain, task 0, tasks 1..N, recovery) and the continual method."""

    preset: str = "custom"
    seed: int = 0
    world: BiographyWorldConfig = field(default_factory=BiographyWorldConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    block_size: int = 128
    pretrain: PhaseConfig = field(default_factory=PhaseConfig)
    task0: PhaseConfig = field(default_factory=PhaseConfig)
    task: PhaseConfig = field(default_factory=PhaseConfig)
    recovery: PhaseConfig = field(default_factory=PhaseConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    snapshot_steps: tuple[int, ...] = field(default=(), metadata={"help": "task-k steps saved as checkpoints/taskK-stepN"})

    def validate(self) -> None:
        self.world.validate()
        if self.world.n_new_tasks < 1:
            raise ValueError(f"world.n_new_tasks={self.world.n_new_tasks}: a run learns at least one new task after task 0; "
                             "use 1 or more (`biography generate` writes a world without new tasks)")
        if self.world.n_task0_train < 2:
            raise ValueError(f"task 0 has {self.world.n_task0_train} training person; recovery re-aligns on half of them, so "
                             "it needs at least 2: raise world.n_pretrain_people or world.task0_train_fraction")
        self.model.validate()
        if not self.model.checkpoint and not 8 <= self.block_size <= self.model.max_positions:
            raise ValueError(f"block_size={self.block_size} must be in 8..model.max_positions={self.model.max_positions}")
        for name in ("pretrain", "task0", "task", "recovery"):
            getattr(self, name).validate(name)
        self.method.validate(self.model.n_layers if not self.model.checkpoint else 10**6)
        if any(not isinstance(s, int) or s < 1 for s in self.snapshot_steps):
            raise ValueError(f"snapshot_steps={list(self.snapshot_steps)} must be positive step numbers")
        if self.eval.max_questions < 1 or self.eval.batch_size < 1:
            raise ValueError(f"eval.max_questions={self.eval.max_questions} and eval.batch_size={self.eval.batch_size} must be >= 1")
