"""What a run was computed with: library versions, machine, code commit and command, kept beside its results.

The same code, config and seed can give another model under another torch or transformers build (kernels,
compilation and defaults change between releases), so a result is only reproducible together with the
environment that produced it. Every start and every ``--resume`` of a run appends one entry to
``environment.json``; a resume under different versions is reported, since its result may then differ
from an uninterrupted run's.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from forgetlab.utils.io import atomic_write_json, read_json

ENVIRONMENT = "environment.json"
PACKAGES = ("forgetlab", "torch", "transformers", "tokenizers", "peft", "accelerate", "safetensors", "numpy",
            "rouge-score")
# what can change a run's numbers; time, command and thread count are recorded but not compared
COMPARED = ("python", "packages", "devices", "source")


def package_versions(names=PACKAGES) -> dict[str, str | None]:
    """Installed distribution versions (None where a package is not installed)."""
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def source_commit(path: Path | None = None) -> dict | None:
    """The git commit of the checkout the forgetlab code runs from, and whether it has uncommitted changes;
    None for an installed (non-checkout) copy or where git is missing."""
    path = Path(path or __file__).resolve().parent
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()

        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty}


def devices() -> list[str]:
    """The accelerators torch sees (their names), or the CPU's description."""
    import torch

    if torch.cuda.is_available():
        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return [f"cpu: {_cpu_model()}, {os.cpu_count()} cores"]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    """One entry of ``environment.json``: this process's environment."""
    import torch

    return {
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": [_program(), *sys.argv[1:]],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": package_versions(),
        "source": source_commit(),
        "devices": devices(),
        "cuda": torch.version.cuda,
        "torch_threads": torch.get_num_threads(),
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
    }


def _program() -> str:
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    return "forgetlab" if name == "__main__.py" and "forgetlab" in Path(sys.argv[0]).parts else name


def differences(first: dict, now: dict) -> list[str]:
    """What differs between two entries in the fields that can change results, as 'field: old -> new'."""
    changed = []
    for key in COMPARED:
        old, new = first.get(key), now.get(key)
        if isinstance(old, dict) and isinstance(new, dict) and key == "packages":
            changed += [f"{name} {old.get(name)} -> {new.get(name)}" for name in sorted(set(old) | set(new))
                        if old.get(name) != new.get(name)]
        elif old != new:
            changed.append(f"{key} {old} -> {new}")
    return changed


def record_environment(out: Path, *, resumed: bool = False, entry: dict | None = None) -> list[str]:
    """Append this process's environment to ``out/environment.json`` (atomically); return what differs from
    the run's first entry (empty for a new run or an unchanged environment)."""
    path = Path(out) / ENVIRONMENT
    entry = dict(entry or environment(), resumed=resumed)
    runs = read_json(path)["runs"] if path.is_file() else []
    atomic_write_json(path, {"runs": [*runs, entry]})
    return differences(runs[0], entry) if runs else []
