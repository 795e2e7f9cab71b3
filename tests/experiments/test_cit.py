"""Continual instruction tuning end to end: the ICL world (full, LoRA, IncLoRA), NI task files, every method, resume
and checkpoints (`cit analyze` is in test_cit_analysis.py)."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from forgetlab.experiments.cit import CITConfig, load_sequence, run_cit, summarize
from forgetlab.methods.fvg import FVGConfig
from forgetlab.models.zoo import random_model, tiny_config
from forgetlab.utils.io import to_jsonable
from forgetlab.worlds.instruction_prompts import ELISION, NI_TEMPLATE, PromptFitter, PromptTemplate, middle_cut
from forgetlab.worlds.instructions import InstructionTask


@pytest.mark.slow
@pytest.mark.parametrize("method", ["seq", "lora", "inclora"])
def test_world_sequence_runs_and_lora_touches_only_its_targets(small_cit, icl_world_dir, tmp_path, method):
    cfg = small_cit(method=method)
    results = run_cit(cfg, tmp_path, log=lambda s: None, progress=False)
    R = np.array(results["R"])
    assert R.shape == (6, 5) and ((R >= 0) & (R <= 100)).all()
    assert results["AP"] == pytest.approx(np.mean(np.diag(R[1:])))
    assert results["FP"] == pytest.approx(R[-1].mean())
    assert results["forget"] == pytest.approx(results["AP"] - results["FP"])
    assert 0 <= results["final"]["GP"] <= 100 and results["fvg"] is False
    assert results["GP_drop"] == pytest.approx(results["initial"]["GP"] - results["final"]["GP"])
    assert (tmp_path / "scores.png").is_file() and json.loads((tmp_path / "results.json").read_text())["method"] == method
    before, after = load_file(icl_world_dir / "model" / "model.safetensors"), load_file(tmp_path / "model" / "model.safetensors")
    changed = {k for k in before if not (before[k] == after[k]).all()}
    if method == "seq":
        assert any("mlp" in k for k in changed)
    else:  # LoRA on q_proj and v_proj, merged: nothing else moved
        assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)


def test_sequence_new_takes_the_tasks_the_built_model_does_not_already_do(icl_world_dir, tmp_path):
    """``--sequence new`` reads eval.json's instructed zero-shot scores: with the scores set by hand, the picked
    tasks are those of the world's sequences below 0.9, in order, at most a sequence's length."""
    import shutil

    from forgetlab.worlds.icl import ICLWorld

    world_dir = tmp_path / "world"
    shutil.copytree(icl_world_dir, world_dir, ignore=shutil.ignore_patterns("model", "fv", "state"))
    world = ICLWorld.read(world_dir / "world.json")
    order = list(dict.fromkeys(n for seq in world.sequences for n in seq))
    evaluation = json.loads((world_dir / "eval.json").read_text())
    scores = {name: (1.0 if i % 2 == 0 else 0.5) for i, name in enumerate(order)}  # every other task known
    scores[order[1]] = 0.9  # 0.9 counts as known
    (world_dir / "eval.json").write_text(json.dumps({**evaluation, "new_tasks_zero_shot_instruction": scores}))
    cfg = CITConfig(world_dir=str(world_dir), sequence="new")
    tasks, _ = load_sequence(cfg)
    expected = [n for i, n in enumerate(order) if i % 2 == 1 and i != 1][:world.config.sequence_length]
    assert [t.name for t in tasks] == expected and expected
    (world_dir / "eval.json").write_text(json.dumps({**evaluation, "new_tasks_zero_shot_instruction": dict.fromkeys(order, 1.0)}))
    with pytest.raises(ValueError, match="already does every task"):
        load_sequence(cfg)
    (world_dir / "eval.json").write_text(json.dumps({k: v for k, v in evaluation.items() if k != "new_tasks_zero_shot_instruction"}))
    with pytest.raises(ValueError, match="icl-world evaluate"):
        load_sequence(cfg)


def test_sequence_coded_asks_a_sequences_abilities_by_code_also_from_an_older_world_json(icl_world_dir, tmp_path):
    import shutil

    from forgetlab.worlds.icl import ICLWorld

    world = ICLWorld.read(icl_world_dir / "world.json")
    tasks, _ = load_sequence(CITConfig(world_dir=str(icl_world_dir), sequence="coded:1"))
    assert [t.name for t in tasks] == ["coded_" + n.removeprefix("reworded_") for n in world.sequences[1]]
    for task in tasks:
        source = world.task(task.name)
        assert task.definition == source.instruction and world.task(task.name.replace("coded_", "")).pairs == source.pairs
    old = tmp_path / "old"  # a build from before coded tasks existed: the same world.json without them
    shutil.copytree(icl_world_dir, old, ignore=shutil.ignore_patterns("model", "fv", "state"))
    data = json.loads((old / "world.json").read_text())
    data["tasks"] = [t for t in data["tasks"] if not t["name"].startswith("coded_")]
    (old / "world.json").write_text(json.dumps(data))
    again, _ = load_sequence(CITConfig(world_dir=str(old), sequence="coded:1"))
    assert again == tasks
    with pytest.raises(ValueError, match="sequences 0..2, not 7"):
        load_sequence(CITConfig(world_dir=str(icl_world_dir), sequence="coded:7"))


def test_summary_of_a_hand_matrix():
    tasks = [InstructionTask("a", "d", ()), InstructionTask("b", "d", ())]
    R = [[10.0, 0.0], [80.0, 5.0], [50.0, 90.0]]
    general = [{"gp": 70.0, "ip": 60.0}, {"gp": 65.0, "ip": 58.0}, {"gp": 40.0, "ip": 50.0}]
    out = summarize(CITConfig(world_dir="x"), tasks, R, general)
    assert out["AP"] == pytest.approx(85.0) and out["FP"] == pytest.approx(70.0) and out["forget"] == pytest.approx(15.0)
    assert out["initial"] == {"GP": 70.0, "IP": 60.0} and out["final"] == {"GP": 40.0, "IP": 50.0}
    assert out["GP_drop"] == pytest.approx(30.0) and out["IP_drop"] == pytest.approx(10.0)
    assert out["bwt_gem"] == pytest.approx(-30.0)
    assert out["known_at_start"] == []  # initial scores 10 and 0: both tasks are new
    assert out["initial_tasks_mean"] == pytest.approx(5.0) and out["FP_gain"] == pytest.approx(65.0)
    known = summarize(CITConfig(world_dir="x"), tasks, [[90.0, 89.9], [95.0, 90.0], [95.0, 90.0]], general)
    assert known["known_at_start"] == ["a"]  # 90 counts as already done, 89.9 does not


def test_multitask_has_no_forward_transfer_or_incremental_accuracy():
    """Multitask's R repeats one jointly trained model, so "task k just before training on it" does not exist: FWT
    would be the joint model's gain over the initial one. Both are null; BWT and forgetting are 0 by construction."""
    tasks = [InstructionTask(n, "d", ()) for n in "abc"]
    R = [[10.0, 20.0, 30.0]] + [[80.0, 70.0, 60.0]] * 3
    general = [{"gp": 70.0, "ip": 60.0}] * 4
    out = json.loads(json.dumps(to_jsonable(summarize(CITConfig(world_dir="x", method="multitask"), tasks, R, general))))
    assert out["fwt"] is None and out["avg_incremental_acc"] is None
    assert out["bwt_gem"] == 0.0 and out["forgetting"] == 0.0 and out["forget"] == 0.0 and out["AP"] == out["FP"] == 70.0
    assert summarize(CITConfig(world_dir="x", method="seq"), tasks, R, general)["fwt"] == pytest.approx((70 - 20 + 60 - 30) / 2)


def test_summary_lists_the_general_scores_after_each_task_from_the_initial_model_on():
    """One entry per row of R: the initial model's GP and IP, then after each task (what the per-task plots read)."""
    tasks = [InstructionTask("a", "d", ()), InstructionTask("b", "d", ())]
    general = [{"gp": 70.0, "ip": 60.0}, {"gp": 65.0, "ip": 58.0}, {"gp": 40.0, "ip": 50.0}]
    out = summarize(CITConfig(world_dir="x"), tasks, [[10.0, 0.0], [80.0, 5.0], [50.0, 90.0]], general)
    assert out["general_after_each_task"] == [{"GP": 70.0, "IP": 60.0}, {"GP": 65.0, "IP": 58.0}, {"GP": 40.0, "IP": 50.0}]


def test_ni_files_run_with_any_model(tmp_path, tiny_llama_dir):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for name, word in (("task001_yes", "yes"), ("task002_no", "no")):
        data = {"Definition": [f"Always answer {word}."], "Positive Examples": [],
                "Instances": [{"id": str(i), "input": f"question {i}", "output": [word]} for i in range(30)]}
        (tasks / f"{name}.json").write_text(json.dumps(data))
    base = CITConfig(model=str(tiny_llama_dir), tasks_dir=str(tasks), sequence="task001_yes,task002_no", n_train=8,
                     n_test=10, max_new_tokens=2, method="lora", general=str(tasks / "task002_no.json"))
    cfg_run = replace(base, train=replace(base.train, epochs=1, batch_size=4, grad_accum=1), lora_targets=("q_proj", "v_proj"))
    results = run_cit(cfg_run, tmp_path / "run", log=lambda s: None, progress=False)
    files = replace(cfg_run, tasks_dir="", sequence=f"{tasks / 'task002_no.json'},{tasks / 'task001_yes.json'}", method="seq")
    assert run_cit(files, tmp_path / "run2", log=lambda s: None, progress=False)["tasks"] == ["task002_no", "task001_yes"]
    assert results["tasks"] == ["task001_yes", "task002_no"]
    assert np.array(results["R"]).shape == (3, 2)
    # the general set is task002 itself: its GP after training equals its column of R (same rows, same scoring)
    assert results["final"]["GP"] == pytest.approx(results["R"][-1][1]) and 0 <= results["final"]["IP"] <= 100


def test_a_tokenizer_without_pad_token_pads_with_eos_and_multitask_lora_trains_only_the_adapter(tmp_path, tiny_llama_dir,
                                                                                             monkeypatch):
    """Llama's own tokenizers have no pad token. The run pads with eos, yet the eos ending each training answer
    stays a label (labels are placed by position, not by token id), and multitask with LoRA trains one adapter on
    every task's rows: the saved model differs from the initial one only in the LoRA targets."""
    import shutil

    from transformers import AutoTokenizer

    model_dir = tmp_path / "no-pad"
    shutil.copytree(tiny_llama_dir, model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.pad_token = None
    tok.save_pretrained(model_dir)
    assert AutoTokenizer.from_pretrained(model_dir).pad_token_id is None
    for name in ("yes", "no"):
        (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps({"instruction": f"Always answer {name}.",
                                                                       "input": f"q {i}", "output": name}) for i in range(30)))
    import forgetlab.experiments.cit as cit

    captured, train_phase = {}, cit.train_phase

    def capture(model, data, *args, **kwargs):  # the one multitask phase: record its rows, then train as usual
        captured["data"] = data
        return train_phase(model, data, *args, **kwargs)

    monkeypatch.setattr(cit, "train_phase", capture)
    cfg = CITConfig(model=str(model_dir), sequence=f"{tmp_path / 'yes.jsonl'},{tmp_path / 'no.jsonl'}", n_train=8,
                    n_test=10, method="multitask", finetune="lora", max_new_tokens=2, answer_end="eos")
    cfg = replace(cfg, train=replace(cfg.train, epochs=1, batch_size=4, grad_accum=1))
    results = run_cit(cfg, tmp_path / "run", log=lambda s: None, progress=False)
    eos = tok.eos_token_id
    data = captured["data"]
    assert data.input_ids.shape[0] == 16  # both tasks' training rows in one phase
    for ids, labels, mask in zip(data.input_ids, data.labels, data.attention_mask):
        last = int(mask.sum()) - 1
        assert ids[last] == eos and labels[last] == eos  # the answer's end is learned although eos also pads
        assert (ids[last + 1:] == eos).all() and (labels[last + 1:] == -100).all()
    assert np.array(results["R"]).shape == (3, 2)
    before, after = load_file(tiny_llama_dir / "model.safetensors"), load_file(tmp_path / "run" / "model" / "model.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(("q_proj" in k or "v_proj" in k) for k in changed)


def sentencepiece_style_llama(path: Path, texts: list[str]) -> Path:
    """A tiny Llama whose tokenizer behaves like Llama-2's and Mistral's: SentencePiece-style BPE (words keep their
    leading "▁", the first one gets one prepended), BOS put first by the tokenizer itself, no pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    core.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    core.train_from_iterator(texts, trainer=trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"],
                                                                show_progress=False))
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", core.token_to_id("<s>"))])
    tok = LlamaTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    config = tiny_config("llama", len(tok), n_layers=2)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = tok.bos_token_id, tok.eos_token_id, None
    random_model(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_a_long_prompt_is_cut_in_its_input_keeping_bos_definition_and_answer_cue(tmp_path):
    """Cutting a prompt's start (as before) dropped BOS and the definition, cutting its end the cue "Output:"; the
    fitter leaves out the middle of the input, then of the definition, keeping the most tokens that fit (checked
    against a scan of every length) from both ends, and a 5-shot prompt drops demonstrations from the last one before
    its query is touched."""
    from transformers import AutoTokenizer

    from forgetlab.analysis.recovery import encode_qa
    from forgetlab.experiments.cit import _rows, general_rows

    words = ["question", "review", "Say", "it", "Definition:", "Now", "complete", "the", "following", "example",
             "Input:", "Output:", "yes", "no"]
    model_dir = sentencepiece_style_llama(tmp_path / "llama", [" ".join(words)] * 20 + ["question " * 50 + "\n"] * 5)
    tok = AutoTokenizer.from_pretrained(model_dir)
    template, fit = PromptTemplate(NI_TEMPLATE, punctuate=True), PromptFitter(tok, 40)
    long_input = "question " * 200 + "review"
    task = InstructionTask("t", "Say it", ((long_input, ("yes",)), ("review 1", ("no",))))
    long_row, short_row = _rows(task, task.instances, template, fit)
    ids = encode_qa(tok, [long_row])[0][0]
    assert len(ids) <= 40 and ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert long_row["prompt"].startswith("Definition: Say it.\n\nNow complete the following example -\nInput: question")
    assert long_row["prompt"].endswith("question review.\nOutput:") and ELISION in long_row["prompt"]  # its end stays
    assert short_row["prompt"] == template.render("Say it", "review 1")
    input_ids = tok(long_input, add_special_tokens=False)["input_ids"]
    length = lambda k: len(encode_qa(tok, [{"prompt": template.render("Say it", middle_cut(tok, long_input, k)),  # noqa: E731
                                           "answer": " yes"}])[0][0])
    most = max(k for k in range(1, len(input_ids)) if length(k) <= 40)
    assert long_row["prompt"] == template.render("Say it", middle_cut(tok, long_input, most))
    head, tail = middle_cut(tok, long_input, most).split(ELISION)  # half the kept tokens from each end
    assert len(tok(head, add_special_tokens=False)["input_ids"]) - len(tok(tail, add_special_tokens=False)["input_ids"]) in (0, 1)
    # a definition too long for the template even without the input is cut too; the template alone cannot be
    defined = InstructionTask("d", "Say it " * 100, (("review 1", ("no",)),))
    prompt = _rows(defined, defined.instances, template, fit)[0]["prompt"]
    assert prompt.startswith("Definition: Say it Say it") and prompt.endswith("Say it.\n\nNow complete the following example -\nInput: \nOutput:")
    assert ELISION in prompt and fit.fits(prompt)
    with pytest.raises(ValueError, match="task 'd': the template alone takes more than max_source_tokens=5"):
        _rows(defined, defined.instances, template, PromptFitter(tok, 5))
    # 5-shot: demonstrations of 30 words each; at 80 tokens only the first ones stay and the query is whole
    demos = [("question " * 30 + str(i), ("yes",)) for i in range(5)]
    general = InstructionTask("g", "Say it", tuple(demos) + (("review 9", ("no",)),))
    _, ip = general_rows(general, CITConfig(model="x", sequence="a.json", n_test=1), template, PromptFitter(tok, 80))
    kept = ip[0]["prompt"].count("Output:") - 1
    assert 0 < kept < 5 and ip[0]["prompt"].endswith("Input: review 9\nOutput:") and PromptFitter(tok, 80).fits(ip[0]["prompt"])
    assert ip[0]["prompt"].startswith("Input: " + demos[0][0])
    assert not PromptFitter(tok, 80).fits(ip[0]["prompt"].replace("Input: review 9", f"Input: {demos[kept][0]}\nOutput: "
                                                                   "yes\n\nInput: review 9"))  # one more would not fit


def test_fv_prompts_of_long_inputs_stay_within_max_source_tokens(tmp_path):
    """FVG's in-context prompts hold fvg_config.shots + 1 inputs: each is cut in its middle to that share of
    max_source_tokens (here 110 // 11 = 10 tokens, 5 from each end), so ten long reviews cannot make a prompt past a
    model's context; short ones stay."""
    from transformers import AutoTokenizer

    from forgetlab.experiments.cit import fv_pairs

    model_dir = sentencepiece_style_llama(tmp_path / "llama", ["question review yes no"] * 20)
    tok = AutoTokenizer.from_pretrained(model_dir)
    train = [("question " * 40, ("yes", "Yes")), ("review", ("no",))]
    cfg = CITConfig(model="x", sequence="a.json", max_source_tokens=110)
    (long_input, answer), short = fv_pairs(tok, train, cfg)
    assert long_input == middle_cut(tok, "question " * 40, 10) and " … " in long_input  # 5 tokens from each end
    assert long_input.startswith("question question question question question … question")
    assert answer == "yes" and short == ("review", "no")
    wider = replace(cfg, fvg_config=FVGConfig(prompt_tokens=220))  # a longer prompt budget: 220 // 11 = 20 tokens each
    assert fv_pairs(tok, train, wider)[0][0] == middle_cut(tok, "question " * 40, 20)


def test_a_sentencepiece_style_tokenizer_that_adds_bos_trains_and_scores_an_ni_task(tmp_path, monkeypatch):
    """With Llama-2's kind of tokenizer every training row starts with the one BOS the tokenizer adds, the answer is
    the ids the prompt's continuation gets in context (" POS" -> "▁POS"), followed by eos as a label although eos
    also pads; the task is learned and its generated answers decode and score as such."""
    import random

    from transformers import AutoTokenizer

    import forgetlab.experiments.cit as cit

    rng, words = random.Random(0), ["great", "awful", "movie", "food", "slow", "tasty", "the", "was"]
    inputs = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 6))) for _ in range(120)]
    label = {s: "POS" if "great" in s else "NEG" for s in inputs}
    definition = "Is the review POS or NEG?"
    (tmp_path / "task363_sst2.json").write_text(json.dumps({"Definition": [definition], "Positive Examples": [],
        "Instances": [{"id": str(i), "input": s, "output": [label[s]]} for i, s in enumerate(inputs)]}))
    texts = [f"Definition: {definition}\n\nNow complete the following example -\nInput: {s}.\nOutput: {label[s]}" for s in inputs]
    model_dir = sentencepiece_style_llama(tmp_path / "llama", texts)
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert tok.pad_token_id is None and tok("a")["input_ids"][0] == tok.bos_token_id

    captured, train_phase = {}, cit.train_phase

    def capture(model, data, *args, **kwargs):
        captured["data"] = data
        return train_phase(model, data, *args, **kwargs)

    monkeypatch.setattr(cit, "train_phase", capture)
    cfg = CITConfig(model=str(model_dir), sequence=str(tmp_path / "task363_sst2.json"), n_train=20, n_test=10,
                    method="seq", max_new_tokens=3, general=str(tmp_path / "task363_sst2.json"))
    cfg = replace(cfg, train=replace(cfg.train, epochs=15, batch_size=10, grad_accum=1, lr=3e-3))
    results = run_cit(cfg, tmp_path / "run", log=lambda s: None, progress=False)

    bos, eos = tok.bos_token_id, tok.eos_token_id
    data = captured["data"]
    for ids, labels, mask in zip(data.input_ids, data.labels, data.attention_mask):
        real = ids[:int(mask.sum())].tolist()
        answer = [int(t) for t, l in zip(ids, labels) if l != -100]
        prompt = real[:len(real) - len(answer)]
        assert real[0] == bos and real.count(bos) == 1  # the tokenizer's BOS, once
        assert prompt == tok(tok.decode(prompt[1:]))["input_ids"]  # the prompt as the tokenizer encodes it, BOS first
        assert answer[-1] == eos and tok.convert_ids_to_tokens(answer[:-1])[0] in ("\u2581POS", "\u2581NEG")
    assert results["R"][-1][0] >= 90  # learned, and its greedy answers decode to "POS"/"NEG" for ROUGE-L
    assert results["R"][0][0] <= 50


def test_training_answers_are_a_seeded_draw_of_each_instances_references(tmp_path, tiny_llama_dir, monkeypatch):
    """The FV paper's collator trains on a random one of an instance's outputs; ours is seeded by run seed and task
    name, so a resumed or repeated run trains on the same answers. Scoring keeps every reference."""
    from transformers import AutoTokenizer

    import forgetlab.experiments.cit as cit
    from forgetlab.worlds.instructions import InstructionTask

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    fit, template = PromptFitter(tok, 64), PromptTemplate("{definition} {input}")
    task = InstructionTask("pair", "Say.", tuple((f"q {i}", ("alpha", "beta")) for i in range(200)) + (("q x", ("one",)),))
    answers = lambda seed: [r["answer"] for r in cit._rows(task, task.instances, template, fit,  # noqa: E731
                                                            cit.reference_draw(task, seed))]
    drawn = answers(0)
    assert drawn == answers(0) and drawn != answers(1) and drawn[-1] == " one"
    assert 70 <= drawn.count(" alpha") <= 130 and drawn.count(" alpha") + drawn.count(" beta") == 200  # binomial(200, ½)
    rows = cit._rows(task, task.instances, template, fit)
    assert {r["answer"] for r in rows[:-1]} == {" alpha"} and all(r["references"] == ("alpha", "beta") for r in rows[:-1])
    for name in ("a", "b"):
        (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps({"instruction": "Say.", "input": f"q {i}",
                                                                      "output": ["alpha", "beta"]}) for i in range(30)))
    trained = []
    real = cit._rows

    def spy(*args):
        rows = real(*args)
        if len(args) == 5:  # with a draw: training rows
            trained.append([r["answer"] for r in rows])
        return rows

    monkeypatch.setattr(cit, "_rows", spy)
    cfg = CITConfig(model=str(tiny_llama_dir), sequence=f"{tmp_path / 'a.jsonl'},{tmp_path / 'b.jsonl'}", n_train=20,
                    n_test=10, general=str(tmp_path / "a.jsonl"), max_new_tokens=2)
    run_cit(replace(cfg, train=replace(cfg.train, epochs=1, batch_size=4, grad_accum=1)), tmp_path / "run",
            log=lambda s: None, progress=False)
    assert len(trained) == 2 and all({" alpha", " beta"} == set(answers) for answers in trained)
    assert trained[0] != trained[1]  # each task its own draw


def test_jsonl_files_run_end_to_end_and_rows_keep_their_instructions(tmp_path, tiny_llama_dir):
    from transformers import AutoTokenizer

    from forgetlab.experiments.cit import _rows, general_rows
    from forgetlab.worlds.instructions import load_task_file

    for name, word in (("yes", "yes"), ("no", "no")):
        (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps({"instruction": f"Always answer {word}.", "input": f"q {i}",
                                                                      "output": word}) for i in range(30)))
    mixed = [{"instruction": ("Say yes." if i % 2 else "Say no."), "input": f"q {i}", "output": "yes" if i % 2 else "no"}
             for i in range(30)]
    (tmp_path / "mixed.jsonl").write_text("\n".join(json.dumps(r) for r in mixed))
    task = load_task_file(tmp_path / "mixed.jsonl")
    cfg = CITConfig(model=str(tiny_llama_dir), sequence="x.jsonl", n_train=8, n_test=10)
    fit = PromptFitter(AutoTokenizer.from_pretrained(tiny_llama_dir), 512)
    gp, ip = general_rows(task, cfg, PromptTemplate(NI_TEMPLATE, punctuate=True), fit)
    assert gp[0]["prompt"] == "Definition: Say no.\n\nNow complete the following example -\nInput: q 20.\nOutput:"
    assert ip[0]["prompt"].startswith("Input: Say no.\nq 0\nOutput: no\n\nInput: Say yes.\nq 1\nOutput: yes")
    assert _rows(task, task.instances[:1], PromptTemplate("{definition}|{input}"), fit)[0]["prompt"] == "Say no.|q 0"
    run = replace(cfg, sequence=f"{tmp_path / 'yes.jsonl'},{tmp_path / 'no.jsonl'}", method="seq",
                  general=f"{tmp_path / 'no.jsonl'},{tmp_path / 'mixed.jsonl'}", max_new_tokens=2)
    results = run_cit(replace(run, train=replace(run.train, epochs=1, batch_size=4, grad_accum=1)), tmp_path / "run",
                      log=lambda s: None, progress=False)
    assert results["tasks"] == ["yes", "no"] and np.array(results["R"]).shape == (3, 2)
    report = (tmp_path / "run" / "report.md").read_text()
    assert f"| FP (every task at the end) | {results['FP']:.1f} |" in report and "(scores.png)" in report
    assert 0 <= results["final"]["GP"] <= 100 and 0 <= results["final"]["IP"] <= 100


def test_bad_configs_name_the_problem(small_cit, icl_world_dir):
    with pytest.raises(ValueError, match="method"):
        small_cit(method="qlora").validate()
    with pytest.raises(ValueError, match="finetune='qlora'"):
        small_cit(method="replay", finetune="qlora").validate()
    with pytest.raises(ValueError, match="contradicts"):
        small_cit(method="inclora", finetune="full").validate()
    with pytest.raises(ValueError, match="no parameters shared"):
        small_cit(method="ewc", finetune="inclora").validate()
    with pytest.raises(ValueError, match="--world"):
        CITConfig().validate()
    for bad, message in (({"replay": -0.5}, r"replay=-0.5 must be a fraction in \[0, 1\]"),
                         ({"lwf_temperature": 0}, "lwf_temperature=0 must be positive"),
                         ({"ewc_strength": -1.0}, "ewc_strength=-1.0 must not be negative"),
                         ({"general_prompts": 0}, "general_prompts=0 must be positive"),
                         ({"ewc_batches": 0}, "ewc_batches=0 must be positive"),
                         ({"fvg_config": FVGConfig(temperature=0)}, "fvg_config.temperature=0 must be positive"),
                         ({"fvg_config": FVGConfig(shots=1)}, "shuffles at least 2 demonstrations"),
                         ({"fvg_config": FVGConfig(layer=-3)}, "fvg_config.layer=-3: give a layer index, or -1"),
                         ({"fvg_config": FVGConfig(prompt_tokens=-1)}, "fvg_config.prompt_tokens=-1: give a token count"),
                         ({"n_train": 0}, "--max-train 0 must be positive"),
                         ({"olora_penalty": "l1"}, "olora_penalty='l1' is unknown; use one of squared, abs"),
                         ({"fvg_config": FVGConfig(fv_dir="fvs")}, "fvg_config.fv_dir=fvs is set but FVG is off: add --fvg"),
                         ({"lora_alpha": 0}, "lora_alpha=0 must be positive"),
                         ({"fvg_config": FVGConfig(alpha_kl=float("nan"))}, "fvg_config.alpha_kl=nan must be a finite"),
                         ({"fvg_config": FVGConfig(alpha_fv=float("inf"))}, "fvg_config.alpha_fv=inf must be a finite"),
                         ({"fvg_config": FVGConfig(temperature=float("nan"))}, "fvg_config.temperature=nan must be"),
                         ({"fvg_config": FVGConfig(scale=float("nan"))}, "fvg_config.scale=nan must be a finite")):
        with pytest.raises(ValueError, match=message):
            small_cit(**bad).validate()
    for bad, message in (({"method": "seq", "lora_r": 16}, "lora_r=16 applies to LoRA runs, and --method seq"),
                         ({"method": "replay", "lora_targets": ["c_attn"]}, "lora_targets=.* applies to LoRA runs"),
                         ({"ewc_strength": 5.0}, "ewc_strength=5.0 applies to --method ewc only, and this run is "
                                                 "--method seq"),
                         ({"method": "seq", "replay": 0.5}, "replay=0.5 applies to --method replay only"),
                         ({"olora_penalty": "abs"}, "olora_penalty=abs applies to --method olora only"),
                         ({"method": "multitask", "fvg": True}, "multitask trains every task at once .*; drop --fvg"),
                         ({"fvg_config": FVGConfig(alpha_kl=1.0)}, "fvg_config.alpha_kl=1.0 is set but FVG is off"),
                         ({"seed": -1}, "--seed -1 must not be negative")):
        with pytest.raises(ValueError, match=message):
            small_cit(**bad).validate()
    for fine in ({"method": "inclora", "lora_r": 16}, {"method": "ewc", "finetune": "lora", "lora_targets": ("c_attn",)},
                 {"method": "seq", "lora_targets": ["q_proj", "v_proj"]}, {"method": "olora", "olora_penalty": "abs"},
                 {"fvg": True, "fvg_config": FVGConfig(alpha_kl=1.0)},
                 {"fvg_config": FVGConfig(prompt_tokens=4096)}):  # cit analyze cuts general files' FV prompts to it
        small_cit(**fine).validate()  # the setting is read (or a list equal to its default tuple)
    with pytest.raises(ValueError, match="NI-Seq-G1 unknown"):
        run_cit(small_cit(sequence="NI-Seq-G1"), icl_world_dir / "x", log=lambda s: None)
    assert not (icl_world_dir / "x").exists()
    from forgetlab.experiments.cit import check_inputs  # a task twice would share its checkpoint and resume state

    with pytest.raises(ValueError, match="names capitalize_first more than once; give each task once"):
        check_inputs(small_cit(sequence="capitalize_first,sub_4,capitalize_first"))


def test_training_answers_end_where_generation_is_cut(small_cit, icl_world_dir, tiny_llama_dir, tmp_path, monkeypatch):
    """World answers end with the newline the world model stops at (an eos target taught a world model that
    already did a task to run on past its answer: 100 -> 50); task-file answers end with eos."""
    from transformers import AutoTokenizer

    import forgetlab.experiments.cit as cit

    world_tok = AutoTokenizer.from_pretrained(icl_world_dir / "model")
    newline = world_tok.get_vocab()["\n"]
    assert cit.answer_end_ids(small_cit(), world_tok) == [newline]
    assert cit.answer_end_ids(small_cit(answer_end="eos"), world_tok) == [world_tok.eos_token_id]
    llama_tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    files = CITConfig(model=str(tiny_llama_dir), sequence="a.json")
    assert cit.answer_end_ids(files, llama_tok) == [llama_tok.eos_token_id]
    with pytest.raises(ValueError, match="answer_end='stop'"):
        small_cit(answer_end="stop").validate()

    seen = []
    real = cit.qa_dataset
    monkeypatch.setattr(cit, "qa_dataset", lambda p, a, eos, pad: seen.append((a, eos)) or real(p, a, eos, pad))
    cfg = small_cit(method="seq", sequence="capitalize_first", save_checkpoints=False)
    run_cit(replace(cfg, train=replace(cfg.train, max_steps=1)), tmp_path, log=lambda s: None, progress=False)
    answers, eos = seen[0]
    assert eos is None and answers and all(a[-1] == newline and newline not in a[:-1] for a in answers)


def test_generation_budget_follows_the_longest_reference(tiny_llama_dir):
    from transformers import AutoTokenizer

    from forgetlab.experiments.cit import new_token_budget

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    long_ref = " ".join(["word"] * 6)
    n = len(tok.encode(" " + long_ref, add_special_tokens=False))
    rows = [{"references": ["yes"]}, {"references": ["no", long_ref]}]
    assert 16 < n < 127 and new_token_budget(tok, rows, CITConfig()) == n + 1  # the answer and its end
    assert new_token_budget(tok, rows, CITConfig(max_target_tokens=n - 1)) == n - 1  # no longer than training shows
    assert new_token_budget(tok, rows[:1], CITConfig()) == 16  # short answers keep room for "The answer is B"
    assert new_token_budget(tok, rows, CITConfig(max_new_tokens=5)) == 5
    with pytest.raises(ValueError, match="max_new_tokens=-1"):
        CITConfig(world_dir="x", max_new_tokens=-1).validate()


def test_task_score_is_the_mean_of_hand_scored_answers(small_cit, icl_world_dir, monkeypatch):
    """task_score: each row's generated answer scored against its references (ROUGE-L F1 ×100, the best reference;
    option accuracy when every reference is a letter), averaged over the rows. Generation is scripted; it must be
    asked for each row's prompt ids (whole: rows are made to fit ``max_source_tokens`` when they are built), and for
    the first non-blank line only when answers end with eos."""
    from transformers import AutoTokenizer

    import forgetlab.experiments.cit as cit

    tok = AutoTokenizer.from_pretrained(icl_world_dir / "model")
    rows = [{"prompt": f"Give the word in gold .\nQ: {x}\nA:", "answer": " " + refs[0], "references": refs}
            for x, refs in (("one", ["six"]), ("two", ["basna"]), ("three", ["red fox", "the red fox jumps"]),
                            ("four", ["B"]), ("five", ["C"]))]
    answers = ["six",           # exact: 100
               "six",           # no word shared: 0
               "the red fox",   # "red fox": P 2/3, R 1, F 0.8; "the red fox jumps": P 1, R 3/4, F 6/7 -> 600/7
               "The answer is B",  # letter references: option accuracy, 100
               "B"]             # 0
    asked = []

    def scripted(model, tokenizer, prompts, max_new_tokens, batch_size=32, *, skip_blank_lines=False):
        asked.append((prompts, max_new_tokens, skip_blank_lines))
        return answers

    monkeypatch.setattr(cit, "generate", scripted)
    cfg = small_cit(max_new_tokens=0)
    assert cit.task_score(None, tok, rows, cfg) == pytest.approx((100 + 0 + 600 / 7 + 100 + 0) / 5)  # 400/7
    prompts, budget, skip = asked[0]
    assert prompts == [tok(r["prompt"], add_special_tokens=False)["input_ids"] for r in rows]
    assert budget == 16 and skip is False  # one-word references: the floor of 16 tokens; a newline-ending world
    cit.task_score(None, tok, rows, replace(cfg, answer_end="eos"))
    assert asked[1][2] is True


def test_general_abilities_are_first_token_accuracies_counted_by_hand(small_cit, icl_world_dir):
    """GP and IP: over the world's general tasks, the share of prompts (instructed zero-shot; 5-shot) whose first
    answer token is the model's top-1, ×100, on the prompts ``icl_prompts`` draws (seed: the run's; split: the
    world's). By hand: each prompt alone, unpadded, written out as ``Q: x\\nA: y`` blocks after BOS. The smoke model
    answers almost anything with "six", "basna" or a newline, so some general tasks are relabelled with those two
    words: its scores are then neither 0 nor 100."""
    from transformers import AutoTokenizer

    from forgetlab.eval.icl import icl_prompts
    from forgetlab.experiments.cit import general_abilities
    from forgetlab.models.build import load_model
    from forgetlab.worlds.icl import ICLWorld

    world = ICLWorld.read(icl_world_dir / "world.json")
    names = ("planet_of", "capitalize", "reverse", "first_letter", "next_letter", "pick_first")
    relabelled = [replace(t, pairs=tuple((x, ("six", "basna")[i % 2]) for i, (x, _) in enumerate(t.pairs)))
                  for t in world.tasks if t.name in names]
    world = replace(world, config=replace(world.config, seed=5), tasks=relabelled)  # split seed 5, run seed 3
    cfg = small_cit(seed=3, general_prompts=6)
    tok = AutoTokenizer.from_pretrained(icl_world_dir / "model")
    model = load_model(icl_world_dir / "model")

    def hit(prompt):
        text = (f"{prompt.instruction}\n" if prompt.instruction else "") + "".join(
            f"Q: {x}\nA: {y}\n\n" for x, y in prompt.demos) + f"Q: {prompt.query}\nA:"
        ids = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
        target = tok(text + " " + prompt.answer, add_special_tokens=False)["input_ids"][len(ids) - 1]
        with torch.no_grad():
            return int(model(torch.tensor([ids])).logits[0, -1].argmax()) == target

    def by_hand(shots, seed, split_seed):
        per_task = []
        for task in world.role("general"):
            prompts = icl_prompts(task.as_icl_task(), 6, shots, seed, split_seed)
            kind = "ten_shot" if shots else "zero_shot_instruction"
            assert all(len(p.demos) == shots and bool(p.instruction) == (shots == 0) for p in prompts[kind])
            per_task.append(np.mean([hit(p) for p in prompts[kind]]))
        return 100 * float(np.mean(per_task))

    gp, ip = by_hand(0, 3, 5), by_hand(5, 3, 5)
    assert 0 < gp < 100 and 0 < ip < 100 and gp != ip
    assert general_abilities(model, tok, world, cfg) == {"gp": pytest.approx(gp), "ip": pytest.approx(ip)}
    assert by_hand(5, 5, 3) != ip and by_hand(10, 3, 5) != ip  # seeds swapped or 10 shots would show


def test_world_tasks_by_name_form_a_sequence(small_cit, icl_world_dir):
    tasks, world = load_sequence(small_cit(sequence="capitalize_first, reworded_reverse"))
    assert [t.name for t in tasks] == ["capitalize_first", "reworded_reverse"]
    test = world.task("reworded_reverse").splits(world.config.seed).test
    assert [x for x, _ in tasks[1].split()[1]] == [x for x, _ in test]


def test_train_loss_records_each_methods_terms_per_task(small_cit, icl_world_dir, tmp_path):
    """results.json's ``train_loss``: per task its steps, the mean LM loss and each weighted method term. At a
    learning rate of 1e-12 the weights barely move, so EWC's penalty (distance to its anchor) and FVG's
    consistency term stay at 0, while the FV-guided KL does not (its teacher has the FV added)."""
    from forgetlab.methods.fvg import FVGConfig
    from forgetlab.worlds.icl import ICLWorld

    two = ",".join(ICLWorld.read(icl_world_dir / "world.json").sequences[0][:2])
    still = lambda cfg: replace(cfg, train=replace(cfg.train, lr=1e-12))  # noqa: E731
    logs = []
    ewc = run_cit(still(small_cit(method="ewc", sequence=two)), tmp_path / "ewc", log=logs.append,
                  progress=False)
    assert any(line.startswith("[cit] after ") and "mean loss lm " in line and ", ewc " in line for line in logs)
    assert [sorted(t) for t in ewc["train_loss"]] == [["lm", "steps", "task", "train_rows"],
                                                      ["ewc", "lm", "steps", "task", "train_rows"]]
    assert [t["task"] for t in ewc["train_loss"]] == two.split(",")
    # the last task's own training rows, scored again on the saved final model, give the recorded score
    from transformers import AutoTokenizer

    from forgetlab.experiments.cit import _rows, _template, task_score
    from forgetlab.models.build import load_model

    cfg = small_cit(method="ewc", sequence=two)
    tasks, world = load_sequence(cfg)
    train, _ = tasks[1].split(cfg.n_train, cfg.n_test, cfg.seed)
    final = tmp_path / "ewc" / "model"
    tok = AutoTokenizer.from_pretrained(final)
    rows = _rows(tasks[1], train, _template(cfg, world), PromptFitter(tok, cfg.max_source_tokens))
    again = task_score(load_model(str(final)), tok, rows, cfg)
    assert ewc["train_loss"][1]["train_rows"] == {"n": len(train), "score": again} and len(train) == 12
    assert ewc["train_loss"][1]["ewc"] == pytest.approx(0.0, abs=1e-12)
    assert all(t["lm"] > 0 and t["steps"] == 3 for t in ewc["train_loss"])
    assert json.loads((tmp_path / "ewc" / "results.json").read_text())["train_loss"] == ewc["train_loss"]
    report = (tmp_path / "ewc" / "report.md").read_text()
    assert "| ewc |" in report and "| train_rows" not in report  # the loss table's header: loss terms only
    assert "its own training rows against its test rows" in report
    fvg = still(replace(small_cit(method="inclora", sequence=two), fvg=True,
                        fvg_config=FVGConfig(n_prompts=4, shots=3, top_k=3)))
    guided = run_cit(fvg, tmp_path / "fvg", log=lambda s: None, progress=False)["train_loss"]
    assert all(t["fv"] == pytest.approx(0.0, abs=1e-9) and t["kl"] > 1e-5 for t in guided)
    # how far the KL's target gives the label: rates and probabilities, per task, also in the report
    for t in guided:
        assert sorted(t["fvg_target"]) == ["frozen_fv_p_answer", "frozen_fv_top1", "frozen_p_answer", "frozen_top1"]
        assert all(0 <= v <= 1 for v in t["fvg_target"].values())
    assert "FVG's KL target against the labels" in (tmp_path / "fvg" / "report.md").read_text()


@pytest.mark.slow
def test_fvg_terms_change_training_only_when_weighted_and_only_trainable_weights(small_cit, icl_world_dir, tmp_path):
    from forgetlab.methods.fvg import FVGConfig

    base = small_cit(method="inclora")
    plain = run_cit(base, tmp_path / "plain", log=lambda s: None, progress=False)
    zero = run_cit(replace(base, fvg=True, fvg_config=FVGConfig(alpha_fv=0.0, alpha_kl=0.0, n_prompts=4, shots=3)),
                   tmp_path / "zero", log=lambda s: None, progress=False)
    assert zero["fvg"] is True and zero["R"] == plain["R"] and zero["final"] == plain["final"]
    weighted = run_cit(replace(base, fvg=True, fvg_config=FVGConfig(alpha_fv=5.0, alpha_kl=50.0, n_prompts=4, shots=3)),
                       tmp_path / "fvg", log=lambda s: None, progress=False)
    w_plain = load_file(tmp_path / "plain" / "model" / "model.safetensors")
    w_fvg = load_file(tmp_path / "fvg" / "model" / "model.safetensors")
    w_start = load_file(icl_world_dir / "model" / "model.safetensors")
    assert any(not (w_plain[k] == w_fvg[k]).all() for k in w_plain)  # the terms moved the weights
    moved = {k for k in w_start if not (w_start[k] == w_fvg[k]).all()}
    assert moved and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in moved)  # only LoRA targets trained
    assert weighted["fvg"] is True
    run_cit(replace(base, fvg=True, fvg_config=FVGConfig(alpha_fv=0.0, alpha_kl=0.0, alpha_kl_all=50.0, n_prompts=4, shots=3)),
            tmp_path / "fvg_all", log=lambda s: None, progress=False)
    w_all = load_file(tmp_path / "fvg_all" / "model" / "model.safetensors")
    assert any(not (w_plain[k] == w_all[k]).all() for k in w_plain)  # the answer-token KL alone moves the weights


@pytest.mark.slow
def test_fv_source_initial_and_universal_heads(small_cit, icl_world_dir, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    import forgetlab.experiments.cit as cit
    from forgetlab.fv.vectors import function_vector
    from forgetlab.methods.fvg import FVGConfig, task_function_vector
    from forgetlab.models.adapter import adapt
    from forgetlab.models.build import load_model
    from forgetlab.worlds.icl import ICLWorld

    used, guides = {}, {}
    real = cit.FVGuidance

    def recording(adapter, tokenizer, name, pairs, *args, **kw):
        guide = real(adapter, tokenizer, name, pairs, *args, **kw)
        used[name], guides[name] = (guide.fv.vector, pairs), list(guide.heads)
        return guide

    monkeypatch.setattr(cit, "FVGuidance", recording)
    fvg = FVGConfig(alpha_fv=5.0, alpha_kl=5.0, n_prompts=4, shots=3, top_k=3)  # fewer than the model has
    two = ICLWorld.read(icl_world_dir / "world.json").sequences[0][:2]
    base = replace(small_cit(method="inclora", sequence=",".join(two)), fvg=True)
    run_cit(replace(base, fvg_config=replace(fvg, fv_source="initial")), tmp_path / "initial", log=lambda s: None,
            progress=False)
    initial = dict(used)
    run_cit(replace(base, fvg_config=fvg), tmp_path / "previous", log=lambda s: None, progress=False)
    start = adapt(load_model(icl_world_dir / "model"))
    tok = AutoTokenizer.from_pretrained(icl_world_dir / "model")
    for name, (vector, pairs) in initial.items():  # by hand: the same extraction on the untouched initial model
        assert torch.allclose(vector, task_function_vector(start, tok, name, pairs, fvg).vector, atol=1e-5)
    first, second = list(initial)
    assert torch.allclose(used[first][0], initial[first][0], atol=1e-5)  # before any training the two agree
    assert not torch.allclose(used[second][0], initial[second][0], atol=1e-4)  # after task 1 they do not
    with pytest.raises(ValueError, match="fv_source='base' is unknown"):
        replace(base, fvg_config=replace(fvg, fv_source="base")).validate()

    # universal heads: one head set for every task, the top-k of the initial CIEs averaged over the tasks
    used.clear()
    run_cit(replace(base, fvg_config=replace(fvg, fv_source="initial", heads="universal")), tmp_path / "universal",
            log=lambda s: None, progress=False)
    results = {name: task_function_vector(start, tok, name, pairs, fvg) for name, (_, pairs) in initial.items()}
    mean_cie = np.mean([r.cie_per_prompt.mean(0).numpy() for r in results.values()], axis=0)
    k = len(next(iter(results.values())).top_heads)
    by_hand = [tuple(int(i) for i in np.unravel_index(j, mean_cie.shape)) for j in np.argsort(-mean_cie, axis=None)[:k]]
    assert any(sorted(r.top_heads) != sorted(by_hand) for r in results.values())  # the test can tell the two apart
    for name, (vector, _) in used.items():
        heads = guides[name]
        assert sorted(heads) == sorted(by_hand)
        assert torch.allclose(vector, function_vector(start, results[name].mean_activations, by_hand), atol=1e-5)
    with pytest.raises(ValueError, match="add --set fvg_config.fv_source=initial"):
        replace(base, fvg_config=replace(fvg, heads="universal")).validate()

    # the initial FVs a run extracted, saved in OUT/fv/, drive a later run to the very same model
    assert sorted(p.name for p in (tmp_path / "universal" / "fv").iterdir()) == sorted(initial)
    reused = replace(fvg, fv_dir=str(tmp_path / "universal" / "fv"), heads="universal")
    run_cit(replace(base, fvg_config=reused), tmp_path / "reused", log=lambda s: None, progress=False)
    assert not (tmp_path / "reused" / "fv").exists()  # nothing extracted, nothing to save
    w_universal = load_file(tmp_path / "universal" / "model" / "model.safetensors")
    w_reused = load_file(tmp_path / "reused" / "model" / "model.safetensors")
    assert all(torch.equal(w_universal[k], w_reused[k]) for k in w_universal)


@pytest.mark.slow
def test_replay_and_ewc_baselines(small_cit, icl_world_dir, tmp_path):
    logs = []
    base = small_cit()
    run_cit(replace(base, method="replay", replay=1.0), tmp_path / "replay", log=logs.append, progress=False)
    steps = [int(line.split("(")[1].split()[0]) for line in logs if line.startswith("[cit] after")]
    # 12 rows a task in batches of 4, one micro-batch a step: 12 / 4 = 3 steps; from task 2 on, replay=1.0 adds
    # round(1.0 · 12) = 12 of the earlier tasks' rows (the pool holds 12 or more): (12 + 12) / 4 = 6 steps
    assert steps == [12 // 4] + [(12 + 12) // 4] * 4
    from forgetlab.methods.fvg import FVGConfig  # FVG on top of replay: replayed rows carry no FVG terms

    guided = run_cit(replace(base, method="replay", replay=1.0, fvg=True,
                             fvg_config=FVGConfig(n_prompts=4, shots=3, alpha_kl_all=1.0)),
                     tmp_path / "replay_fvg", log=lambda s: None, progress=False)
    assert guided["fvg"] is True and len(guided["R"]) == 6
    weights = {}
    for label, settings in (("seq", {"method": "seq"}), ("ewc0", {"method": "ewc", "ewc_strength": 0.0}),
                            ("ewc", {"method": "ewc", "ewc_strength": 1e3})):
        run_cit(replace(base, **settings), tmp_path / label, log=lambda s: None, progress=False)
        weights[label] = load_file(tmp_path / label / "model" / "model.safetensors")
    same = lambda a, b: all((weights[a][k] == weights[b][k]).all() for k in weights[a])  # noqa: E731
    assert same("seq", "ewc0")       # a zero-weight penalty leaves training exactly as plain fine-tuning
    assert not same("seq", "ewc")    # the Fisher penalty changes the updates from task 2 on


def _three_tasks(icl_world_dir) -> list[str]:
    from forgetlab.worlds.icl import ICLWorld

    return ICLWorld.read(icl_world_dir / "world.json").sequences[0][:3]


def _phase_spy(monkeypatch, cit, seen_phases: list) -> None:
    """Record the phase (task name) each ``train_phase`` call trains, in order."""
    real = cit.train_phase

    def spy(model, data, config, **kw):
        seen_phases.append(kw["phase"])
        return real(model, data, config, **kw)

    monkeypatch.setattr(cit, "train_phase", spy)


def test_ewc_anchors_at_the_previous_task_and_sums_the_fishers_of_all_earlier_tasks(small_cit, icl_world_dir, tmp_path, monkeypatch):
    """While task k trains, EWC pulls towards the weights after task k-1 (its checkpoint) with the Fisher summed over
    every earlier task j: the diagonal Fisher of the model after task j on task j's first ``ewc_batches`` batches of
    training rows (run_cit's ``fisher[n] + new[n]``). Recomputed here from the saved checkpoints."""
    from transformers import AutoTokenizer

    import forgetlab.experiments.cit as cit
    from forgetlab.analysis.recovery import encode_qa
    from forgetlab.methods.regularizers import diagonal_fisher
    from forgetlab.models.build import load_model
    from forgetlab.train.data import qa_dataset

    sequence = _three_tasks(icl_world_dir)
    cfg = small_cit(method="ewc", sequence=",".join(sequence), ewc_batches=2, ewc_strength=1e3)
    phases, seen = [], {}
    _phase_spy(monkeypatch, cit, phases)
    real_penalty = cit.ewc_penalty

    def recording(model, fisher, anchor, strength):  # the first call of each task: its Fisher and anchor
        if phases[-1] not in seen:
            seen[phases[-1]] = ({n: f.clone() for n, f in fisher.items()}, {n: a.clone() for n, a in anchor.items()},
                                strength)
        return real_penalty(model, fisher, anchor, strength)

    monkeypatch.setattr(cit, "ewc_penalty", recording)
    monkeypatch.setattr(cit, "general_abilities", lambda *a, **k: {})  # GP/IP are not under test: skipped for time
    run_cit(cfg, tmp_path, log=lambda s: None, progress=False)
    assert list(seen) == sequence[1:]  # no penalty on the first task

    tok = AutoTokenizer.from_pretrained(icl_world_dir / "model")
    tasks, world = load_sequence(cfg)
    after = [load_model(tmp_path / "checkpoints" / f"task-{k + 1:02d}-{name}") for k, name in enumerate(sequence[:2])]
    weights = [{n: p.detach() for n, p in model.named_parameters()} for model in after]

    def first_batches(k):  # ewc_batches=2 batches of batch_size 4: training rows 0..7 of task k
        train, _ = tasks[k].split(cfg.n_train, cfg.n_test, cfg.seed)
        rows = cit._rows(tasks[k], train, cit._template(cfg, world), PromptFitter(tok, cfg.max_source_tokens))
        prompts, answers = encode_qa(tok, rows)
        rows = qa_dataset(prompts, [a + cit.answer_end_ids(cfg, tok) for a in answers], None, tok.pad_token_id)
        return [rows.batch(torch.arange(start, start + 4)) for start in (0, 4)]

    fishers = [diagonal_fisher(after[k], first_batches(k)) for k in (0, 1)]
    close = dict(rtol=1e-5, atol=1e-12)
    for name, anchor, fisher in ((sequence[1], weights[0], fishers[0]),
                                 (sequence[2], weights[1], {n: fishers[0][n] + fishers[1][n] for n in fishers[0]})):
        got_fisher, got_anchor, strength = seen[name]
        assert strength == 1e3 and sorted(got_fisher) == sorted(got_anchor) == sorted(weights[0])  # every weight
        for n in fisher:
            assert torch.equal(got_anchor[n], anchor[n]), (name, n)
            torch.testing.assert_close(got_fisher[n], fisher[n], **close, msg=f"{name} {n}")
    # the test can tell the rules apart: the anchors differ, and neither task's Fisher alone is the sum
    assert any(not torch.equal(weights[0][n], weights[1][n]) for n in weights[0])
    for alone in fishers:
        assert any(not torch.allclose(alone[n], seen[sequence[2]][0][n], **close) for n in alone)


def test_olora_penalises_overlap_with_the_trained_a_matrices_of_every_earlier_adapter(small_cit, icl_world_dir, tmp_path, monkeypatch):
    """O-LoRA at task k: for every adapted module the penalty's earlier subspace is the A matrices of the adapters of
    tasks 1..k-1 as each finished training, stacked in task order, and its current side is the fresh adapter's own
    trainable A (the parameters being trained, not copies)."""
    import forgetlab.experiments.cit as cit

    sequence = _three_tasks(icl_world_dir)
    cfg = small_cit(method="olora", sequence=",".join(sequence), save_checkpoints=False, olora_penalty="abs")
    at_start, at_end, trainable, seen = {}, {}, {}, {}
    real_train, real_penalty = cit.train_phase, cit.lora_orthogonality

    def a_matrices(model):  # by module name, read off PEFT's layers
        return {n: m.lora_A["default"].weight for n, m in model.named_modules()
                if hasattr(m, "lora_A") and "default" in m.lora_A}

    def spy(model, data, config, **kw):
        phase = kw["phase"]
        at_start[phase] = {n: a.detach().clone() for n, a in a_matrices(model).items()}
        trainable[phase] = [a for a in a_matrices(model).values()]
        outcome = real_train(model, data, config, **kw)
        at_end[phase] = {n: a.detach().clone() for n, a in a_matrices(model).items()}
        return outcome

    def recording(previous, current, penalty):
        previous, current = list(previous), list(current)
        phase = list(at_start)[-1]
        if phase not in seen:
            seen[phase] = ([p.detach().clone() for p in previous], current, [c.detach().clone() for c in current])
        assert penalty == "abs"  # the run's setting reaches the penalty
        return real_penalty(previous, current, penalty)

    monkeypatch.setattr(cit, "train_phase", spy)
    monkeypatch.setattr(cit, "lora_orthogonality", recording)
    monkeypatch.setattr(cit, "general_abilities", lambda *a, **k: {})  # GP/IP are not under test: skipped for time
    run_cit(cfg, tmp_path, log=lambda s: None, progress=False)
    assert list(seen) == sequence[1:]  # nothing earlier to be orthogonal to on the first task
    modules = list(at_end[sequence[0]])
    assert len(modules) == 2 * 2 and all(list(at_end[t]) == modules for t in sequence)  # q and v of 2 layers
    for k, name in enumerate(sequence[1:], start=1):
        previous, current, current_values = seen[name]
        expected = [torch.cat([at_end[t][m] for t in sequence[:k]]) for m in modules]
        assert [p.shape[0] for p in previous] == [k * cfg.lora_r] * len(modules)
        assert all(torch.equal(p, e) for p, e in zip(previous, expected)), name
        assert len(current) == len(modules) and all(c is a for c, a in zip(current, trainable[name]))
        assert all(c.requires_grad for c in current)
        assert all(torch.equal(c, at_start[name][m]) for c, m in zip(current_values, modules))  # before its first step
    # the test can tell: training moved each adapter's A, and every task starts a new one
    first = sequence[0]
    assert any(not torch.equal(at_start[first][m], at_end[first][m]) for m in modules)
    assert any(not torch.equal(at_start[sequence[1]][m], at_end[first][m]) for m in modules)


def test_replay_mixes_a_fraction_of_every_earlier_tasks_rows_and_trains_the_steps_that_implies(small_cit, icl_world_dir, tmp_path,
                                                                                              monkeypatch):
    """replay=0.5 over 12 rows per task, batches of 2, 2 micro-batches per step: task k trains on its 12 rows plus
    round(0.5 · 12) = 6 rows drawn from the pool of all earlier tasks' rows (12·(k-1)), seeded seed + k - 1."""
    import math

    from transformers import AutoTokenizer

    import forgetlab.experiments.cit as cit

    sequence = _three_tasks(icl_world_dir)
    cfg = small_cit(method="replay", replay=0.5, sequence=",".join(sequence), save_checkpoints=False)
    cfg = replace(cfg, train=replace(cfg.train, batch_size=2, grad_accum=2))
    mixes, trained = [], []
    real_mix, real_train = cit.mix_replay, cit.train_phase

    def spy_mix(current, old, fraction, seed, pad_id):
        mixed = real_mix(current, old, fraction, seed, pad_id)
        mixes.append((current, old, fraction, seed, mixed))
        return mixed

    def spy_train(model, data, config, **kw):
        trained.append(data)
        return real_train(model, data, config, **kw)

    monkeypatch.setattr(cit, "mix_replay", spy_mix)
    monkeypatch.setattr(cit, "train_phase", spy_train)
    monkeypatch.setattr(cit, "general_abilities", lambda *a, **k: {})  # GP/IP are not under test: skipped for time
    results = run_cit(cfg, tmp_path, log=lambda s: None, progress=False)

    n, batch, accum = 12, 2, 2
    mixed_rows = n + round(0.5 * n)  # 18
    steps = lambda rows: math.ceil(math.ceil(rows / batch) / accum)  # noqa: E731  micro-batches, then steps
    assert [t["steps"] for t in results["train_loss"]] == [steps(n), steps(mixed_rows), steps(mixed_rows)] == [3, 5, 5]
    assert [len(d) for d in trained] == [12, 18, 18]

    # each task's training rows by hand: "<definition>\nQ: <input>\nA: <answer>\n" in the world's words
    tok = AutoTokenizer.from_pretrained(icl_world_dir / "model")
    tasks, _ = load_sequence(cfg)

    def by_hand(task):
        train, _ = task.split(cfg.n_train, cfg.n_test, cfg.seed)
        return [tok(f"{task.definition}\nQ: {x}\nA: {refs[0]}\n", add_special_tokens=False)["input_ids"]
                for x, refs in train]

    def rows_of(data):
        return [ids[mask.bool()].tolist() for ids, mask in zip(data.input_ids, data.attention_mask)]

    expected = [by_hand(t) for t in tasks]
    assert rows_of(trained[0]) == expected[0] and len(mixes) == 2  # no mixing on the first task
    for k, (current, old, fraction, seed, mixed) in enumerate(mixes, start=1):
        assert rows_of(current) == expected[k] and fraction == 0.5 and seed == cfg.seed + k
        assert rows_of(old) == [row for earlier in expected[:k] for row in earlier]  # 12·k rows, in task order
        assert mixed is trained[k] and rows_of(mixed)[:n] == expected[k]
        replayed = rows_of(mixed)[n:]
        assert len(replayed) == 6 and all(row in rows_of(old) for row in replayed)
        assert len({tuple(row) for row in replayed}) == 6  # drawn without replacement


@pytest.mark.slow
def test_lwf_olora_and_multitask_baselines(small_cit, icl_world_dir, tmp_path):
    weights, results = {}, {}
    base = small_cit(method="inclora")
    for label, cfg in (("inclora", base), ("lwf0", replace(base, method="lwf", lwf_strength=0.0)),
                       ("lwf", replace(base, method="lwf", lwf_strength=50.0)),
                       ("olora0", replace(base, method="olora", olora_strength=0.0)),
                       ("olora", replace(base, method="olora", olora_strength=1e4))):
        results[label] = run_cit(cfg, tmp_path / label, log=lambda s: None, progress=False)
        weights[label] = load_file(tmp_path / label / "model" / "model.safetensors")
    same = lambda a, b: all((weights[a][k] == weights[b][k]).all() for k in weights[a])  # noqa: E731
    assert same("inclora", "lwf0") and same("inclora", "olora0")  # zero weight: exactly IncLoRA
    assert not same("inclora", "lwf") and not same("inclora", "olora")
    assert results["lwf"]["method"] == "lwf" and results["olora"]["method"] == "olora"
    logs = []
    joint = run_cit(small_cit(method="multitask"), tmp_path / "multitask", log=logs.append, progress=False)
    R = np.array(joint["R"])
    assert R.shape == (6, 5) and all((R[k] == R[1]).all() for k in range(2, 6))  # one jointly trained model
    assert joint["forget"] == pytest.approx(0.0) and "jointly" in logs[-1]


@pytest.mark.slow
def test_replay_and_ewc_on_lora(small_cit, icl_world_dir, tmp_path):
    """finetune=inclora|lora runs the full-fine-tuning baselines on adapters: only LoRA targets move."""
    start = load_file(icl_world_dir / "model" / "model.safetensors")
    weights = {}
    for label, cfg in (("replay", small_cit(method="replay", replay=1.0, finetune="inclora")),
                       ("lora", small_cit(method="lora")),
                       ("ewc", small_cit(method="ewc", finetune="lora", ewc_strength=1e6))):
        run_cit(cfg, tmp_path / label, log=lambda s: None, progress=False)
        weights[label] = load_file(tmp_path / label / "model" / "model.safetensors")
        moved = {k for k in start if not (start[k] == weights[label][k]).all()}
        assert moved and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in moved), label
    assert any(not (weights["lora"][k] == weights["ewc"][k]).all() for k in start)  # the Fisher penalty acts on LoRA


class Killed(Exception):
    pass


@pytest.mark.parametrize("method,strength", [("olora", {"olora_strength": 1e4}), ("ewc", {"ewc_strength": 1e5}),
                                             ("replay", {"replay": 0.5}), ("lora", {})])
def test_a_killed_run_resumes_after_its_last_task_with_the_same_result(small_cit, icl_world_dir, tmp_path, method, strength):
    """Each method's state between tasks (O-LoRA's earlier subspaces, EWC's Fisher and anchor, replay's
    rows, the one shared adapter) must come back: the resumed run equals the uninterrupted one bit for bit."""
    from forgetlab.worlds.icl import ICLWorld

    sequence = ICLWorld.read(icl_world_dir / "world.json").sequences[0][:3]
    cfg = small_cit(method=method, sequence=",".join(sequence), save_checkpoints=False, **strength)
    whole = run_cit(cfg, tmp_path / "whole", log=lambda s: None, progress=False)

    def kill_after_second(line):  # dies while scoring the third task: two tasks are done
        if line.startswith(f"[cit] after {sequence[2]}"):
            raise Killed

    with pytest.raises(Killed):
        run_cit(cfg, tmp_path / "killed", log=kill_after_second, progress=False)
    assert not (tmp_path / "killed" / "results.json").exists()
    # with LoRA the state holds the adapter and the layers it adapts, not the frozen rest the start loads anyway
    held = load_file(tmp_path / "killed" / "state" / "between-phases" / "model.safetensors")
    if method == "olora":  # IncLoRA: the adapter and the layers the earlier adapters were merged into
        assert held and all(".lora_" in k or ".base_layer." in k for k in held)
    elif method == "lora":  # one adapter, never merged: the base stays the initial one
        assert held and all(".lora_" in k for k in held)
    else:  # full fine-tuning: every weight
        assert set(load_file(tmp_path / "whole" / "model" / "model.safetensors")) <= set(held)
    recorded = tmp_path / "killed" / "state" / "model_files.json"  # what a resume must find at --model again
    assert recorded.is_file() == (method in ("olora", "lora"))
    logs = []
    resumed = run_cit(cfg, tmp_path / "killed", log=logs.append, progress=False)
    assert logs[0] == f"[cit] resuming after task 2/3 ({sequence[1]})"
    assert resumed["R"] == whole["R"] and resumed["general_after_each_task"] == whole["general_after_each_task"]
    assert resumed["train_loss"] == whole["train_loss"]  # the finished tasks' entries come back with the state
    a, b = (load_file(tmp_path / run / "model" / "model.safetensors") for run in ("whole", "killed"))
    assert all((a[k] == b[k]).all() for k in a)
    assert not (tmp_path / "killed" / "state").exists()  # finished: the between-task state is gone
    assert run_cit(cfg, tmp_path / "killed", log=logs.append, progress=False)["R"] == whole["R"]
    assert "finished run" in logs[-1]


def test_a_killed_run_with_adapter_checkpoints_resumes_onto_the_same_chain(small_cit, icl_world_dir, tmp_path):
    """The resumed run's later adapters chain onto the checkpoints saved before the kill, and every checkpoint loads
    as the uninterrupted run's."""
    from forgetlab.models.build import load_model
    from forgetlab.worlds.icl import ICLWorld

    sequence = ICLWorld.read(icl_world_dir / "world.json").sequences[0][:3]
    cfg = small_cit(method="inclora", sequence=",".join(sequence), checkpoint_format="adapter")
    run_cit(cfg, tmp_path / "whole", log=lambda s: None, progress=False)

    def kill_after_second(line):
        if line.startswith(f"[cit] after {sequence[2]}"):
            raise Killed

    with pytest.raises(Killed):
        run_cit(cfg, tmp_path / "killed", log=kill_after_second, progress=False)
    run_cit(cfg, tmp_path / "killed", log=lambda s: None, progress=False)
    for whole, resumed in zip(*(sorted((tmp_path / run / "checkpoints").iterdir()) for run in ("whole", "killed"))):
        a, b = load_model(whole).state_dict(), load_model(resumed).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), resumed.name
    last = sorted((tmp_path / "killed" / "checkpoints").iterdir())[-1]
    assert json.loads((last / "adapter_config.json").read_text())["base_model_name_or_path"] == f"../task-02-{sequence[1]}"


def test_a_lora_resume_refuses_other_model_files(tmp_path):
    """A LoRA run's resume reads the frozen weights from --model again, so the run records that model's files when it
    starts (names, sizes, sampled bytes) and refuses a resume on others: same-sized weights with other values too."""
    import os

    from forgetlab.experiments.cit import check_same_model_files, model_files

    model, out = tmp_path / "model", tmp_path / "run"
    model.mkdir()
    weights = bytes(range(256)) * 8192  # 2 MB: sampled, not read whole
    (model / "model.safetensors").write_bytes(weights)
    (model / "config.json").write_text("{}")
    check_same_model_files(out, str(model), writes=True)
    assert [f[:2] for f in json.loads((out / "state" / "model_files.json").read_text())] == [
        ["config.json", 2], ["model.safetensors", len(weights)]]
    os.utime(model / "model.safetensors", ns=(1, 1))  # the same bytes written again: the same model
    check_same_model_files(out, str(model), writes=True)
    changed = bytearray(weights)
    changed[len(weights) // 2:len(weights) // 2 + 70_000] = bytes(70_000)  # other values over a few percent, same size
    (model / "model.safetensors").write_bytes(bytes(changed))
    with pytest.raises(ValueError, match="is not the one this run started from"):
        check_same_model_files(out, str(model), writes=True)
    assert model_files("org/hub-name") is None
    check_same_model_files(out, "org/hub-name", writes=True)  # a hub name: nothing to compare


def test_resume_refuses_another_config(small_cit, icl_world_dir, tmp_path):
    from forgetlab.experiments.rundir import prepare_run_dir

    prepare_run_dir(tmp_path / "run", small_cit(method="inclora"), resume=False, overwrite=False)
    with pytest.raises(ValueError, match="different config.*method"):
        prepare_run_dir(tmp_path / "run", small_cit(method="seq"), resume=True, overwrite=False)
    # from Python too: run_cit on a directory holding another config's run refuses before any work
    (tmp_path / "run" / "results.json").write_text('{"method": "inclora"}')  # as if finished
    (tmp_path / "run" / "model").mkdir()
    (tmp_path / "run" / "model" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="different config.*method"):
        run_cit(small_cit(method="seq"), tmp_path / "run", log=lambda s: None, progress=False)


def test_checkpoint_every_resumes_inside_a_task(small_cit, icl_world_dir, tmp_path, monkeypatch):
    import forgetlab.train.trainer as trainer
    from forgetlab.worlds.icl import ICLWorld

    sequence = ICLWorld.read(icl_world_dir / "world.json").sequences[0][:2]
    # one LoRA adapter with dropout 0.1: the resumed steps must draw the dropout masks the whole run drew
    cfg = small_cit(method="lora", sequence=",".join(sequence), save_checkpoints=False)
    cfg = replace(cfg, train=replace(cfg.train, checkpoint_every=1))
    whole = run_cit(cfg, tmp_path / "whole", log=lambda s: None, progress=False)
    real = trainer.save_training_state

    def save_then_die(state_dir, *args, **kw):
        real(state_dir, *args, **kw)
        if state_dir.name == sequence[1]:
            raise Killed

    monkeypatch.setattr(trainer, "save_training_state", save_then_die)
    with pytest.raises(Killed):
        run_cit(cfg, tmp_path / "killed", log=lambda s: None, progress=False)
    monkeypatch.setattr(trainer, "save_training_state", real)
    held = load_file(tmp_path / "killed" / "state" / sequence[1] / "resume-state" / "model.safetensors")
    assert held and all(".lora_" in k for k in held)  # what the step trains, not the frozen base
    logs = []
    resumed = run_cit(cfg, tmp_path / "killed", log=logs.append, progress=False)
    assert logs[0].startswith("[cit] resuming after task 1/2") and f"[{sequence[1]}] resuming at step 1/" in logs[1]
    assert resumed["R"] == whole["R"]
    after_whole, after_resumed = (load_file(tmp_path / run / "model" / "model.safetensors") for run in ("whole", "killed"))
    assert all(torch.equal(after_whole[k], after_resumed[k]) for k in after_whole)


@pytest.mark.parametrize("architecture,targets", [("llama", ["q_proj", "v_proj"]), ("gpt2", ["c_attn"]),
                                                  ("gpt2_tied", ["c_attn"]), ("gpt_neox", ["query_key_value"])])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_checkpoint_equals_peft_merge_and_unload(tmp_path, architecture, targets, dtype):
    """The per-task checkpoint of a LoRA model, saved without copying the model, holds exactly the weights of
    PEFT's own ``merge_and_unload`` (GPT-2's Conv1D transposes its delta), and loads as a plain model; saved as
    the adapter alone on its base (``checkpoint_format=adapter``), it loads as the same weights."""
    import copy

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from forgetlab.experiments.cit import save_checkpoint
    from forgetlab.models.build import load_model

    torch.manual_seed(0)
    config = tiny_config(architecture.removesuffix("_tied"), 50)
    config.tie_word_embeddings = architecture.endswith("_tied")  # GPT-2 as released: unembedding = embedding
    base_model = random_model(config, dtype=dtype)
    base_model.save_pretrained(tmp_path / "base")
    model = get_peft_model(base_model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="CAUSAL_LM",
                                                  fan_in_fan_out=architecture.startswith("gpt2")))  # Conv1D: transposed
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero; give the adapter a real delta
            p.data.normal_(0, 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reference = copy.deepcopy(model).merge_and_unload().state_dict()
    save_checkpoint(model, None, tmp_path, 0, "t", CITConfig(method="lora"))
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoints" / "task-01-t", dtype=dtype).state_dict()
    assert sorted(saved) == sorted(reference)
    for key, value in reference.items():
        assert saved[key].dtype == dtype and torch.equal(saved[key], value), key
    save_checkpoint(model, None, tmp_path / "adapter", 0, "t", CITConfig(method="lora", checkpoint_format="adapter"),
                    str(tmp_path / "base"))
    assert not (tmp_path / "adapter" / "checkpoints" / "task-01-t" / "config.json").exists()
    loaded = load_model(tmp_path / "adapter" / "checkpoints" / "task-01-t", dtype).state_dict()
    assert sorted(loaded) == sorted(reference)
    for key, value in reference.items():
        assert loaded[key].dtype == dtype and torch.equal(loaded[key], value), key
    base = {k.replace(".base_layer", "").replace("base_model.model.", "", 1): v for k, v in before.items() if ".lora_" not in k}
    assert sum(not torch.equal(base[k], v) for k, v in reference.items()) == 3 * len(targets)  # the adapted matrices
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the model keeps its adapter, unmerged


def test_adapter_checkpoints_chain_on_the_previous_task_and_load_as_the_merged_ones(small_cit, icl_world_dir, tmp_path, monkeypatch):
    """checkpoint_format=adapter keeps only each task's LoRA adapter; IncLoRA's sits on the previous checkpoint (named
    relative to itself, so the run can move), the first on the initial model. Each loads as the merged checkpoint
    the default format writes, tensor for tensor, and `cit analyze` finds them; full fine-tuning has no adapter."""
    import shutil

    from forgetlab.experiments.cit_analysis import _run_setup
    from forgetlab.models.build import load_model

    cfg = small_cit(method="inclora")
    run_cit(cfg, tmp_path / "merged", log=lambda s: None, progress=False)
    run_cit(replace(cfg, checkpoint_format="adapter"), tmp_path / "adapter", log=lambda s: None, progress=False)
    shutil.move(tmp_path / "adapter", tmp_path / "moved")
    merged, adapters = (sorted((tmp_path / run / "checkpoints").iterdir()) for run in ("merged", "moved"))
    assert [p.name for p in merged] == [p.name for p in adapters] and len(adapters) == 5
    bases = [json.loads((p / "adapter_config.json").read_text())["base_model_name_or_path"] for p in adapters]
    assert bases == [str((icl_world_dir / "model").resolve())] + [f"../{p.name}" for p in adapters[:-1]]
    for one, other in zip(merged, adapters):
        assert not (other / "config.json").exists()
        assert sum(f.stat().st_size for f in other.iterdir()) < sum(f.stat().st_size for f in one.iterdir()) / 4
        a, b = load_model(one).state_dict(), load_model(other).state_dict()
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a), one.name
    leftover = tmp_path / "moved" / "checkpoints" / f"{adapters[-1].name}.tmp"  # a save killed half-way
    shutil.copytree(merged[-1], leftover)
    assert [p.name for p in _run_setup(tmp_path / "moved")[1]] == [p.name for p in adapters]
    shutil.rmtree(leftover)
    # loaded for training too (recovery, a later run's --model): trainable like any checkpoint; its config and
    # tokenizer found down the chain; a folder named like a base under the working directory is not taken for it
    from forgetlab.models.build import config_source, load_tokenizer

    assert all(p.requires_grad for p in load_model(adapters[-1]).parameters())
    assert Path(config_source(adapters[-1])).resolve() == (icl_world_dir / "model").resolve()
    for saved in [*adapters[1].glob("tokenizer*"), *adapters[2].glob("tokenizer*")]:  # two adapters without one
        saved.unlink()
    assert load_tokenizer(adapters[2]).get_vocab() == load_tokenizer(icl_world_dir / "model").get_vocab()
    (tmp_path / "elsewhere" / adapters[0].name).mkdir(parents=True)
    (tmp_path / "elsewhere" / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere" / "cwd")  # ../task-01-... exists here too, and is not the base
    a, b = load_model(merged[1]).state_dict(), load_model(adapters[1]).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    monkeypatch.chdir(tmp_path)

    # cit analyze merges each adapter into the model before it instead of reading its chain again: the initial
    # model is the only one read from disk, and every row and intervention is the merged run's
    import forgetlab.models.build as build
    from forgetlab.analysis.fv_drift import DriftSettings
    from forgetlab.experiments.cit_analysis import analyze_run

    settings = DriftSettings(n_prompts=3, eval_prompts=4, shots=3, top_k=3, alphas=(1.0,))
    analyze_run(tmp_path / "merged", settings, log=lambda s: None)
    real_load, loads = build.load_model, []
    monkeypatch.setattr(build, "load_model", lambda path, *a, **k: loads.append(Path(path).name) or real_load(path, *a, **k))
    analyze_run(tmp_path / "moved", settings, log=lambda s: None)
    assert loads == ["model"]
    rows = [json.loads((tmp_path / run / "drift.json").read_text())["rows"] for run in ("merged", "moved")]
    assert [{**r, "run": ""} for r in rows[0]] == [{**r, "run": ""} for r in rows[1]]
    assert json.loads((tmp_path / "moved" / "interventions.json").read_text()) == \
        json.loads((tmp_path / "merged" / "interventions.json").read_text())
    with pytest.raises(ValueError, match="checkpoint_format=adapter: method 'seq' fine-tunes every weight"):
        run_cit(replace(cfg, method="seq", checkpoint_format="adapter"), tmp_path / "seq", log=lambda s: None)
    with pytest.raises(ValueError, match="checkpoint_format='delta' is unknown; use one of merged, adapter"):
        run_cit(replace(cfg, checkpoint_format="delta"), tmp_path / "delta", log=lambda s: None)


def test_bfloat16_base_trains_float32_adapters_and_saves_bfloat16(small_cit, icl_world_dir, tmp_path, monkeypatch):
    """dtype=bfloat16 (a 7B model's base at half the memory): IncLoRA + FVG runs, its adapters train in float32, the
    checkpoints are bfloat16, and every weight outside the LoRA targets is the initial one rounded to bfloat16."""
    from forgetlab.methods.fvg import FVGConfig

    cfg = small_cit(method="inclora", dtype="bfloat16", fvg=True, fvg_config=FVGConfig(n_prompts=4, shots=3))
    seen = {}
    from forgetlab.experiments import cit

    real_train = cit.train_phase

    def spy(model, *args, **kw):
        seen.update({n: p.dtype for n, p in model.named_parameters() if p.requires_grad})
        return real_train(model, *args, **kw)

    monkeypatch.setattr(cit, "train_phase", spy)
    results = run_cit(cfg, tmp_path / "run", log=lambda s: None, progress=False)
    assert seen and all("lora_" in n and d == torch.float32 for n, d in seen.items())
    start = load_file(icl_world_dir / "model" / "model.safetensors")
    for path in [tmp_path / "run" / "model", *sorted((tmp_path / "run" / "checkpoints").iterdir())]:
        weights = load_file(path / "model.safetensors")
        assert all(w.dtype == torch.bfloat16 for w in weights.values())
        moved = {k for k in start if not torch.equal(start[k].to(torch.bfloat16), weights[k])}
        assert moved and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in moved)
    assert all(0 <= x <= 100 for row in results["R"] for x in row)
    from forgetlab.analysis.fv_drift import DriftSettings
    from forgetlab.experiments.cit_analysis import analyze_run

    from forgetlab.models import build

    loaded, real_load = [], build.load_model

    def spy_load(path, dtype=torch.float32):
        loaded.append(dtype)
        return real_load(path, dtype)

    monkeypatch.setattr(build, "load_model", spy_load)
    analyze_run(tmp_path / "run", DriftSettings(n_prompts=4, eval_prompts=4, shots=3, top_k=4, alphas=(1.0,)), log=lambda s: None)
    assert loaded and set(loaded) == {torch.bfloat16}  # analysed in the precision it was trained in
    assert (tmp_path / "run" / "drift.json").is_file()
    with pytest.raises(ValueError, match="dtype='float16' is unknown"):
        replace(cfg, dtype="float16").validate()


@pytest.mark.parametrize("method,fvg", [("inclora", True), ("seq", False)])
def test_gradient_checkpointing_trains_the_same_model(small_cit, icl_world_dir, tmp_path, method, fvg):
    """Recomputing activations in the backward pass changes memory, not the result: the same weights (LoRA dropout
    masks redrawn identically, FVG's hooked head outputs still carrying their gradients)."""
    from forgetlab.methods.fvg import FVGConfig

    cfg = small_cit(method=method, fvg=fvg,
                fvg_config=FVGConfig(alpha_fv=5.0, n_prompts=4, shots=3) if fvg else FVGConfig())
    run_cit(cfg, tmp_path / "plain", log=lambda s: None, progress=False)
    run_cit(replace(cfg, gradient_checkpointing=True), tmp_path / "ckpt", log=lambda s: None, progress=False)
    plain = load_file(tmp_path / "plain" / "model" / "model.safetensors")
    ckpt = load_file(tmp_path / "ckpt" / "model" / "model.safetensors")
    start = load_file(icl_world_dir / "model" / "model.safetensors")
    assert any(not torch.equal(start[k], plain[k]) for k in plain)
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], rtol=1e-4, atol=1e-6)
