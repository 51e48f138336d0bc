"""training.generate without vLLM: built-in prompt sets, input validation, the resumable output
file, and the generate loop driven by a stand-in engine (so resume is tested without a model server)."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest

from training.data import DataError
from training.generate import GenerateConfig, append_line, check_run_config, encode_prompts, generate, read_done
from training.prompts import builtin_prompts, load_prompts, parse_builtin, record_id
from training.toy import corpus

HELDOUT_EVERY = 20  # the toy target's default split


def test_builtin_prompts_are_deterministic_and_seeded():
    first = builtin_prompts("code", "heldout", 6, seed=1)
    again = builtin_prompts("code", "heldout", 6, seed=1)
    other = builtin_prompts("code", "heldout", 6, seed=2)
    assert [r.prompt for r in first] == [r.prompt for r in again]
    assert [r.prompt for r in first] != [r.prompt for r in other]
    assert [r.extra["id"] for r in first] == [f"code:heldout:1:{i}" for i in range(6)]


@pytest.mark.parametrize("kind", ["code", "docstring"])
@pytest.mark.parametrize("split", ["train", "heldout"])
def test_builtin_prompts_respect_the_split(kind, split):
    records = builtin_prompts(kind, split, 12, seed=0)
    assert len(records) == 12
    assert all(corpus.is_heldout(r.extra["source"], HELDOUT_EVERY) == (split == "heldout") for r in records)


def test_code_prompts_are_whole_lines_of_their_source_file():
    sources = {s.relpath: s.text for s in corpus.read_sources()}
    for record in builtin_prompts("code", "train", 8, seed=3):
        assert record.messages is None and record.prompt.endswith("\n")
        assert 100 <= len(record.prompt) <= 800
        text = sources[record.extra["source"]]
        start = text.index(record.prompt)
        assert start == 0 or text[start - 1] == "\n"


def test_docstring_prompts_ask_with_a_docstring_of_their_file():
    """The same request shape as the toy target's chat training examples (user turn = docstring)."""
    sources = {s.relpath: s.text for s in corpus.read_sources()}
    for record in builtin_prompts("docstring", "heldout", 8, seed=0):
        assert record.prompt is None and len(record.messages) == 1 and record.messages[0]["role"] == "user"
        docs = [doc for doc, _ in corpus.docstring_examples(sources[record.extra["source"]])]
        assert record.messages[0]["content"] in docs


def test_builtin_spec_parsing():
    assert parse_builtin("builtin:code:heldout:50") == ("code", "heldout", 50, 0)
    assert parse_builtin("builtin:docstring:train:7:3") == ("docstring", "train", 7, 3)
    for bad in ("builtin:code:heldout", "builtin:code:heldout:x", "builtin:a:b:c:d:e"):
        with pytest.raises(ValueError):
            parse_builtin(bad)
    with pytest.raises(ValueError, match="kind must be one of"):
        load_prompts("builtin:poetry:train:3")


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_ids_are_the_records_own_or_their_line_numbers(tmp_path):
    path = write(tmp_path / "p.jsonl", ['{"prompt": "a", "id": "x"}', "", '{"prompt": "b"}'])
    assert [record_id(r) for r in load_prompts(str(path))] == ["x", 3]


@pytest.mark.parametrize(
    "lines,message",
    [
        (['{"prompt": "a", "id": 2}', '{"prompt": "b"}'], r"p.jsonl:2: id 2 repeats line 1"),
        (['{"prompt": "a", "id": [1]}'], r"p.jsonl:1: 'id' must be a string or an integer"),
        (['{"prompt": "a"}', '{"prompt": 5}'], r"p.jsonl:2: 'prompt' must be a non-empty string"),
    ],
)
def test_bad_prompt_files_name_file_and_line(tmp_path, lines, message):
    path = write(tmp_path / "p.jsonl", lines)
    with pytest.raises(DataError, match=message):
        load_prompts(str(path))


class CharTokenizer:
    """One token per character; a chat template like the toy target's."""

    def __call__(self, text, add_special_tokens=True, verbose=True):
        return {"input_ids": ([0] if add_special_tokens else []) + [ord(c) for c in text]}

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + ("<assistant>" if add_generation_prompt else "")

    def decode(self, ids):
        return "".join(chr(i) for i in ids if i)


def test_prompts_are_encoded_as_served_and_length_checked(tmp_path):
    path = write(tmp_path / "p.jsonl", ['{"prompt": "ab"}', '{"messages": [{"role": "user", "content": "hi"}]}'])
    records = load_prompts(str(path))
    ids = encode_prompts(records, CharTokenizer(), str(path), limit=100)
    assert ids[0] == [0, ord("a"), ord("b")]  # completion prompt: the tokenizer's specials
    assert CharTokenizer().decode(ids[1]) == "<user>hi<assistant>"  # chat: the template's, no extra
    with pytest.raises(DataError, match=r"p.jsonl:2: prompt is 19 tokens, the context limit is 10"):
        encode_prompts(records, CharTokenizer(), str(path), limit=10)


def test_read_done_drops_a_truncated_last_line(tmp_path, caplog):
    out = tmp_path / "out.jsonl"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    append_line(fd, {"id": 1, "completion": "x"})
    append_line(fd, {"id": "b", "completion": "y"})
    os.close(fd)
    whole = out.read_bytes()
    out.write_bytes(whole + b'{"id": 3, "compl')  # a write cut short by a kill
    assert read_done(out) == {1, "b"}
    assert "truncated last line" in caplog.text
    assert out.read_bytes() == whole  # cut off, so the next append starts on its own line


def test_read_done_refuses_a_corrupt_complete_line(tmp_path):
    out = write(tmp_path / "out.jsonl", ['{"id": 1}', "not json", '{"id": 2}'])
    with pytest.raises(DataError, match=r"out.jsonl:2: not a generate output line"):
        read_done(out)
    write(out, ['{"completion": "no id"}'])
    with pytest.raises(DataError, match=r"out.jsonl:1: .*no 'id'"):
        read_done(out)
    assert read_done(tmp_path / "missing.jsonl") == set()


def test_a_resumed_run_must_keep_the_output_settings(tmp_path):
    out = write(tmp_path / "out.jsonl", ['{"id": 1}'])
    config = GenerateConfig(target=tmp_path, temperature=1.0)
    check_run_config(out, config)
    check_run_config(out, config.model_copy(update={"gpu_memory_utilization": 0.3}))  # engine-only: fine
    with pytest.raises(ValueError, match=r"temperature: 1.0 -> 0.5"):
        check_run_config(out, config.model_copy(update={"temperature": 0.5}))


class FakeEngine:
    """Stands in for vllm's LLMEngine: finishes one request per step with a fixed completion;
    ``die_after`` steps raises, as a killed run would stop."""

    def __init__(self, die_after=None):
        self.queue, self.steps, self.die_after, self.seeds = [], 0, die_after, []

    def add_request(self, request_id, prompt, params):
        self.queue.append((request_id, prompt["prompt_token_ids"]))
        self.seeds.append(params.seed)

    def has_unfinished_requests(self):
        return bool(self.queue)

    def step(self):
        if self.die_after is not None and self.steps == self.die_after:
            raise KeyboardInterrupt("killed")
        self.steps += 1
        request_id, ids = self.queue.pop(0)
        completion = SimpleNamespace(text="ok", token_ids=[7, 8], finish_reason="stop")
        return [SimpleNamespace(request_id=request_id, finished=True, prompt_token_ids=ids, outputs=[completion])]


@pytest.fixture
def tokenizer_dir(tmp_path, monkeypatch):
    """A model directory whose tokenizer is the character stand-in (no model weights needed)."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({"max_position_embeddings": 64}))
    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", lambda *a, **k: CharTokenizer())
    return tmp_path / "model"


def test_generate_resumes_after_an_interrupted_run_without_duplicates(tmp_path, tokenizer_dir):
    prompts = write(tmp_path / "p.jsonl", [json.dumps({"prompt": f"p{i}"}) for i in range(5)]
                    + ['{"messages": [{"role": "user", "content": "q"}], "id": "chat"}'])
    config = GenerateConfig(target=tokenizer_dir, prompts=str(prompts), max_tokens=4)
    out = tmp_path / "out.jsonl"
    dying = FakeEngine(die_after=2)
    with pytest.raises(KeyboardInterrupt):
        generate(config, out, llm=SimpleNamespace(llm_engine=dying))
    assert len(out.read_text().splitlines()) == 2
    summary = generate(config, out, llm=SimpleNamespace(llm_engine=FakeEngine()))
    assert summary == {"out": str(out), "records": 6, "skipped": 2, "written": 4}
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(map(str, (line["id"] for line in lines))) == ["1", "2", "3", "4", "5", "chat"]
    chat = next(line for line in lines if line["id"] == "chat")
    assert list(chat) == ["id", "messages", "completion", "prompt_token_ids", "completion_token_ids", "finish_reason"]
    assert chat["messages"] == [{"role": "user", "content": "q"}] and chat["completion_token_ids"] == [7, 8]
    assert list(lines[0]) == ["id", "prompt", "completion", "prompt_token_ids", "completion_token_ids", "finish_reason"]
    # nothing left: no engine is needed (llm=None would start one)
    assert generate(config, out)["written"] == 0


def test_record_seeds_do_not_depend_on_what_is_left_to_do(tmp_path, tokenizer_dir):
    """A resumed run gives each record the seed an uninterrupted run would have."""
    prompts = write(tmp_path / "p.jsonl", [json.dumps({"prompt": f"p{i}"}) for i in range(4)])
    config = GenerateConfig(target=tokenizer_dir, prompts=str(prompts))
    full = FakeEngine()
    generate(config, tmp_path / "a.jsonl", llm=SimpleNamespace(llm_engine=full))
    write(tmp_path / "b.jsonl", ['{"id": 1}', '{"id": 2}'])
    rest = FakeEngine()
    generate(config, tmp_path / "b.jsonl", llm=SimpleNamespace(llm_engine=rest))
    assert rest.seeds == full.seeds[2:]


def test_cli_flags_come_from_the_config_models():
    from server.cli import build_parser

    choices = build_parser()._subparsers._group_actions[0].choices
    gen_help, eval_help = choices["generate"].format_help(), choices["eval"].format_help()
    for flag in ("--out", "--target", "--prompts", "--temperature", "--max-tokens", "--seed", "--config", "builtin:KIND"):
        assert flag in gen_help
    for flag in ("--json", "--target", "--drafter", "--method", "--num-speculative-tokens", "--temperature", "--max-tokens"):
        assert flag in eval_help
