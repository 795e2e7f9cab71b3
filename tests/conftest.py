"""Fixtures shared by the tests: a smoke-size ICL world and a tiny random Llama saved as a checkpoint directory
(continual instruction tuning, API and CLI), and a two-process ``torchrun`` launcher (data-parallel runs).

pytest runs with ``--import-mode=importlib``, so helpers are handed out as fixtures, not imported.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace

import pytest

from forgetlab.experiments.icl_world import build_icl_world, preset_config
from forgetlab.models.tokenizers import build_bpe_tokenizer
from forgetlab.models.zoo import random_model, tiny_config


@pytest.fixture(scope="session")
def icl_world_dir(tmp_path_factory):
    """An ICL world built at smoke size (model + world.json), once per test session."""
    out = tmp_path_factory.mktemp("icl")
    build_icl_world(replace(preset_config("smoke"), eval_prompts=2), out, log=lambda s: None, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A randomly initialised 2-layer Llama with a BPE tokenizer fitted to the NI template, as an HF checkpoint."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tok = build_bpe_tokenizer(["Definition: Always answer yes.\n\nNow complete the following example -\nInput: question 1.\nOutput: yes"] * 20,
                              vocab_size=300)
    cfg = tiny_config("llama", len(tok), n_layers=2)
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    random_model(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


class Torchrun:
    """Two CPU processes (gloo, one thread each) under ``torchrun --standalone``, waited for like ``subprocess.run``.

    A launch whose processes could not reach each other over the loopback (a rendezvous port that another
    program took, a peer connection reset) is retried once: that is the machine, not the code under test.
    Every other failure comes back as it is.
    """

    prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    loopback_faults = ("DistNetworkError", "Connection reset by peer", "Connection refused", "Address already in use")

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, "OMP_NUM_THREADS": "1", **extra}

    def __call__(self, *args, env: dict[str, str] | None = None, timeout: float = 600,
                 cwd=None) -> subprocess.CompletedProcess:
        def launch():
            return subprocess.run([*self.prefix, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                                  env=env or self.env(), cwd=cwd)

        proc = launch()
        if proc.returncode and any(fault in proc.stderr for fault in self.loopback_faults):
            proc = launch()
        return proc


@pytest.fixture
def torchrun() -> Torchrun:
    return Torchrun()
