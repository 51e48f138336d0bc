import pytest

from training.toy import corpus
from training.toy import tokenizer as tk


@pytest.fixture(scope="module")
def texts():
    train, _ = corpus.split_sources(corpus.read_sources(), 20)
    return [s.text for s in train[:120]]


@pytest.fixture(scope="module")
def hf_tokenizer(texts):
    return tk.wrap(tk.train_bpe(texts, 600), max_length=512)


def test_special_tokens_have_fixed_ids_and_stay_whole(hf_tokenizer):
    for expected_id, token in enumerate(tk.SPECIAL_TOKENS):
        assert hf_tokenizer.convert_tokens_to_ids(token) == expected_id
        assert hf_tokenizer(token, add_special_tokens=False)["input_ids"] == [expected_id]
    assert len(hf_tokenizer) == 600
    assert hf_tokenizer.eos_token == tk.EOS_TOKEN


@pytest.mark.parametrize(
    "text",
    ["def f(x):\n    return x + 1\n", "\t\tmixed \r\n whitespace  ", "unicode: é ß 漢字 😀 \x00 \x7f", ""],
)
def test_byte_level_round_trip_is_exact(hf_tokenizer, text):
    ids = hf_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert hf_tokenizer.decode(ids) == text


def test_round_trip_on_held_out_source_files(hf_tokenizer):
    _, heldout = corpus.split_sources(corpus.read_sources(), 20)
    for source in heldout[:20]:
        ids = hf_tokenizer(source.text, add_special_tokens=False, verbose=False)["input_ids"]
        assert hf_tokenizer.decode(ids) == source.text, source.relpath


def test_bpe_compresses_code(hf_tokenizer, texts):
    sample = "".join(texts[:10])
    ids = hf_tokenizer(sample, add_special_tokens=False, verbose=False)["input_ids"]
    assert len(sample.encode()) / len(ids) > 2.0  # even a 600-token BPE beats bytes twice over


def test_chat_template(hf_tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sort a list."}]
    text = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|system|>\nBe brief.<|end|>\n<|user|>\nSort a list.<|end|>\n<|assistant|>\n"


def test_training_is_deterministic(texts):
    assert tk.train_bpe(texts[:40], 400).to_str() == tk.train_bpe(texts[:40], 400).to_str()


def test_vocab_below_bytes_is_refused():
    with pytest.raises(ValueError, match="256 bytes"):
        tk.train_bpe(["abc"], 100)
