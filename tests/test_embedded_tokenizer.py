"""The embedded model's tokenizer, as transformers rebuilds it from the GGUF, against the GGUF itself.

The GGUF (tokenizer.ggml.model "gpt2", add_bos_token false) holds a byte-level BPE vocabulary. What
transformers builds from it depends on its version (versions tested: docs/DEPENDENCIES.md): 4.51.0 and
4.56.2 build the right BPE but add <|im_start|> as a BOS on every encode(); 5.0.0 and 5.17.0 build a
CodeLlamaTokenizer that turns every space and newline into <|endoftext|> (id 0), BOS added too; 5.18.0
and later build the byte-level BPE without BOS. The converted dir is cached by the GGUF's hash alone,
so a tokenizer written by a bad version stays wrong after an upgrade. A wrong tokenizer changes every
prompt, so every reward; these tests fail on it, where the parity tests (engine vs transformers, same
ids) cannot. The oracle is the GGUF's own token strings, read with gguf, not transformers.
"""
from __future__ import annotations

import pytest

from rrm_engine.judge.prompt import SYSTEM, USER

TEXTS = [
    "Hello world",
    "a\nb",
    "  two leading spaces, a tab\tand\n\nblank lines\n",
    "unicode: café, 日本語, emoji 🙂",
    SYSTEM,
    USER,
]


@pytest.fixture(scope="module")
def gguf_tokens(embedded_path) -> list[str]:
    from gguf import GGUFReader
    return list(GGUFReader(str(embedded_path)).fields["tokenizer.ggml.tokens"].contents())


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_text_round_trips_without_unknown_tokens(smollm2_tokenizer, text):
    ids = smollm2_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert 0 not in ids, f"<|endoftext|> (id 0) inside plain text: {ids[:20]}"
    back = smollm2_tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    assert back == text


def test_ids_are_the_gguf_byte_level_tokens(smollm2_tokenizer, gguf_tokens):
    # "Ġ" is byte-level BPE's space, "Ċ" its newline: the GGUF's strings for these texts
    for text, pieces in [("Hello world", ["Hello", "Ġworld"]), ("a\nb", ["a", "Ċ", "b"])]:
        ids = smollm2_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert [gguf_tokens[i] for i in ids] == pieces, (text, ids)


def test_no_bos_is_added(smollm2_tokenizer):
    # the GGUF says tokenizer.ggml.add_bos_token = false; the chat template writes <|im_start|> itself
    assert smollm2_tokenizer("Hello world")["input_ids"] == smollm2_tokenizer(
        "Hello world", add_special_tokens=False)["input_ids"]
