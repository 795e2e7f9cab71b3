"""Atomic file output and config hashing.

Every result and checkpoint is written to a temporary sibling and renamed into place, so a run
killed at any moment leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def to_jsonable(obj: Any) -> Any:
    """Dataclasses, paths and tuples as plain JSON values; a non-finite float (an undefined metric) as null."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and hasattr(obj, "dtype") and getattr(obj, "shape", None) == ():  # numpy/torch scalars
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None  # strict JSON has no NaN/Infinity (jq, JavaScript and most parsers refuse the bare tokens)
    return obj


def config_hash(*parts: Any) -> str:
    """A short stable hash of configs, used to name cached phases."""
    blob = json.dumps([to_jsonable(p) for p in parts], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def file_sha256(path: str | Path) -> str:
    """A file's SHA-256, read in blocks: identifies content where a modification time does not (a file written
    again with the same bytes, a tensors file that must be the one its JSON was saved with)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sampled_sha256(path: str | Path, samples: int = 256, block: int = 4096) -> str:
    """SHA-256 of ``samples`` blocks spread evenly over a file (of all of it when it is that small): tells two large
    weight files apart in a few hundred reads, where hashing 13 GB would take minutes (the blocks of a model that
    differs in any sizeable share of its weights are all but certain to differ)."""
    size = Path(path).stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        if size <= samples * block:
            digest.update(fh.read())
        else:
            for i in range(samples):
                fh.seek(i * (size - block) // (samples - 1))
                digest.update(fh.read(block))
    return digest.hexdigest()


def code_fingerprint(*modules: str) -> str:
    """A short hash of the source of ``modules`` (dotted names), for cache keys: a cached result depends on
    the code that computed it as much as on its config, and a config hash alone hands back results of older code."""
    import importlib.util

    digest = hashlib.sha256()
    for name in modules:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin:
            raise ModuleNotFoundError(f"code_fingerprint: no source for module {name!r}")
        digest.update(name.encode() + b"\0" + Path(spec.origin).read_bytes())
    return digest.hexdigest()[:12]


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; on success it replaces ``path`` whole (readers never see
    half a file) with an ordinary file's mode, on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private; results are ordinary files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(to_jsonable(obj), indent=2, sort_keys=False) + "\n")


def atomic_write_jsonl(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(to_jsonable(r)) + "\n" for r in rows))


def read_json(path: str | Path) -> Any:
    """The JSON in ``path``; a file that is not JSON is named in the error (ValueError)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); restore or remove the file") from None


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def replace_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Move a fully written directory into place, replacing an older one (near-atomic).

    At every moment ``final_dir`` or ``final_dir.old`` holds a finished copy: a ``.old`` is deleted only while
    ``final_dir`` exists, so a kill between the two renames of an earlier swap leaves ``.old`` readable until
    the new directory is in place."""
    final_dir = Path(final_dir)
    old = final_dir.with_name(final_dir.name + ".old")
    if final_dir.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    if old.exists():
        shutil.rmtree(old)


def fresh_tmp_dir(final_dir: Path) -> Path:
    """An empty sibling directory to write into before :func:`replace_dir`."""
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = final_dir.with_name(final_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def from_jsonable(cls: type, data: Mapping[str, Any]) -> Any:
    """Rebuild a (nested) dataclass from :func:`to_jsonable` output; unknown keys are an error."""
    import typing

    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {sorted(unknown)}")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint) and isinstance(value, Mapping):
            value = from_jsonable(hint, value)
        elif typing.get_origin(hint) is tuple and isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


def apply_overrides(cfg: Any, assignments: Iterable[str]) -> Any:
    """``["world.full_name=false", "task.lr=1e-4"]`` -> a new config (frozen dataclasses, nested by dots).

    Values are parsed as JSON where possible (numbers, true/false, lists), else kept as strings, and
    must match the type of the field they replace; a text setting takes the text as written (``sequence=1``), a
    list setting also takes ``[a,b]`` or ``a,b``.
    """
    for item in assignments:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. --set task.lr=1e-4")
        key, raw = item.split("=", 1)
        cfg = _replace_path(cfg, key.strip().split("."), raw, key)
    return cfg


def _as_list(value: Any, current: tuple | list, full: str) -> list:
    """A list setting from JSON (``["q_proj","v_proj"]``) or the shell-friendly ``[q_proj,v_proj]`` / ``q_proj,v_proj``."""
    if isinstance(value, str):
        value = [_scalar(v.strip()) for v in value.strip().removeprefix("[").removesuffix("]").split(",") if v.strip()]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]
    kinds = {type(v) for v in current}
    if float in kinds and isinstance(value, list):  # 2 is a fine float
        value = [float(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value]
    if not isinstance(value, list) or not value or (kinds and any(type(v) not in kinds for v in value)):
        raise ValueError(f"--set {full}: expected a list like {list(current)!r} (e.g. {full}=[a,b]), got {value!r}")
    _check_finite(value, full)
    return value


def _check_finite(value: Any, full: str) -> None:
    """JSON's parser takes ``NaN``, ``Infinity`` and ``1e999``; no setting means them, and a check written ``x < 0``
    lets NaN through, so they stop here (a text setting keeps ``NaN`` as the text it is)."""
    for v in value if isinstance(value, list) else [value]:
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"--set {full}: {v!r} is not a finite number; give a finite value")


def _scalar(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _replace_path(obj: Any, path: list[str], raw: str, full: str) -> Any:
    names = [f.name for f in dataclasses.fields(obj)] if dataclasses.is_dataclass(obj) else []
    if not names:
        raise ValueError(f"--set {full}: {full.rsplit('.', len(path))[0]!r} is a single setting, not a group")
    if path[0] not in names:
        raise ValueError(f"--set {full}: no setting {path[0]!r} here; choose one of: {', '.join(names)}")
    current = getattr(obj, path[0])
    if len(path) > 1:
        return dataclasses.replace(obj, **{path[0]: _replace_path(current, path[1:], raw, full)})
    value = _scalar(raw)
    if isinstance(current, str) and not isinstance(value, str):  # text as written: sequence=1, template=true
        value = raw
    if dataclasses.is_dataclass(current):
        raise ValueError(f"--set {full}: {path[0]!r} is a group of settings; set one of its fields")
    if isinstance(current, (tuple, list)):
        return dataclasses.replace(obj, **{path[0]: type(current)(_as_list(value, current, full))})
    _check_finite(value, full)
    if isinstance(current, bool) != isinstance(value, bool) or (
            isinstance(current, (int, float)) and not isinstance(value, (int, float))) or (
            isinstance(current, str) and not isinstance(value, str)):
        raise ValueError(f"--set {full}: expected a value like {current!r}, got {value!r}")
    if isinstance(current, float) and isinstance(value, int):
        value = float(value)
    if isinstance(current, int) and not isinstance(current, bool) and isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"--set {full}: expected a whole number, got {value!r}")
        value = int(value)
    return dataclasses.replace(obj, **{path[0]: value})
