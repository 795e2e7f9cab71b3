"""Fixtures shared by the continual-instruction-tuning tests of the API (tests/experiments) and the CLI
(tests/cli): a smoke-size ICL world and a tiny random Llama saved as a checkpoint directory.

pytest runs with ``--import-mode=importlib``, so helpers are handed out as fixtures, not imported.
"""

from __future__ import annotations

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
    tok = build_bpe_tokenizer(["Definition: Always answer yes. Now complete the following example - Input: question 1 Output: yes"] * 20,
                              vocab_size=300)
    cfg = tiny_config("llama", len(tok), n_layers=2)
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    random_model(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path
