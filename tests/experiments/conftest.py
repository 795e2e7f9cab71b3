"""The quick continual-tuning config that the `cit run` and `cit analyze` tests share (a fixture, as pytest's
importlib mode lets test modules import nothing from each other)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from forgetlab.experiments.cit import CITConfig


@pytest.fixture
def small_cit(icl_world_dir):
    """``small_cit(**overrides)``: a CITConfig on the smoke ICL world's sequence 0 that trains one short epoch per
    task and scores a handful of prompts, so a whole run takes seconds."""

    def make(**kw) -> CITConfig:
        base = CITConfig(world_dir=str(icl_world_dir), sequence="0", n_train=12, general_prompts=2, max_new_tokens=3)
        return replace(base, train=replace(base.train, epochs=1, batch_size=4, grad_accum=1, lr=1e-3), **kw)

    return make
