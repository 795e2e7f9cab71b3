"""Recovery (``forgetlab analyze recovery``) on a tiny model: it trains a copy on the --fit rows, scores the --eval
rows before and after with greedy exact match, and counts its optimizer steps; checked against a question-by-question
greedy decode written out here and the spurious share's closed form."""

import math

import pytest
import torch

from forgetlab.analysis import recovery
from forgetlab.models.tokenizers import build_word_tokenizer
from forgetlab.models.zoo import random_model, tiny_config
from forgetlab.train.trainer import EvalSchedule, PhaseConfig

WORDS = [f"w{i}" for i in range(12)]
FIT = [{"prompt": f"Q : w{i}\nA :", "answer": f" w{(5 * i + 3) % 12}"} for i in range(6)]
EVAL = FIT[:3] + [{"prompt": "Q : w11\nA :", "answer": " w2"}]  # three of the fitted questions and an unseen one
CFG = PhaseConfig(lr=1e-2, epochs=15, batch_size=4, schedule="constant", weight_decay=0.0, checkpoint_every=0,
                  eval=EvalSchedule(dense_every=0, every=0))


def greedy_em(model, tok, rows) -> float:
    """Share of rows whose answer and then eos are each the argmax next token, one question at a time, no padding."""
    hits = 0
    for row in rows:
        ids = tok(row["prompt"], add_special_tokens=False)["input_ids"]
        targets = tok(row["prompt"] + row["answer"], add_special_tokens=False)["input_ids"][len(ids):] + [tok.eos_token_id]
        ok = True
        for t in targets:
            with torch.no_grad():
                nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            if nxt != t:
                ok = False
                break
            ids = ids + [nxt]
        hits += ok
    return hits / len(rows)


@pytest.fixture(scope="module")
def setup():
    tok = build_word_tokenizer(WORDS + ["Q", "A", ":"])
    cfg = tiny_config("llama", len(tok), n_layers=2)
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    return tok, random_model(cfg, seed=0)


def test_recover_fits_a_copy_on_the_fit_rows_and_scores_the_eval_rows(setup, monkeypatch):
    tok, model = setup
    start = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []
    real = recovery.train_phase

    def spy(trained, data, *args, **kw):
        seen.append((trained, data))
        return real(trained, data, *args, **kw)

    monkeypatch.setattr(recovery, "train_phase", spy)
    out = recovery.recover(model, tok, FIT, EVAL, CFG, seed=0, log=lambda s: None)
    (trained, data), = seen
    # trained on the fit rows: prompt + answer + eos, each row as the tokenizer splits the whole text
    rows = [data.input_ids[i][data.attention_mask[i].bool()].tolist() for i in range(len(data))]
    assert rows == [tok(r["prompt"] + r["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for r in FIT]
    # a copy: the caller's model keeps its weights
    assert trained is not model and all(torch.equal(v, start[k]) for k, v in model.state_dict().items())
    assert out["steps"] == 15 * math.ceil(len(FIT) / 4)  # epochs · micro-batches per epoch, one per step
    assert out["current"] == greedy_em(model, tok, EVAL)
    assert out["recovered"] == greedy_em(trained, tok, EVAL)
    assert out["recovered"] > out["current"], "the test needs a recovery that changes the score"


def test_recovery_table_spurious_share_is_the_closed_form(setup, tmp_path):
    """share = (recovered − current) / (before − current), per checkpoint, from a saved checkpoint directory."""
    tok, model = setup
    model.save_pretrained(tmp_path / "c")
    tok.save_pretrained(tmp_path / "c")
    row, = recovery.recovery_table([tmp_path / "c"], FIT, EVAL, before=1.0, cfg=CFG, log=lambda s: None)
    assert row["current"] == greedy_em(model, tok, EVAL) and row["recovered"] > row["current"]
    assert row["spurious_share"] == pytest.approx((row["recovered"] - row["current"]) / (1.0 - row["current"]))
    assert row["before"] == 1.0 and row["checkpoint"] == str(tmp_path / "c")


def trained_on(model, tok, rows, cfg=CFG):
    """A copy of ``model`` fitted on ``rows`` (prompt + answer + eos), as a checkpoint that already knows some answers."""
    import copy
    import tempfile
    from pathlib import Path

    from forgetlab.models.tokenizers import pad_id
    from forgetlab.train.data import qa_dataset
    from forgetlab.train.trainer import train_phase

    trained = copy.deepcopy(model)
    prompts, answers = recovery.encode_qa(tok, rows)
    with tempfile.TemporaryDirectory() as state:
        train_phase(trained, qa_dataset(prompts, answers, tok.eos_token_id, pad_id(tok)), cfg, phase="x",
                    state_dir=Path(state), seed=0, log=lambda s: None, progress=False)
    return trained.eval()


def test_spurious_share_uses_each_checkpoints_own_current_score_and_the_given_before(setup, tmp_path):
    """A checkpoint that already answers half the eval rows (current 0.5) and one that answers none, before = 0.9:
    the share is (recovered − current) / (before − current) per row, which here differs from recovered / before,
    (recovered − current) / before and a share taken with the other row's current."""
    tok, model = setup
    half = trained_on(model, tok, FIT[:2])  # EVAL[:2] are FIT[:2]
    for name, m in (("half", half), ("none", model)):
        m.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    rows = recovery.recovery_table([tmp_path / "half", tmp_path / "none"], FIT, EVAL, before=0.9, cfg=CFG,
                                   log=lambda s: None)
    assert [r["checkpoint"] for r in rows] == [str(tmp_path / "half"), str(tmp_path / "none")]
    (h, n), b = rows, 0.9
    assert h["current"] == greedy_em(half, tok, EVAL) == 0.5 and n["current"] == greedy_em(model, tok, EVAL) == 0.0
    assert h["recovered"] != h["current"], "the test needs a recovery that changes the score"
    for r in rows:
        assert r["before"] == b
        assert r["spurious_share"] == pytest.approx((r["recovered"] - r["current"]) / (b - r["current"]), abs=1e-12)
    c, rec = h["current"], h["recovered"]
    wrong = [rec / b, (rec - c) / b, (rec - n["current"]) / (b - n["current"]), (rec - c) / (1.0 - c)]
    assert all(abs(h["spurious_share"] - w) > 0.05 for w in wrong), (h, wrong)
