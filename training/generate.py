"""Regenerate responses with the target itself (vLLM, offline), resumably, for drafter training.

The paper distils the draft on the *target's own* responses, not on the dataset's: a draft is
served against the target's distribution, so that is the distribution it must learn. This module
takes prompts (a JSONL file of ``{"prompt"}`` / ``{"messages"}`` records, or a built-in set drawn
from the toy corpus) and writes one line per record:

    {"id", "prompt" | "messages", "completion", "prompt_token_ids", "completion_token_ids",
     "finish_reason"}

Resumable: every line carries its input's id (the record's ``"id"``, else its line number), a
rerun skips ids already written and appends the rest. Each line goes out in one ``write`` of the
whole line to an ``O_APPEND`` file, so a kill leaves at most a tail without its newline; the next
run drops that tail with a warning. Lines appear in *finish* order, not input order (requests
run concurrently); readers key on ``id``. Each record's sampling seed is derived from the run
seed and its id, so a resumed run produces what an uninterrupted one would have.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Literal

from pydantic import Field
from tqdm.auto import tqdm

from training.config import FrozenConfig
from training.data import DataError, Record
from training.prompts import load_prompts, record_id
from vllm_lk.errors import InvalidInput, MissingInput
from vllm_lk.hub import resolve_model_path

logger = logging.getLogger(__name__)

# fields of a run that change what is written; a resumed run must agree on all of them
OUTPUT_FIELDS = ("target", "prompts", "temperature", "top_p", "max_tokens", "seed")


class EngineFields(FrozenConfig):
    """vLLM engine settings shared by `generate` and `eval`; unset ones take
    vllm_lk.engine_defaults (float32, eager, 0.2 on CPU; vLLM's own on a GPU)."""

    dtype: Literal["float32", "bfloat16", "float16", "auto"] | None = Field(
        None, description="serving dtype (default: float32 on CPU, where bf16 kernels need AVX512-BF16; the model's on GPU)")
    enforce_eager: bool | None = Field(
        None, description="no CUDA graphs / torch.compile (default: on for CPU, where they only slow the start; vLLM's on GPU)")
    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1, description="share of device memory (host memory on CPU) for weights + KV cache (default: 0.2 on CPU, vLLM's on GPU)")
    max_model_len: int | None = Field(None, ge=16, description="longest prompt + completion (default: the target's max_position_embeddings)")
    max_num_seqs: int | None = Field(None, ge=1, description="requests run concurrently (default: vLLM's)")


class GenerateConfig(EngineFields):
    """`vllm-lk generate`: what to regenerate and how to sample it."""

    target: Path | None = Field(None, description="HF target directory, or a Hugging Face id ORG/NAME[@REVISION] in the "
                                "local HF cache (default: the toy target, built if missing)")
    prompts: str = Field(
        "builtin:code:train:200",
        description="JSONL file of {prompt}/{messages} records, or builtin:KIND:SPLIT:COUNT[:SEED] with KIND "
        "code (continue a stdlib file prefix) | docstring (chat: write the function) and SPLIT train | heldout",
    )
    temperature: float = Field(1.0, ge=0, description="sampling temperature (0 = greedy)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling threshold")
    max_tokens: int = Field(256, ge=1, description="most tokens generated per record")
    seed: int = Field(0, description="run seed; each record samples with a seed derived from this and its id")


def read_done(out: Path) -> set:
    """Ids already written to ``out``. A last line without its newline (a run killed mid-write)
    is dropped with a warning and cut off the file, so appends start on a fresh line; any other
    unreadable line is an error naming ``out:line`` (the file is not ours to overwrite)."""
    if not out.exists():
        return set()
    data = out.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]  # b"" when there is no newline at all
    if len(complete) < len(data):
        logger.warning("%s: dropping a truncated last line (%d bytes) left by an interrupted run", out, len(data) - len(complete))
        with out.open("r+b") as handle:
            handle.truncate(len(complete))
    done = set()
    for number, line in enumerate(complete.decode("utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{out}:{number}: not a generate output line ({err.msg}); refusing to append") from None
        if not isinstance(obj, dict) or "id" not in obj:
            raise DataError(f"{out}:{number}: not a generate output line (no 'id'); refusing to append")
        done.add(obj["id"])
    return done


def append_line(fd: int, obj: dict) -> None:
    """One JSON line in a single write (O_APPEND): a kill cannot interleave or half-write it
    except by cutting the very write, which leaves only the tail that ``read_done`` drops."""
    data = (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8")
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def check_run_config(out: Path, config: GenerateConfig) -> None:
    """Record the settings that shape the output next to it (``OUT.config.json``); a resumed run
    with different ones would mix two distributions in one file, so it is refused."""
    sidecar = out.with_name(out.name + ".config.json")
    current = config.model_dump(mode="json")
    if sidecar.exists() and out.exists() and out.stat().st_size:
        previous = json.loads(sidecar.read_text())
        changed = {k: (previous.get(k), current[k]) for k in OUTPUT_FIELDS if previous.get(k) != current[k]}
        if changed:
            detail = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
            raise InvalidInput(f"{out} was generated with other settings ({detail}); use another --out or the same settings")
    sidecar.write_text(json.dumps(current, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------
# the engine


def engine_kwargs(config: EngineFields) -> dict:
    from vllm_lk.engine_defaults import platform_defaults

    kwargs = platform_defaults()
    for name in ("dtype", "enforce_eager", "gpu_memory_utilization", "max_model_len", "max_num_seqs"):
        if getattr(config, name) is not None:
            kwargs[name] = getattr(config, name)
    return kwargs


def context_limit(target: Path, config: EngineFields) -> int | None:
    if config.max_model_len is not None:
        return config.max_model_len
    model_config = json.loads((Path(target) / "config.json").read_text())
    return model_config.get("max_position_embeddings")


def encode_record(record: Record, tokenizer) -> list[int]:
    """Prompt token ids: completion prompts as the tokenizer encodes text (special tokens as
    vLLM adds them), chat records through the chat template (which writes its own specials)."""
    # verbose=False: over-long built-in candidates are measured here and skipped, not warned about
    if record.prompt is not None:
        return list(tokenizer(record.prompt, verbose=False)["input_ids"])
    return list(tokenizer(record.text(tokenizer), add_special_tokens=False, verbose=False)["input_ids"])


def encode_prompts(records: list[Record], tokenizer, where: str, limit: int | None) -> list[list[int]]:
    """Every record's prompt ids; one that leaves no room to generate under ``limit`` is an
    error naming its line."""
    encoded = []
    for record in records:
        ids = encode_record(record, tokenizer)
        if limit is not None and len(ids) >= limit:
            raise DataError(f"{where}:{record.line}: prompt is {len(ids)} tokens, the context limit is {limit}")
        encoded.append(ids)
    return encoded


def prepare_prompts(spec: str, target: Path, config: EngineFields, max_tokens: int) -> tuple[list[Record], list[list[int]]]:
    """(records, prompt ids), all validated before any engine starts. A built-in set draws only
    prompts that leave room to generate (at most max(limit - max_tokens, limit / 2) tokens): its
    user cannot edit it, so an over-long candidate is skipped, not an error."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(target))
    limit = context_limit(target, config)
    keep = None
    if limit is not None:
        budget = max(limit - max_tokens, limit // 2)
        keep = lambda record: len(encode_record(record, tokenizer)) <= budget  # noqa: E731
    records = load_prompts(spec, target, keep)
    return records, encode_prompts(records, tokenizer, spec, limit)


def record_seed(seed: int, rid) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{rid!r}".encode()).digest()[:4], "little")


def resolve_target(target: str | Path | None) -> Path:
    """The target's directory: the toy target for None (built if missing), a Hugging Face id found
    in the local HF cache (vllm_lk.hub), or the directory given."""
    if target is None:
        from training.toy.target import ToyTargetConfig, build_toy_target

        target = Path(build_toy_target(ToyTargetConfig())["path"])
    target = resolve_model_path(target, kind="target")
    if not (Path(target) / "config.json").is_file():
        raise MissingInput(f"{target}: not a HF model directory (no config.json)")
    return Path(target).resolve()


def make_llm(target: Path, config: EngineFields, **extra):
    from vllm import LLM

    return LLM(model=str(target), **engine_kwargs(config), **extra)


def plan_run(config: GenerateConfig, out: Path) -> tuple[GenerateConfig, list, dict]:
    """(config with the target resolved, the (record, prompt ids) not yet in ``out``, the summary
    so far), everything validated; what every way of generating does before it generates."""
    target = resolve_target(config.target)
    config = config.model_copy(update={"target": target})
    records, token_ids = prepare_prompts(config.prompts, target, config, config.max_tokens)
    out.parent.mkdir(parents=True, exist_ok=True)
    check_run_config(out, config)
    done = read_done(out)
    pending = [(r, ids) for r, ids in zip(records, token_ids) if record_id(r) not in done]
    summary = {"out": str(out), "records": len(records), "skipped": len(records) - len(pending), "written": 0}
    if stray := done - {record_id(r) for r in records}:
        logger.warning("%s holds %d ids that are not in %s", out, len(stray), config.prompts)
    if not pending:
        logger.info("%s: all %d records already generated", out, len(records))
    return config, pending, summary


def generate(config: GenerateConfig, out: str | Path, llm=None) -> dict:
    """Write the target's responses for every prompt not yet in ``out``; returns counts.

    Everything is validated (prompts, ids, lengths, the settings of an existing ``out``) before
    an engine starts. ``llm``: an already running ``vllm.LLM`` on the same target (tests share
    one); otherwise one is started and shut down here.
    """
    out = Path(out)
    config, pending, summary = plan_run(config, out)
    if not pending:
        return summary
    own_llm = llm is None
    if own_llm:
        llm = make_llm(config.target, config, seed=config.seed)
    try:
        summary["written"] = _run(llm, config, pending, out, summary["skipped"], summary["records"])
    finally:
        if own_llm:
            llm.llm_engine.engine_core.shutdown()
    return summary


def _run(llm, config: GenerateConfig, pending, out: Path, initial: int, total: int) -> int:
    """Submit every pending record and append each as it finishes (finish order)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    engine = llm.llm_engine
    by_request = {}
    for index, (record, ids) in enumerate(pending):
        params = SamplingParams(
            temperature=config.temperature, top_p=config.top_p, max_tokens=config.max_tokens,
            seed=record_seed(config.seed, record_id(record)),
        )
        request_id = f"gen-{index}"
        engine.add_request(request_id, TokensPrompt(prompt_token_ids=ids), params)
        by_request[request_id] = record
    written = 0
    fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        with tqdm(total=total, initial=initial, desc="generate", unit="rec") as bar:
            while engine.has_unfinished_requests():
                for output in engine.step():
                    if output.finished:
                        append_line(fd, output_record(by_request[output.request_id], output))
                        written += 1
                        bar.update(1)
        os.fsync(fd)
    finally:
        os.close(fd)
    return written


def output_record(record: Record, output) -> dict:
    """The line of a finished vLLM request."""
    completion = output.outputs[0]
    return record_line(record, output.prompt_token_ids, completion.text, completion.token_ids, completion.finish_reason)


def record_line(record: Record, prompt_token_ids, completion: str, completion_token_ids, finish_reason) -> dict:
    """The line the trainer reads (exactly these keys)."""
    line = {"id": record_id(record)}
    if record.prompt is not None:
        line["prompt"] = record.prompt
    else:
        line["messages"] = [dict(m) for m in record.messages]
    line.update(
        completion=completion,
        prompt_token_ids=list(prompt_token_ids),
        completion_token_ids=list(completion_token_ids),
        finish_reason=finish_reason,
    )
    return line
