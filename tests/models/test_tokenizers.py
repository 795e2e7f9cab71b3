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
