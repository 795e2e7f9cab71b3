import shutil
import subprocess

import numpy as np
import pytest
import torch

import forgetlab.utils.environment as env
from forgetlab.experiments.rundir import prepare_run_dir, record_api_run
from forgetlab.utils.io import read_json


def test_entry_names_the_running_libraries():
    entry = env.environment()
    assert entry["packages"]["torch"] == torch.__version__
    assert entry["packages"]["numpy"] == np.__version__
    assert env.package_versions(["no-such-package-here"]) == {"no-such-package-here": None}
    assert entry["torch_threads"] == torch.get_num_threads() and len(entry["devices"]) >= 1


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_source_commit_is_the_checkouts_head(tmp_path):
    def git(*args):
        return subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              capture_output=True, text=True, check=True).stdout.strip()

    assert env.source_commit(tmp_path / "code.py") is None  # not a checkout
    git("init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", "code.py")
    git("commit", "-q", "-m", "first")
    assert env.source_commit(tmp_path / "code.py") == {"commit": git("rev-parse", "HEAD"), "dirty": False}
    (tmp_path / "code.py").write_text("x = 2\n")
    assert env.source_commit(tmp_path / "code.py")["dirty"] is True


def test_entries_accumulate_and_a_changed_environment_is_named(tmp_path):
    first = {"python": "3.11.7", "packages": {"torch": "2.13.0", "numpy": "2.0"}, "devices": ["cpu"], "source": None,
             "time": "t0"}
    assert env.record_environment(tmp_path, entry=first) == []
    same = dict(first, time="t1")  # time and command are recorded, not compared
    assert env.record_environment(tmp_path, resumed=True, entry=same) == []
    moved = dict(first, packages={"torch": "2.14.0", "numpy": "2.0", "peft": "0.21"}, devices=["NVIDIA H200"])
    assert env.record_environment(tmp_path, resumed=True, entry=moved) == [
        "peft None -> 0.21", "torch 2.13.0 -> 2.14.0", "devices ['cpu'] -> ['NVIDIA H200']"]
    runs = read_json(tmp_path / env.ENVIRONMENT)["runs"]
    assert [r["resumed"] for r in runs] == [False, True, True] and runs[2]["packages"]["torch"] == "2.14.0"


def test_run_dir_records_each_start_and_notes_a_resume_elsewhere(tmp_path, monkeypatch):
    cfg = {"lr": 1e-4}
    out = prepare_run_dir(tmp_path / "run", cfg, resume=False, overwrite=False)
    first = read_json(out / env.ENVIRONMENT)["runs"]
    assert len(first) == 1 and first[0]["packages"]["torch"] == torch.__version__
    logs = []
    prepare_run_dir(out, cfg, resume=True, overwrite=False, log=logs.append)
    assert logs == [] and len(read_json(out / env.ENVIRONMENT)["runs"]) == 2
    real = env.environment
    monkeypatch.setattr(env, "environment", lambda: dict(real(), packages=dict(real()["packages"], torch="0.0.1")))
    prepare_run_dir(out, cfg, resume=True, overwrite=False, log=logs.append)
    assert len(logs) == 1 and f"torch {torch.__version__} -> 0.0.1" in logs[0] and "environment.json" in logs[0]
    prepare_run_dir(out, cfg, resume=False, overwrite=True)  # a replaced run starts its record afresh
    assert len(read_json(out / env.ENVIRONMENT)["runs"]) == 1


def test_a_run_started_from_python_gets_config_and_environment_once(tmp_path):
    record_api_run(tmp_path / "api", {"seed": 3})
    assert read_json(tmp_path / "api" / "config.json") == {"seed": 3}
    record_api_run(tmp_path / "api", {"seed": 3})  # prepare_run_dir or an earlier start already wrote them
    assert len(read_json(tmp_path / "api" / env.ENVIRONMENT)["runs"]) == 1
