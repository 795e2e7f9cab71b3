"""Phases cached by the hash of the configuration that produced them.

A phase (pretraining, task 0, task k, a recovery) is stored under ``<cache>/<name>-<hash>/`` as a
normal HF checkpoint plus its evaluation rows. A second run that differs only in a later phase (say,
the task-1 method) finds the earlier phases there and loads them instead of retraining. A phase that
was killed keeps its resumable state in the same folder and continues from it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from forgetlab.models.build import load_model
from forgetlab.train import distributed
from forgetlab.train.checkpoints import save_model_dir
from forgetlab.utils.io import atomic_write_json, read_json


def default_cache_dir() -> Path:
    return Path(os.environ.get("FORGETLAB_CACHE", Path.home() / ".cache" / "forgetlab"))


@dataclass
class CachedPhase:
    model: object
    rows: list[dict]
    info: dict
    model_dir: Path


class PhaseStore:
    def __init__(self, root: Path, log: Callable[[str], None] = print):
        self.root = Path(root)
        self.log = log

    def folder(self, name: str, key: str) -> Path:
        return self.root / f"{name}-{key}"

    def run(self, name: str, key: str, train: Callable[[Path], tuple[object, list[dict], dict]], tokenizer) -> CachedPhase:
        """Load phase ``name`` from the cache, or call ``train(state_dir) -> (model, rows, info)`` and store it."""
        folder = self.folder(name, key)
        done = folder / "done.json"
        if done.is_file():
            record = read_json(done)
            self.log(f"[{name}] cached ({folder})")
            return CachedPhase(load_model(folder / "model"), record["rows"], record["info"], folder / "model")
        work = folder / "work"
        work.mkdir(parents=True, exist_ok=True)
        model, rows, info = train(work)
        if distributed.is_main():  # several processes: one writes, the others wait until they can read it
            save_model_dir(model, tokenizer, folder / "model")
            atomic_write_json(done, {"name": name, "key": key, "rows": rows, "info": info})
            shutil.rmtree(work, ignore_errors=True)
        distributed.barrier()
        return CachedPhase(model, rows, info, folder / "model")
