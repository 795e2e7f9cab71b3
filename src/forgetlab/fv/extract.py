"""From a model and a task to its function vector: mean activations, CIE, top heads, vector.

``extract_function_vector`` is the API behind ``forgetlab fv extract``; ``FunctionVectorResult``
is what it writes (``fv.json`` + ``fv.safetensors`` + ``cie_heatmap.png``) and reads back.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from forgetlab.fv.cie import ENGINES, causal_indirect_effect, mean_head_activations
from forgetlab.fv.prompts import batches
from forgetlab.fv.tasks import ICLTask, PromptFormat, counterfactuals, sample_prompts
from forgetlab.fv.vectors import Head, function_vector, top_heads
from forgetlab.models.adapter import ModelAdapter
from forgetlab.utils.io import atomic_path, atomic_write_json, read_json


@dataclass(frozen=True)
class FVSettings:
    """How a function vector is extracted (defaults of Todd et al.: 100 mean prompts, 25 CIE prompts)."""

    engine: str = field(default="exact", metadata={"help": "exact | naive | attribution"})
    n_prompts: int = field(default=100, metadata={"help": "clean prompts averaged for the mean head activations"})
    n_cie_prompts: int = field(default=25, metadata={"help": "counterfactual prompts the CIE is averaged over"})
    shots: int = field(default=10, metadata={"help": "demonstrations per prompt"})
    top_k: int = field(default=10, metadata={"help": "heads that make up the function vector"})
    seed: int = field(default=0, metadata={"help": "splits, demonstrations and label shuffles"})
    batch_size: int = field(default=16, metadata={"help": "prompts per forward pass"})
    max_rows: int = field(default=8192, metadata={"help": "exact engine: rows (prompt x head patches) per step"})
    prompt_format: PromptFormat = field(default_factory=PromptFormat)

    def validate(self, adapter: ModelAdapter) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"unknown CIE engine {self.engine!r}; use one of {', '.join(ENGINES)}")
        for name in ("n_prompts", "n_cie_prompts", "batch_size", "max_rows"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        if self.shots < 2:
            raise ValueError(f"shots={self.shots}: the CIE shuffles the demonstrations' answers, which takes at least 2 "
                             "demonstrations per prompt; use --shots 2 or more (10 is the papers')")
        total = adapter.n_layers * adapter.n_heads
        if not 1 <= self.top_k <= total:
            raise ValueError(f"top-k={self.top_k} is out of range: the model has {total} heads "
                             f"({adapter.n_layers} layers x {adapter.n_heads}); choose 1..{total}")


@dataclass
class FunctionVectorResult:
    task: str
    settings: FVSettings
    n_layers: int
    n_heads: int
    head_dim: int
    cie_per_prompt: torch.Tensor    # (n_cie_prompts, L, H)
    top_heads: list[Head]
    mean_activations: torch.Tensor  # (L, H, head_dim)
    vector: torch.Tensor            # (hidden,)
    seconds: float                  # the CIE computation alone
    model: str = ""

    @property
    def cie(self) -> torch.Tensor:
        return self.cie_per_prompt.mean(0)

    def save(self, out: str | Path) -> None:
        from forgetlab.report.fv import plot_cie_heatmap

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {"mean_activations": self.mean_activations.contiguous(), "function_vector": self.vector.contiguous(),
                   "cie_per_prompt": self.cie_per_prompt.contiguous()}
        with atomic_path(out / "fv.safetensors") as tmp:
            save_file(tensors, str(tmp))
            digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
        # fv.json goes last and names the tensors it belongs with: a kill between the two files is caught on load
        atomic_write_json(out / "fv.json", {
            "tensors_sha256": digest,
            "task": self.task, "model": self.model, "engine": self.settings.engine, "n_layers": self.n_layers,
            "n_heads": self.n_heads, "head_dim": self.head_dim, "cie": self.cie.tolist(),
            "top_heads": [list(h) for h in self.top_heads], "seconds": self.seconds, "settings": asdict(self.settings)})
        plot_cie_heatmap(self.cie, self.top_heads, out / "cie_heatmap.png", title=f"{self.task}: CIE ({self.settings.engine})")

    def check_fits(self, adapter: ModelAdapter, where: str = "the function vector") -> None:
        """One clear error when the FV was extracted from a model of another shape (it cannot be added here)."""
        ours = (self.n_layers, self.n_heads, self.head_dim, self.vector.numel())
        theirs = (adapter.n_layers, adapter.n_heads, adapter.head_dim, adapter.hidden_size)
        if ours != theirs:
            raise ValueError(f"{where} was extracted from a model with {ours[0]} layers x {ours[1]} heads of {ours[2]} and "
                             f"hidden size {ours[3]}{f' ({self.model})' if self.model else ''}; this model has {theirs[0]} x "
                             f"{theirs[1]} heads of {theirs[2]} and hidden size {theirs[3]}: extract it again on this model "
                             "with `forgetlab fv extract`")

    @classmethod
    def load(cls, out: str | Path) -> "FunctionVectorResult":
        out = Path(out)
        if not (out / "fv.json").is_file() or not (out / "fv.safetensors").is_file():
            raise FileNotFoundError(f"{out} holds no fv.json and fv.safetensors; run `forgetlab fv extract --out {out}` first")
        meta = read_json(out / "fv.json")
        digest = meta.get("tensors_sha256")  # absent in files saved before it was recorded
        if digest is not None and hashlib.sha256((out / "fv.safetensors").read_bytes()).hexdigest() != digest:
            raise ValueError(f"{out}/fv.safetensors is not the file {out}/fv.json was saved with (a save was interrupted); "
                             f"run `forgetlab fv extract --out {out}` again")
        tensors = load_file(str(out / "fv.safetensors"))
        settings = dict(meta["settings"])
        settings["prompt_format"] = PromptFormat(**settings["prompt_format"])
        return cls(task=meta["task"], settings=FVSettings(**settings), n_layers=meta["n_layers"], n_heads=meta["n_heads"],
                   head_dim=meta["head_dim"], cie_per_prompt=tensors["cie_per_prompt"],
                   top_heads=[tuple(h) for h in meta["top_heads"]], mean_activations=tensors["mean_activations"],
                   vector=tensors["function_vector"], seconds=meta["seconds"], model=meta.get("model", ""))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def extract_function_vector(adapter: ModelAdapter, tokenizer, task: ICLTask, settings: FVSettings = FVSettings(),
                            progress: bool = False, model_name: str = "") -> FunctionVectorResult:
    """Mean activations over clean prompts, CIE over shuffled-label prompts, top-K heads, the vector."""
    settings.validate(adapter)
    splits = task.splits(settings.seed)
    fmt, device = settings.prompt_format, next(adapter.model.parameters()).device
    clean = sample_prompts(splits, settings.n_prompts, settings.shots, settings.seed, task_name=task.name)
    cie_clean = sample_prompts(splits, settings.n_cie_prompts, settings.shots, settings.seed + 1, task_name=task.name)
    shuffled = counterfactuals(cie_clean, settings.seed)
    mean_acts = mean_head_activations(adapter, batches(tokenizer, clean, fmt, settings.batch_size, device), progress)
    cf_batches = list(batches(tokenizer, shuffled, fmt, settings.batch_size, device))
    _sync(device)
    start = time.perf_counter()
    cie = causal_indirect_effect(adapter, cf_batches, mean_acts, settings.engine, settings.max_rows, progress)
    _sync(device)
    seconds = time.perf_counter() - start
    heads = top_heads(cie, settings.top_k)
    return FunctionVectorResult(task=task.name, settings=settings, n_layers=adapter.n_layers, n_heads=adapter.n_heads,
                                head_dim=adapter.head_dim, cie_per_prompt=cie, top_heads=heads, mean_activations=mean_acts,
                                vector=function_vector(adapter, mean_acts, heads), seconds=seconds, model=model_name)
