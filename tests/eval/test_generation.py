"""Batched greedy generation against greedy decoding of each prompt alone, and under several processes."""

import json

import pytest
import torch

from forgetlab.eval.generation import answer_text, generate
from forgetlab.models.zoo import random_model, tiny_config


def test_the_answer_is_the_first_line_and_an_eos_model_may_start_on_a_new_one():
    assert answer_text(" gold\nQ: next") == "gold"
    assert answer_text("\nB\nbecause") == ""  # a newline-ending (ICL-world) model stopped before answering
    assert answer_text("\n\n B \nbecause", skip_blank_lines=True) == "B"  # "Output:\nB" from a chat model
    assert answer_text("", skip_blank_lines=True) == ""


def test_batched_generation_equals_greedy_decoding_of_each_prompt_alone(icl_world_dir):
    """``generate`` left-pads prompts of different lengths into batches: each answer must be what a naive greedy loop
    on that prompt alone (no padding, no cache, stop at eos) decodes to, cut at its first line (its first non-blank
    line with ``skip_blank_lines``). A random model over the world's words, its newline and eos rows scaled up so that
    continuations stop early, start with a blank line or run on past one."""
    import random

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(icl_world_dir / "model")
    config = tiny_config("llama", len(tok), n_layers=2)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    model = random_model(config, seed=2)
    newline, eos = tok.get_vocab()["\n"], tok.eos_token_id
    with torch.no_grad():
        model.lm_head.weight[newline] *= 6
        model.lm_head.weight[eos] *= 4
    rng = random.Random(2)
    prompts = [[tok.bos_token_id] + [rng.choice(range(3, len(tok))) for _ in range(n)]
               for n in (3, 9, 1, 14, 6, 11, 2, 8, 5, 12)]  # every length different

    def greedy_alone(prompt, budget=8):
        ids = list(prompt)
        with torch.no_grad():
            while len(ids) - len(prompt) < budget:
                token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
                if token == eos:
                    break
                ids.append(token)
        return ids[len(prompt):]

    new = [greedy_alone(p) for p in prompts]
    raw = [tok.decode(ids, skip_special_tokens=True) for ids in new]
    first_line = [t.split("\n")[0].strip() for t in raw]
    first_text_line = [t.lstrip().split("\n")[0].strip() for t in raw]
    assert generate(model, tok, prompts, 8, batch_size=3) == first_line
    assert generate(model, tok, prompts, 8, batch_size=3, skip_blank_lines=True) == first_text_line
    # the cases are all there: early eos, a blank first line, text cut before a later line
    assert any(len(ids) < 8 for ids in new) and any(len(ids) == 8 for ids in new)
    assert any(a != b for a, b in zip(first_line, first_text_line))
    assert any(line and line != t.strip() for line, t in zip(first_line, raw))
    # and padding shows: the first batch decoded with its pads attended to gives other answers
    width = max(len(p) for p in prompts[:3])
    padded = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts[:3]])
    careless = model.generate(input_ids=padded, attention_mask=torch.ones_like(padded), max_new_tokens=8, do_sample=False,
                              pad_token_id=tok.pad_token_id, eos_token_id=eos)
    assert tok.batch_decode(careless[:, width:], skip_special_tokens=True) != raw[:3]


@pytest.mark.slow
def test_generation_is_shared_between_processes(tiny_llama_dir, tmp_path, torchrun):
    """Under torchrun each process generates its share of the prompts; every process gets all the answers back,
    in order, equal to one process generating them all (greedy, same-length prompts: no padding differences)."""
    from forgetlab.models.build import load_model
    from transformers import AutoTokenizer

    script = tmp_path / "gen.py"
    script.write_text(
        "import json, sys\n"
        "from transformers import AutoTokenizer\n"
        "from forgetlab.eval.generation import generate\n"
        "from forgetlab.models.build import load_model\n"
        "from forgetlab.train import distributed\n"
        "distributed.init_from_env()\n"
        "tok = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "prompts = [[tok.bos_token_id, 5 + i, 9, 40 + i] for i in range(5)]\n"
        "texts = generate(load_model(sys.argv[1]), tok, prompts, max_new_tokens=4, batch_size=2)\n"
        f"open('{tmp_path}/gen' + str(distributed.rank()) + '.json', 'w').write(json.dumps(texts))\n"
        "distributed.leave()\n")
    proc = torchrun(script, tiny_llama_dir, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    alone = generate(load_model(tiny_llama_dir), tok, [[tok.bos_token_id, 5 + i, 9, 40 + i] for i in range(5)], 4, 2)
    assert len(set(alone)) > 1  # the prompts get different answers, so an order mix-up would show
    for rank in (0, 1):
        assert json.loads((tmp_path / f"gen{rank}.json").read_text()) == alone
