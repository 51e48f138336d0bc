"""`vllm-lk generate --endpoint URL`: regenerate responses through a running OpenAI-compatible
server (ours, or vLLM's own api_server) instead of an engine of our own.

For a target that is already served (on the GPUs it needs) starting a second engine is often
impossible; asking the server is not. Prompts are rendered and tokenized here with the target's
tokenizer exactly as the in-process path does, sent as token ids to ``/v1/completions`` with
``return_token_ids`` (a vLLM extension both servers honour), so the output lines are the same:
``{id, prompt|messages, completion, prompt_token_ids, completion_token_ids, finish_reason}``, with
each record's seed derived from the run seed and its id. The output is resumable the same way
(ids already in OUT are skipped; settings are checked against OUT.config.json), lines are appended
as responses finish, and a 429 / 503 is retried after the server's Retry-After.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from tqdm.auto import tqdm

from training.generate import GenerateConfig, append_line, plan_run, record_id, record_line, record_seed
from vllm_lk.errors import InvalidInput

logger = logging.getLogger(__name__)
RETRIED = (429, 502, 503, 504)
MAX_ATTEMPTS = 8


async def _served_model(client, model: str | None) -> str:
    response = await client.get("/v1/models")
    if response.status_code != 200:
        raise InvalidInput(f"{client.base_url}/v1/models answered {response.status_code}: {response.text[:300]}")
    served = [m["id"] for m in response.json().get("data", [])]
    if model is None:
        if not served:
            raise InvalidInput(f"{client.base_url} serves no model")
        return served[0]
    if model not in served:
        raise InvalidInput(f"{client.base_url} does not serve {model!r} (it serves {', '.join(served)})")
    return model


async def _complete(client, body: dict, rid) -> dict:
    """One completion, retried while the server is busy or starting."""
    for attempt in range(MAX_ATTEMPTS):
        response = await client.post("/v1/completions", json=body)
        if response.status_code == 200:
            return response.json()["choices"][0]
        if response.status_code not in RETRIED or attempt == MAX_ATTEMPTS - 1:
            raise InvalidInput(f"record {rid!r}: {client.base_url}/v1/completions answered "
                               f"{response.status_code}: {response.text[:300]}")
        delay = float(response.headers.get("retry-after", 2 ** min(attempt, 5)))
        await asyncio.sleep(delay)
    raise AssertionError("unreachable")


def _line(record, ids: list[int], choice: dict) -> dict:
    if choice.get("token_ids") is None:
        raise InvalidInput("the endpoint did not return token ids (return_token_ids): it is not vLLM's server or ours")
    return record_line(record, ids, choice["text"], choice["token_ids"], choice["finish_reason"])


async def _run(config: GenerateConfig, pending, out: Path, endpoint: str, api_key: str | None, concurrency: int,
               model: str | None, initial: int, total: int) -> int:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(base_url=endpoint.rstrip("/"), headers=headers, timeout=600) as client:
        served = await _served_model(client, model)
        semaphore = asyncio.Semaphore(concurrency)
        fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        written = 0
        try:
            with tqdm(total=total, initial=initial, desc="generate", unit="rec") as bar:
                async def one(record, ids):
                    nonlocal written
                    body = {"model": served, "prompt": ids, "max_tokens": config.max_tokens,
                            "temperature": config.temperature, "top_p": config.top_p,
                            "seed": record_seed(config.seed, record_id(record)), "return_token_ids": True}
                    async with semaphore:
                        choice = await _complete(client, body, record_id(record))
                    append_line(fd, _line(record, ids, choice))  # one write: a kill leaves whole lines
                    written += 1
                    bar.update(1)

                await asyncio.gather(*(one(record, ids) for record, ids in pending))
            os.fsync(fd)
        finally:
            os.close(fd)
    return written


def generate_via_endpoint(config: GenerateConfig, out: str | Path, endpoint: str, api_key: str | None = None,
                          concurrency: int = 8, model: str | None = None) -> dict:
    """Write the served model's responses for every prompt not yet in ``out``; returns counts.
    ``config.target`` is the served model's directory (its tokenizer and context length)."""
    if concurrency < 1:
        raise InvalidInput(f"concurrency must be at least 1 (got {concurrency})")
    out = Path(out)
    config, pending, summary = plan_run(config, out)
    summary["endpoint"] = endpoint
    if pending:
        summary["written"] = asyncio.run(_run(config, pending, out, endpoint, api_key, concurrency, model,
                                              summary["skipped"], summary["records"]))
    return summary
