import pytest

from training.data import DataError, read_jsonl


def write(tmp_path, text, name="data.jsonl"):
    path = tmp_path / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def test_reads_prompts_and_messages_with_metadata(tmp_path):
    path = write(tmp_path, '{"prompt": "def f(", "id": 7}\n\n{"messages": [{"role": "user", "content": "hi"}]}\n')
    first, second = read_jsonl(path)
    assert (first.line, first.prompt, first.extra) == (1, "def f(", {"id": 7})
    assert second.line == 3 and second.messages == ({"role": "user", "content": "hi"},)


@pytest.mark.parametrize(
    "line,message",
    [
        ('{"prompt": "x"', "invalid JSON"),
        ('["prompt"]', "expected a JSON object"),
        ('{"text": "x"}', "exactly one of"),
        ('{"prompt": "x", "messages": []}', "exactly one of"),
        ('{"prompt": ""}', "non-empty string"),
        ('{"messages": []}', "non-empty list"),
        ('{"messages": [{"role": "bot", "content": "x"}]}', "role must be one of"),
        ('{"messages": [{"role": "user", "content": 3}]}', "content must be a string"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, line, message):
    path = write(tmp_path, '{"prompt": "ok"}\n' + line + "\n")
    with pytest.raises(DataError, match=message) as err:
        read_jsonl(path)
    assert f"{path}:2:" in str(err.value)


def test_empty_and_binary_files(tmp_path):
    with pytest.raises(DataError, match="empty file"):
        read_jsonl(write(tmp_path, "\n\n"))
    with pytest.raises(DataError, match="not UTF-8"):
        read_jsonl(write(tmp_path, b'{"prompt": "\xff"}\n', "bin.jsonl"))


def test_chat_records_render_with_the_tokenizer(tmp_path, tiny_target):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_target)
    (record,) = read_jsonl(write(tmp_path, '{"messages": [{"role": "user", "content": "Sort a list."}]}\n'))
    assert record.text(tokenizer) == "<|user|>\nSort a list.<|end|>\n<|assistant|>\n"
