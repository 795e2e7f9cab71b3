"""Mean and spread over seeds: runs that differ only in their seed are one setting.

The papers report averages over seeds (the FV paper 4, ours 3 for the biography world); this reads the
``results.json`` of finished runs of either experiment, groups the runs whose configuration is the same
but for the seed, and gives every number of the results per group as mean, sample standard deviation
and the values themselves.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from forgetlab.report.markdown import table
from forgetlab.utils.io import atomic_write_json, atomic_write_text, read_json

# the numbers a person looks at first, per experiment, in the order of its tables
HEADLINES = {
    "cit": (("initial.GP", "GP initial"), ("final.GP", "GP final"), ("initial.IP", "IP initial"), ("final.IP", "IP final"),
            ("AP", "AP"), ("FP", "FP"), ("forget", "forget")),
    "biography": (("task0_before", "task 0 before"), ("task0_min_during_task1", "lowest during task 1"),
                  ("task0_after_task1", "task 0 after task 1"), ("task1_after", "task 1"),
                  ("task0_recovered", "recovered"), ("task0_recovery_control", "control"),
                  ("spurious_share", "spurious share")),
}


def results_file(path: Path) -> Path:
    """A run directory's results.json, or the results file given; one line if neither exists."""
    path = Path(path)
    found = path / "results.json" if path.is_dir() else path
    if not found.is_file():
        raise FileNotFoundError(f"{path} is neither a finished run directory (no results.json) nor a results file")
    return found


def _flat(d: dict, prefix: str = "") -> dict:
    """Nested dicts as one level, keys joined with dots (``train.lr``)."""
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _numbers(results: dict) -> dict[str, float | None]:
    """Every number of a results dict, nested keys joined with dots (lists, e.g. the score matrix, left out);
    None where a run left a metric undefined (null), so that values stay aligned with the runs."""
    return {k: None if v is None else float(v) for k, v in _flat(results).items()
            if (v is None or isinstance(v, (int, float)) and not isinstance(v, bool)) and k not in ("seed", *RESULT_SETTINGS)}


# settings a biography run's results.json records beside its metrics (a method's strength is not a metric to average)
RESULT_SETTINGS = ("freeze_layers", "replay", "early_stop", "ewc_strength")


def _setting(results_file: Path, results: dict) -> dict:
    """What a run was: its ``config.json`` when it has one beside the results, otherwise the results' own labels
    (method, preset, FVG, tasks, and the method settings they record)."""
    config = results_file.parent / "config.json"
    if config.is_file():
        return _flat(read_json(config))
    return {k: v for k, v in results.items() if isinstance(v, (str, bool)) or k in ("tasks", *RESULT_SETTINGS)}


def _seed_keys(runs: list[tuple[dict, dict]]) -> set[str]:
    """The setting keys that are the seed: ``seed`` itself and every nested ``*.seed`` that equals the run's seed in
    all runs (``biography run --seed`` also seeds the world with it). A nested seed held fixed while ``seed`` varies
    stays part of the setting."""
    keys = {k for setting, _ in runs for k in setting if k == "seed" or k.endswith(".seed")}
    return {k for k in keys if k == "seed" or all(setting.get(k) == results.get("seed") for setting, results in runs)}


def _label(setting: dict, varying: set[str]) -> str:
    keys = [k for k in ("method", "fvg") if k in setting] + sorted(varying - {"method", "fvg"})
    parts = []
    for key in keys:
        value = setting.get(key)
        parts.append(("FVG" if value else "") if key == "fvg" else f"{key}={value}" if key != "method" else str(value))
    return " ".join(p for p in parts if p) or "all runs"


def aggregate_runs(paths: Sequence[Path]) -> dict:
    """``{"experiment", "groups": [{"label", "setting", "runs", "seeds", "n", "metrics": {name: {mean, sd, n, values}}}]}``;
    ``values`` follow ``runs`` (None where a run left the metric undefined); mean and sd are over the defined
    values, whose count is the metric's ``n``; sd is the sample standard deviation (n − 1), None below two."""
    if not paths:
        raise ValueError("aggregate needs at least one run directory or results.json")
    runs, kinds = [], set()
    for path in paths:
        found = results_file(path)
        results = read_json(found)
        kinds.add("cit" if "R" in results and "AP" in results else "biography" if "task0_before" in results else "other")
        runs.append((_setting(found, results), results))
    if len(kinds) > 1:
        raise ValueError(f"aggregate: the runs come from different experiments ({', '.join(sorted(kinds))}); "
                         "aggregate one experiment at a time")
    seed_keys = _seed_keys(runs)
    groups: dict[str, dict] = {}
    for path, (full_setting, results) in zip(paths, runs):
        setting = {k: v for k, v in full_setting.items() if k not in seed_keys}
        group = groups.setdefault(repr(sorted(setting.items())), {"setting": setting, "runs": [], "seeds": [], "values": {}})
        group["runs"].append(str(path))
        group["seeds"].append(results.get("seed"))
        for name, value in _numbers(results).items():
            group["values"].setdefault(name, [None] * (len(group["runs"]) - 1)).append(value)
        for values in group["values"].values():  # a metric this run lacks is None for it
            values.extend([None] * (len(group["runs"]) - len(values)))
    for group in groups.values():  # one seed twice: two settings the files cannot tell apart (no config.json beside)
        repeated = sorted({s for s in group["seeds"] if group["seeds"].count(s) > 1}, key=str)
        if repeated:
            raise ValueError(f"aggregate: {', '.join(group['runs'])} look like one setting but repeat seed "
                             f"{', '.join(map(str, repeated))}, so they differ in a setting their results do not record; "
                             "keep each run's config.json beside its results.json, or aggregate them separately")
    settings = [g["setting"] for g in groups.values()]
    varying = {k for s in settings for k in s if any(o.get(k) != s.get(k) for o in settings)}
    out = []
    for group in groups.values():
        metrics = {}
        for name, values in group["values"].items():
            defined = [v for v in values if v is not None and not math.isnan(v)]
            n = len(defined)
            mean = sum(defined) / n if n else None
            sd = math.sqrt(sum((v - mean) ** 2 for v in defined) / (n - 1)) if n > 1 else None
            metrics[name] = {"mean": mean, "sd": sd, "n": n, "values": values}
        out.append({"label": _label(group["setting"], varying), "setting": group["setting"], "runs": group["runs"],
                    "seeds": group["seeds"], "n": len(group["runs"]), "metrics": metrics})
    return {"experiment": kinds.pop(), "groups": out}


def write_aggregate(summary: dict, out: Path) -> None:
    """``aggregate.json`` and ``aggregate.md`` (the headline numbers as mean ± sd, one row per setting)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "aggregate.json", summary)
    headlines = HEADLINES.get(summary["experiment"], ())
    digits = 1 if summary["experiment"] == "cit" else 3

    def cell(group: dict, name: str) -> str:
        m = group["metrics"].get(name)
        if m is None or m["mean"] is None:
            return "-"
        text = f"{m['mean']:.{digits}f}" + (f" ± {m['sd']:.{digits}f}" if m["sd"] is not None else "")
        return text + (f" (n={m['n']})" if m["n"] < group["n"] else "")  # some runs left it undefined

    rows = [(g["label"], g["n"], ", ".join(str(s) for s in g["seeds"]), *(cell(g, k) for k, _ in headlines))
            for g in summary["groups"]]
    text = (f"# {summary['experiment']} runs: mean ± sample standard deviation over seeds\n\n"
            + table(["setting", "runs", "seeds", *(label for _, label in headlines)], rows)
            + "\nEvery number of the runs' results, per setting: `aggregate.json`.\n")
    atomic_write_text(out / "aggregate.md", text)
