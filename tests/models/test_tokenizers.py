from transformers import AutoTokenizer

from forgetlab.models.tokenizers import build_word_tokenizer
from forgetlab.worlds.biography import split_words


def test_word_tokenizer_round_trip(tmp_path):
    text = "What is the birth city of Ana Bel Cor?\nAnswer: Velmor"
    tok = build_word_tokenizer(split_words(text))
    tok.save_pretrained(str(tmp_path))
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert loaded.eos_token == "<eos>" and loaded.pad_token == "<pad>"
    ids = loaded(text, add_special_tokens=False)["input_ids"]
    assert loaded.convert_ids_to_tokens(ids) == ["What", "is", "the", "birth", "city", "of", "Ana", "Bel", "Cor", "?",
                                                 "\n", "Answer", ":", "Velmor"]
    assert loaded.unk_token_id not in ids
    assert loaded("Zzz", add_special_tokens=False)["input_ids"] == [loaded.unk_token_id]


def test_special_prefix_is_what_the_tokenizer_itself_adds():
    from tokenizers.processors import TemplateProcessing

    from forgetlab.analysis.recovery import encode_qa
    from forgetlab.models.tokenizers import special_prefix

    tok = build_word_tokenizer(split_words("What is the birth city of Ana ?\nAnswer: Velmor"))
    assert tok.bos_token_id is not None and special_prefix(tok) == []  # defines <bos>, never adds it
    rows = [{"prompt": "What is the birth city of Ana ?\nAnswer:", "answer": " Velmor"}]
    prompts, answers = encode_qa(tok, rows)
    assert prompts == [tok(rows[0]["prompt"], add_special_tokens=False)["input_ids"]]  # as the world's models train
    assert tok.convert_ids_to_tokens(answers[0]) == ["Velmor"]
    bos = tok.bos_token_id  # a Llama-like tokenizer that puts BOS first itself
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    assert special_prefix(tok) == [bos]
    assert encode_qa(tok, rows)[0] == [[bos] + prompts[0]]


def test_word_vocabulary_ids_are_fixed_by_the_words_alone():
    """Specials first (<pad> 0, <eos> 1, <bos> 2, <unk> 3), then newline, then the words in sorted order, each once:
    every process that builds the world's tokenizer gets the same ids, whatever order the words came in (a cached
    phase trained in another process reads its token ids through this numbering)."""
    words = ["pear", "apple", "\n", "Zed", "pear", "mango", "kiwi", "fig", "date", "lime", "7"]
    tok = build_word_tokenizer(words)
    want = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "\n": 4, "7": 5, "Zed": 6, "apple": 7, "date": 8, "fig": 9,
            "kiwi": 10, "lime": 11, "mango": 12, "pear": 13}
    assert tok.get_vocab() == want
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert build_word_tokenizer(reversed(words)).get_vocab() == want


def test_pad_id_is_the_pad_token_else_eos():
    from forgetlab.models.tokenizers import pad_id

    tok = build_word_tokenizer(["a", "b"])
    assert pad_id(tok) == tok.pad_token_id == 0 != tok.eos_token_id
    tok.pad_token = None  # saved without a pad token (GPT-2's tokenizer)
    assert tok.pad_token_id is None and pad_id(tok) == tok.eos_token_id == 1
