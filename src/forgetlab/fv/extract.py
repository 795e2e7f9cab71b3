"""From a model and a task to its function vector: mean activations, CIE, top heads, vector.

``extract_function_vector`` is the API behind ``forgetlab fv extract``; ``FunctionVectorResult``
is what it writes (``fv.json`` + ``fv.safetensors`` + ``cie_heatmap.png``) and reads back.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from forgetlab.fv.cie import ENGINES, causal_indirect_effect, mean_head_activations
from forgetlab.fv.prompts import batches
from forgetlab.fv.tasks import ICLTask, PromptFormat, counterfactuals, sample_prompts
from forgetlab.fv.vectors import Head, function_vector, top_heads
from forgetlab.models.adapter import ModelAdapter
from forgetlab.utils.io import atomic_path, atomic_write_json, file_sha256, read_json


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
    architecture: str = ""          # the model's class; "" in files saved before it was recorded

    @property
    def cie(self) -> torch.Tensor:
        return self.cie_per_prompt.mean(0)

    def save(self, out: str | Path) -> None:
        from forgetlab.report.fv import plot_cie_heatmap

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {"mean_activations": self.mean_activations.contiguous(), "function_vector": self.vector.contiguous(),
                   "cie_per_prompt": self.cie_per_prompt.contiguous()}
        digest = save_tensors(tensors, out / "fv.safetensors")
        # fv.json goes last and names the tensors it belongs with: a kill between the two files is caught on load
        atomic_write_json(out / "fv.json", {
            "tensors_sha256": digest,
            "task": self.task, "model": self.model, "architecture": self.architecture, "engine": self.settings.engine,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads, "head_dim": self.head_dim, "cie": self.cie.tolist(),
            "top_heads": [list(h) for h in self.top_heads], "seconds": self.seconds, "settings": asdict(self.settings)})
        plot_cie_heatmap(self.cie, self.top_heads, out / "cie_heatmap.png", title=f"{self.task}: CIE ({self.settings.engine})")

    def check_fits(self, adapter: ModelAdapter, where: str = "the function vector") -> None:
        """One clear error when the FV was extracted from a model of another shape or class (it cannot be added here;
        Mistral-7B and Llama-2-7B share every size)."""
        ours = (self.n_layers, self.n_heads, self.head_dim, self.vector.numel())
        theirs = (adapter.n_layers, adapter.n_heads, adapter.head_dim, adapter.hidden_size)
        if ours != theirs:
            raise ValueError(f"{where} was extracted from a model with {ours[0]} layers x {ours[1]} heads of {ours[2]} and "
                             f"hidden size {ours[3]}{f' ({self.model})' if self.model else ''}; this model has {theirs[0]} x "
                             f"{theirs[1]} heads of {theirs[2]} and hidden size {theirs[3]}: extract it again on this model "
                             "with `forgetlab fv extract`")
        if self.architecture and self.architecture != adapter.architecture:
            raise ValueError(f"{where} was extracted from a {self.architecture}{f' ({self.model})' if self.model else ''}; "
                             f"this model is a {adapter.architecture}: extract it again on this model with "
                             "`forgetlab fv extract`")

    @classmethod
    def load(cls, out: str | Path) -> "FunctionVectorResult":
        out = Path(out)
        if not (out / "fv.json").is_file() or not (out / "fv.safetensors").is_file():
            raise FileNotFoundError(f"{out} holds no fv.json and fv.safetensors; run `forgetlab fv extract --out {out}` first")
        again = f"run `forgetlab fv extract --out {out}` again"
        meta = read_json(out / "fv.json")
        _check_fv_json(meta, out / "fv.json", again)
        # absent in files saved before it was recorded
        check_tensors(out / "fv.safetensors", meta.get("tensors_sha256"), out / "fv.json", again)
        try:
            tensors = load_file(str(out / "fv.safetensors"))
        except SafetensorError as err:  # a corrupt file saved before its digest was recorded
            raise ValueError(f"{out}/fv.safetensors cannot be read ({' '.join(str(err).split())[:120]}); {again}") from None
        missing = sorted({"cie_per_prompt", "mean_activations", "function_vector"} - set(tensors))
        if missing:
            raise ValueError(f"{out}/fv.safetensors lacks {', '.join(missing)}; {again}")
        settings = dict(meta["settings"])
        settings["prompt_format"] = PromptFormat(**settings["prompt_format"])
        return cls(task=meta["task"], settings=FVSettings(**settings), n_layers=meta["n_layers"], n_heads=meta["n_heads"],
                   head_dim=meta["head_dim"], cie_per_prompt=tensors["cie_per_prompt"],
                   top_heads=[tuple(h) for h in meta["top_heads"]], mean_activations=tensors["mean_activations"],
                   vector=tensors["function_vector"], seconds=meta["seconds"], model=meta.get("model", ""),
                   architecture=meta.get("architecture", ""))


# what FunctionVectorResult.load reads from fv.json; "model", "architecture" and "tensors_sha256" may be absent (files saved before
# they were recorded), and entries it does not read ("engine", "cie", notes someone added) are left alone
_FV_REQUIRED = ("task", "n_layers", "n_heads", "head_dim", "top_heads", "seconds", "settings")


def _check_fv_json(meta, path: Path, again: str) -> None:
    """One clear error (ValueError) for an fv.json that is not what :meth:`FunctionVectorResult.save` writes
    (edited by hand, cut short, from another program): an entry missing or of the wrong kind, or a setting this
    version does not know. An absent setting takes its default, as in files saved before the setting existed."""
    def refuse(what: str):
        raise ValueError(f"{path} is not an fv.json as `forgetlab fv extract` writes it ({what}); {again}")

    if not isinstance(meta, dict):
        refuse(f"it holds a JSON {type(meta).__name__}, not an object")
    if missing := [k for k in _FV_REQUIRED if k not in meta]:
        refuse(f"no {', '.join(missing)}")
    settings = meta["settings"]
    if not isinstance(settings, dict) or not isinstance(settings.get("prompt_format"), dict):
        refuse("settings is not an object with a prompt_format object")
    for name, cls, given in (("settings", FVSettings, settings),
                             ("settings.prompt_format", PromptFormat, settings["prompt_format"])):
        if unknown := sorted(set(given) - {f.name for f in fields(cls)}):
            refuse(f"unknown {name} entries {', '.join(unknown)}")
    whole = all(isinstance(meta[k], int) and not isinstance(meta[k], bool) for k in ("n_layers", "n_heads", "head_dim"))
    heads = isinstance(meta["top_heads"], list) and all(isinstance(h, list) and len(h) == 2 for h in meta["top_heads"])
    if not (whole and heads and isinstance(meta["task"], str) and isinstance(meta["seconds"], (int, float))):
        refuse("task, n_layers, n_heads, head_dim, top_heads or seconds is not of the kind it writes")


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> str:
    """Write ``tensors`` to ``path`` atomically and return the file's sha256, for the JSON that goes with it.

    The JSON is written after the tensors and names them by this digest, so :func:`check_tensors` catches a
    tensors file that is not the one its JSON was saved with (a kill between the two writes, another run's file).
    """
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))
        return file_sha256(tmp)


def check_tensors(path: Path, digest: str | None, json_path: Path, fix: str) -> None:
    """Refuse ``path`` unless it is the tensors file ``json_path`` recorded as ``digest`` (None: not recorded)."""
    if digest is not None and file_sha256(path) != digest:
        raise ValueError(f"{path} is not the file {json_path} was saved with (a save was interrupted, or another run "
                         f"wrote it); {fix}")


def load_universal_fvs(out: str | Path) -> dict[str, torch.Tensor]:
    """Each task's FV over the universal heads, as ``forgetlab fv universal --model`` wrote it to ``out``, checked
    against the digest universal.json recorded (tensors of another run beside it are refused)."""
    out = Path(out)
    again = f"run `forgetlab fv universal ... --model DIR --out {out}` again"
    if not (out / "universal.json").is_file():
        raise FileNotFoundError(f"{out} holds no universal.json; {again}")
    meta = read_json(out / "universal.json")
    if not isinstance(meta, dict):
        raise ValueError(f"{out}/universal.json is not a JSON object; {again}")
    if "tensors_sha256" in meta and meta["tensors_sha256"] is None:  # absent in files saved before it was recorded
        raise FileNotFoundError(f"{out}/universal.json was written without --model, so it has no FVs; {again}")
    if not (out / "universal_fvs.safetensors").is_file():
        raise FileNotFoundError(f"{out} holds no universal_fvs.safetensors beside its universal.json; {again}")
    check_tensors(out / "universal_fvs.safetensors", meta.get("tensors_sha256"), out / "universal.json", again)
    return load_file(str(out / "universal_fvs.safetensors"))


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
                                vector=function_vector(adapter, mean_acts, heads), seconds=seconds, model=model_name,
                                architecture=adapter.architecture)
