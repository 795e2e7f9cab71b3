"""`cit analyze` end to end: FV drift and interventions of a run, resumed after kills, pooled over runs, and on
natural-instructions general sets; and what a resume checks."""

import json
from dataclasses import replace
from pathlib import Path

import pytest

from forgetlab.experiments.cit import CITConfig, run_cit
from forgetlab.experiments.cit_analysis import tasks_digest
from forgetlab.fv.tasks import ICLTask
from forgetlab.worlds.instruction_prompts import middle_cut


def test_a_general_task_edited_under_its_old_name_has_another_digest():
    """What a resumed `cit analyze` checks besides the names: the general and last tasks' contents."""
    task = ICLTask("g", (("a", "b"), ("c", "d")), "Do .")
    assert tasks_digest([task]) == tasks_digest([ICLTask("g", (("a", "b"), ("c", "d")), "Do .")])
    for other in (ICLTask("g", (("a", "b"), ("c", "e")), "Do ."), ICLTask("g", (("a", "b"), ("c", "d")), "Do it ."),
                  ICLTask("h", (("a", "b"), ("c", "d")), "Do .")):
        assert tasks_digest([other]) != tasks_digest([task])


def test_cit_analyze_of_a_run_with_general_task_files_cuts_their_long_inputs(tmp_path, tiny_llama_dir, monkeypatch):
    """`cit analyze` on a natural-instructions run: the general sets come from the task files, their FV prompts'
    inputs cut as FVG's are (110 // (3 shots + 1) = 27 tokens each), and every general task gets its drift rows."""
    from transformers import AutoTokenizer

    import forgetlab.analysis.fv_drift as fv_drift
    from forgetlab.analysis.fv_drift import DriftSettings
    from forgetlab.experiments.cit_analysis import analyze_run

    def ni(name, inputs, answer):
        (tmp_path / f"{name}.json").write_text(json.dumps({"Definition": [f"Always answer {answer}."], "Instances": [
            {"id": str(i), "input": x, "output": [answer]} for i, x in enumerate(inputs)]}))
        return tmp_path / f"{name}.json"

    seq = ni("yes", [f"question {i}" for i in range(40)], "yes")
    general = ni("long", ["question " * 60 + str(i) for i in range(40)], "no")
    cfg = CITConfig(model=str(tiny_llama_dir), sequence=str(seq), general=str(general), n_train=12, n_test=10,
                    method="seq", max_new_tokens=2, max_source_tokens=110)
    run_cit(replace(cfg, train=replace(cfg.train, epochs=1, batch_size=4, grad_accum=1)), tmp_path / "run",
            log=lambda s: None, progress=False)
    seen, measure = [], fv_drift.drift_measurements

    def spy(checkpoints, tokenizer, tasks, *args, **kwargs):
        seen.extend(tasks)
        return measure(checkpoints, tokenizer, tasks, *args, **kwargs)

    monkeypatch.setattr(fv_drift, "drift_measurements", spy)
    analyze_run(tmp_path / "run", DriftSettings(n_prompts=3, eval_prompts=4, shots=3, top_k=3, alphas=(1.0,)),
                log=lambda s: None)
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    inputs = [x for x, _ in seen[0].pairs]
    assert [t.name for t in seen] == ["long"] and len(inputs) == 40
    assert inputs == [middle_cut(tok, "question " * 60 + str(i), 27) for i in range(40)]  # each keeps its own end
    assert all(x.endswith(f"question {i}") for i, x in enumerate(inputs))
    rows = json.loads((tmp_path / "run" / "drift.json").read_text())["rows"]
    assert {r["task"] for r in rows} == {"long"} and len(rows) == 2  # the initial model and the one checkpoint


@pytest.mark.slow
def test_cit_analyze_writes_drift_and_interventions(small_cit, icl_world_dir, tmp_path, monkeypatch):
    from forgetlab.analysis.fv_drift import DriftSettings
    from forgetlab.experiments.cit_analysis import analyze_run, analyze_runs

    cfg = small_cit(method="seq")
    run_cit(replace(cfg, train=replace(cfg.train, lr=3e-3, epochs=3)), tmp_path, log=lambda s: None, progress=False)
    assert len(list((tmp_path / "checkpoints").glob("task-*"))) == 5
    settings = DriftSettings(n_prompts=4, eval_prompts=6, shots=3, top_k=4, alphas=(1.0,))
    out = analyze_run(tmp_path, settings, log=lambda s: None)
    drift = json.loads((tmp_path / "drift.json").read_text())
    from forgetlab.worlds.icl import ICLWorld

    general = [t.name for t in ICLWorld.read(icl_world_dir / "world.json").role("general")]
    assert len(drift["rows"]) == 6 * len(general)  # initial + 5 checkpoints for every general task, none else
    assert sorted({r["task"] for r in drift["rows"]}) == sorted(general)
    assert [r["checkpoint"] for r in drift["rows"] if r["task"] == general[0]] == ["initial"] + sorted(
        p.name for p in (tmp_path / "checkpoints").glob("task-*"))
    assert set(out["summary"]) == {"fv_cosine", "zero_shot_fv_cosine", "hidden_cosine", "icl_hidden_cosine", "param_distance"}
    for name in ("drift.csv", "drift.png", "drift_tasks.png", "interventions.json", "drift.md"):
        assert (tmp_path / name).is_file()
    assert f"{drift['fits']['fv_cosine']['pooled']['r2']:.2f} |" in (tmp_path / "drift.md").read_text()
    tasks = json.loads((tmp_path / "interventions.json").read_text())["tasks"]
    assert sorted(tasks) == sorted(general)
    last = {r["task"]: r["zero_shot"] for r in drift["rows"] if r["index"] == 5}
    first = {r["task"]: r["zero_shot"] for r in drift["rows"] if r["index"] == 0}
    for name, row in tasks.items():  # the interventions score the same test queries as the drift rows
        assert (row["initial"], row["final"]) == pytest.approx((first[name], last[name]))
        assert row["forgotten"] == (first[name] - last[name] >= settings.min_drop - 1e-9)

    # killed while loading the fourth model, the same call resumes: it loads the initial model (the distances start
    # there) and the checkpoints left, the last of which the interventions use again, and writes the same rows
    import forgetlab.models.build as build

    real_load, loads = build.load_model, []

    def load(path, *args, **kwargs):
        loads.append(Path(path).name)
        if len(loads) == 4 and kill == "load":
            raise KeyboardInterrupt
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(build, "load_model", load)
    kill = "load"
    with pytest.raises(KeyboardInterrupt):
        analyze_run(tmp_path, settings, log=lambda s: None)
    assert (tmp_path / "drift.partial.pt").is_file()

    # a general task's file edited under its old name: the saved part is not used (stopped as it says so)
    import forgetlab.experiments.cit_analysis as cit_analysis

    def stop_at_afresh(line):
        if "starting afresh" in line:
            raise KeyboardInterrupt(line)

    with monkeypatch.context() as edited:
        edited.setattr(cit_analysis, "tasks_digest", lambda tasks: "another general task under the same name")
        with pytest.raises(KeyboardInterrupt, match="general tasks or settings; starting afresh"):
            analyze_run(tmp_path, settings, log=stop_at_afresh)
    assert len(loads) == 4  # the killed call read 4 models (the 4th raising), this one none

    # resumed, then killed again at the third task's interventions (their valid queries are drawn once per task)
    import forgetlab.analysis.fv_drift as fv_drift

    real_prompts, valid_draws = fv_drift.zero_shot_prompts, []

    def prompts(task, settings, split="test"):
        if split == "valid":
            valid_draws.append(task.name)
            if len(valid_draws) == 3 and kill == "interventions":
                raise KeyboardInterrupt
        return real_prompts(task, settings, split)

    monkeypatch.setattr(fv_drift, "zero_shot_prompts", prompts)
    kill, loads[:] = "interventions", []
    with pytest.raises(KeyboardInterrupt):
        analyze_run(tmp_path, settings, log=lambda s: None)
    assert valid_draws == general[:3] and (tmp_path / "drift.partial.pt").is_file()
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("task-*"))
    assert loads == [Path(cfg.model or icl_world_dir / "model").name, *names[2:]]

    # killed once more, at the fourth task: the third call measured one task and keeps what the first two had saved
    loads[:], valid_draws[:] = [], []
    with pytest.raises(KeyboardInterrupt):
        analyze_run(tmp_path, settings, log=lambda s: None)
    assert valid_draws == general[2:5]

    # the last call measures the tasks left and nothing else: the initial model (distances) and the last checkpoint
    kill, loads[:], valid_draws[:] = None, [], []
    analyze_run(tmp_path, settings, log=lambda s: None)
    assert loads == [Path(cfg.model or icl_world_dir / "model").name, names[-1]]
    assert valid_draws == general[4:]
    assert json.loads((tmp_path / "drift.json").read_text())["rows"] == drift["rows"]
    assert json.loads((tmp_path / "interventions.json").read_text())["tasks"] == tasks
    assert not (tmp_path / "drift.partial.pt").exists()
    monkeypatch.undo()

    # a second run from the same model is pooled with the first: every checkpoint of both, no interventions
    other = tmp_path / "inclora"
    run_cit(replace(small_cit(method="inclora"), train=replace(cfg.train, lr=3e-3, epochs=2)), other,
            log=lambda s: None, progress=False)
    with pytest.raises(ValueError, match="--out"):
        analyze_runs([tmp_path, other], None, settings)
    pooled = tmp_path / "pooled"
    analyze_runs([tmp_path, other], pooled, settings, log=lambda s: None)
    drift = json.loads((pooled / "drift.json").read_text())
    later = {r["checkpoint"] for r in drift["rows"] if r["index"] > 0}
    assert len(later) == 10 and {c.split("/")[0] for c in later} == {tmp_path.name, "inclora"}
    assert drift["fits"]["fv_cosine"]["checkpoint_mean"]["n"] == 10 and not (pooled / "interventions.json").exists()
    assert (pooled / "drift.png").is_file() and (pooled / "drift.csv").read_text().splitlines()[0].endswith(",run,zero_shot_fv_cosine,icl_hidden_cosine")
    assert "# FV drift vs. forgetting: 2 runs" in (pooled / "drift.md").read_text() and not (pooled / "drift_tasks.png").exists()
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model": str(tmp_path / "model")}))
    with pytest.raises(ValueError, match="pool runs of one model only"):
        analyze_runs([tmp_path, other], pooled, settings)
