"""The run directory every command writes: resolved config, curves, results, checkpoints, plots.

Guards against losing work: an existing run is never overwritten without ``--overwrite`` (and a folder that is not a
run, one without ``config.json``, never), and
``--resume`` only continues a run whose saved configuration is identical. Each start and resume also
records the environment (``environment.json``: library versions, devices, code commit, command).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from forgetlab.utils.environment import record_environment
from forgetlab.utils.io import atomic_write_json, from_jsonable, read_json, to_jsonable

CONFIG = "config.json"


def prepare_run_dir(out: Path, cfg, *, resume: bool, overwrite: bool,
                    log: Callable[[str], None] = print) -> Path:
    """Create or reopen ``out``, write the resolved config and record the environment there; raise
    ValueError on a conflict. A resume under other library versions, devices or code is logged."""
    out = Path(out)
    if resume and overwrite:
        raise ValueError("--resume and --overwrite contradict each other; pass only one")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a directory; choose another path")
    if resume:
        if not (out / CONFIG).is_file():
            raise ValueError(f"--resume: no run to resume at {out} (no {CONFIG}); drop --resume to start one")
        check_same_config(out, cfg, "--resume: ")
        changed = record_environment(out, resumed=True)
        if changed:
            log(f"note: resuming {out} in another environment than it started in ({'; '.join(changed)}); "
                "its results may differ from an uninterrupted run's (environment.json)")
        return out
    if replaceable(out, overwrite, CONFIG, "a forgetlab run",
                   f"run directory {out} already exists; pass --resume to continue it or --overwrite to replace it"):
        shutil.rmtree(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"cannot write to --out {out} ({err.strerror}); choose a writable directory") from None
    atomic_write_json(out / CONFIG, cfg)
    record_environment(out)
    return out


def replaceable(out: Path, overwrite: bool, marker: str, kind: str, refusal: str) -> bool:
    """Whether ``out`` holds an output to replace. A folder with files is refused without ``--overwrite`` (the
    ``refusal``, so two outputs never mix in one folder), and with it unless it holds ``marker``, the file that
    makes it ``kind``: --overwrite replaces what forgetlab wrote, never a folder that merely sits at --out."""
    out = Path(out)
    if not (out.is_dir() and any(out.iterdir())):
        return False
    if not overwrite:
        raise ValueError(refusal)
    if not (out / marker).is_file():
        raise ValueError(f"--overwrite: {out} holds files but no {marker}, so it is not {kind} and is left as it is; "
                         "choose a new or empty --out")
    return True


def check_same_config(out: Path, cfg, context: str = "") -> None:
    """Refuse to go on with the run in ``out`` under another config than the one it was made with."""
    saved = read_json(Path(out) / CONFIG)
    if dataclasses.is_dataclass(cfg) and isinstance(saved, dict):
        try:  # a setting added to forgetlab since the run started reads as its default: the run can still resume
            saved = json.loads(json.dumps(to_jsonable(from_jsonable(type(cfg), saved))))
        except (TypeError, ValueError, KeyError):
            pass  # not this config's shape: compared as saved, and refused below
    wanted = json.loads(json.dumps(to_jsonable(cfg)))
    if saved == wanted:
        return
    if not isinstance(saved, dict) or len(set(saved) & set(wanted)) < len(wanted) / 2:
        raise ValueError(f"{context}{out} holds a run of another command (its {CONFIG} has other settings); give this "
                         "one a new --out")
    diff = config_differences(saved, wanted)
    shown = ("; ".join(f"{key}: {before!r} then, {now!r} now" for key, before, now in diff) if len(diff) <= 3 else
             f"{len(diff)} settings differ: {', '.join(key for key, _, _ in diff)}")
    raise ValueError(f"{context}the run at {out} was made with a different config ({shown}); use the same options or "
                     "a new --out")


def config_differences(saved: dict, wanted: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """(dotted key, saved value, wanted value) for every setting that differs, nested settings by their own key
    (``train.epochs``, not ``train``)."""
    out = []
    for key in sorted(set(saved) | set(wanted)):
        before, now = saved.get(key), wanted.get(key)
        if isinstance(before, dict) and isinstance(now, dict):
            out += config_differences(before, now, f"{prefix}{key}.")
        elif before != now:
            out.append((f"{prefix}{key}", before, now))
    return out


def record_api_run(out: Path, cfg) -> None:
    """For runs started from Python rather than the CLI: write the resolved config and the environment
    beside the results unless ``prepare_run_dir`` already did; a run of another config there is refused."""
    out = Path(out)
    if (out / CONFIG).is_file():
        check_same_config(out, cfg)
    else:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / CONFIG, cfg)
        record_environment(out)


def publish_checkpoint(src: Path, dst: Path) -> None:
    """Put a cached phase checkpoint into the run directory (hard links when possible, else copies)."""
    tmp = dst.with_name(dst.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)

    def link_or_copy(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src, tmp, copy_function=link_or_copy)
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(tmp, dst)
