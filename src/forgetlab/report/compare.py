"""Continual instruction-tuning runs against a baseline run: the share of its GP and IP drops each run keeps, and
what it costs in FP.

This is how the FV paper states its result ("FVG keeps X% of IncLoRA's drop without losing FP"), and how issue
targets are phrased; computing it by hand from two ``results.json`` invites slips. The runs must start from the
same initial model on the same task sequence, or the drops are not comparable.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from forgetlab.metrics.cl import drop_kept
from forgetlab.report.aggregate import results_file
from forgetlab.report.markdown import table
from forgetlab.utils.io import atomic_write_json, atomic_write_text, read_json

KEEP = 0.5          # share of each drop a method must keep (issue target: ≥ 50% of the GP and of the IP drop)
FP_TOLERANCE = 5.0  # points of FP it may lose against the baseline
FORGETS = 10.0      # points of GP and IP the baseline must drop for forgetting to count as reproduced


def _cit_results(path: Path) -> dict:
    found = results_file(path)
    results = read_json(found)
    missing = [k for k in ("initial", "final", "FP", "AP", "tasks") if k not in results]
    if missing:
        raise ValueError(f"{found} is not the results of a `forgetlab cit run` (no {', '.join(missing)})")
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
    bad = [f"{part}.{m}" for part in ("initial", "final") for m in ("GP", "IP")
           if not isinstance(results[part], dict) or not number(results[part].get(m))]
    bad += [k for k in ("FP", "AP") if not number(results[k])]
    if bad:
        raise ValueError(f"{found} has no number for {', '.join(bad)}; compare finished `forgetlab cit run` results with "
                         "general sets (GP/IP)")
    return results


def _none(value: float) -> float | None:
    return None if math.isnan(value) else value


def compare_runs(baseline: Path, runs: Sequence[Path], keep: float = KEEP, fp_tolerance: float = FP_TOLERANCE) -> dict:
    """Each run against ``baseline``: its GP/IP drops, the share of the baseline's drops it keeps (``drop_kept``), its
    FP change, and ``target_met`` (both shares ≥ ``keep``, FP at most ``fp_tolerance`` below the baseline's; None when
    the baseline does not drop)."""
    if not runs:
        raise ValueError("compare needs at least one run besides the baseline")
    if not 0 < keep <= 1:
        raise ValueError(f"--keep {keep:g}: a share of the drop, in (0, 1] (the target: 0.5)")
    if not 0 <= fp_tolerance < math.inf:
        raise ValueError(f"--fp-tolerance {fp_tolerance:g}: points of FP a run may lose, a finite 0 or more (the target: 5)")
    base = _cit_results(baseline)

    def drops(results: dict) -> tuple[float, float]:
        return (results["initial"]["GP"] - results["final"]["GP"], results["initial"]["IP"] - results["final"]["IP"])

    base_gp, base_ip = drops(base)
    rows = []
    for path in runs:
        results = _cit_results(path)
        if results["tasks"] != base["tasks"]:
            raise ValueError(f"{path} trained the sequence {results['tasks']}, the baseline {base['tasks']}; compare runs "
                             "of one sequence")
        # 1e-4 of a point: runs of one model agree to rounding (scores once float32 means differ by ~1e-6), another
        # model or general set differs by at least a query of one task (~0.1 point)
        if any(abs(results["initial"][m] - base["initial"][m]) > 1e-4 for m in ("GP", "IP")):
            raise ValueError(f"{path} starts from GP/IP {results['initial']['GP']:.1f}/{results['initial']['IP']:.1f}, "
                             f"the baseline from {base['initial']['GP']:.1f}/{base['initial']['IP']:.1f}: not the same "
                             "initial model (or not the same general sets); compare runs of one model")
        gp, ip = drops(results)
        kept_gp, kept_ip = _none(drop_kept(base_gp, gp)), _none(drop_kept(base_ip, ip))
        fp_change = results["FP"] - base["FP"]
        met = None if kept_gp is None or kept_ip is None else (
            kept_gp >= keep and kept_ip >= keep and fp_change >= -fp_tolerance)
        rows.append({"run": str(path), "method": results.get("method"), "fvg": results.get("fvg"), "GP_drop": gp,
                     "IP_drop": ip, "GP_drop_kept": kept_gp, "IP_drop_kept": kept_ip, "AP": results["AP"],
                     "FP": results["FP"], "FP_change": fp_change, "target_met": met})
    return {"baseline": {"run": str(baseline), "method": base.get("method"), "fvg": base.get("fvg"), "GP_drop": base_gp,
                         "IP_drop": base_ip, "AP": base["AP"], "FP": base["FP"],
                         "forgets": base_gp >= FORGETS and base_ip >= FORGETS},
            "criteria": {"keep": keep, "fp_tolerance": fp_tolerance, "forgets": FORGETS},
            "tasks": base["tasks"], "runs": rows}


def _name(run: str) -> str:
    """What a table row calls a run: its directory, also when the run was given as RUN/results.json."""
    path = Path(run)
    return path.parent.name if path.name == "results.json" else path.name


def write_comparison(summary: dict, out: Path) -> str:
    """``compare.json`` and ``compare.md`` in ``out``; returns the markdown."""
    base, crit = summary["baseline"], summary["criteria"]

    def pct(value: float | None) -> str:
        return "–" if value is None else f"{100 * value:.0f}%"

    def verdict(value: bool | None) -> str:
        return "–" if value is None else "met" if value else "not met"

    rows = [(_name(r["run"]), f"{r['GP_drop']:.1f} / {r['IP_drop']:.1f}", pct(r["GP_drop_kept"]),
             pct(r["IP_drop_kept"]), f"{r['AP']:.1f} / {r['FP']:.1f}", f"{r['FP_change']:+.1f}", verdict(r["target_met"]))
            for r in summary["runs"]]
    text = (f"# Against the baseline {_name(base['run'])}\n\n"
            f"Baseline ({base['method']}{' + FVG' if base['fvg'] else ''}): GP / IP drop {base['GP_drop']:.1f} / "
            f"{base['IP_drop']:.1f} points (forgetting {'reproduced' if base['forgets'] else 'not reproduced'}: "
            f"≥ {crit['forgets']:g} each), AP / FP {base['AP']:.1f} / {base['FP']:.1f}.\n\n"
            + table(["run", "GP / IP drop", "GP drop kept", "IP drop kept", "AP / FP", "FP change",
                     f"target (≥ {100 * crit['keep']:.0f}% of each drop kept, FP ≥ −{crit['fp_tolerance']:g})"], rows))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "compare.json", summary)
    atomic_write_text(out / "compare.md", text)
    return text
