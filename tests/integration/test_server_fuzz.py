"""Schema-driven fuzzing: schemathesis generates requests — valid ones and ones that break the
schema — for every operation of the server's own OpenAPI document, and sends them to a real server
over a real engine; no response may be a 5xx. The engine's context is kept short (64 tokens) so
that valid generation requests finish quickly and the run stays around a minute.

(schemathesis' pytest plugin needs pytest internals that pytest 9 removed, so the operations are
driven through its strategies with plain hypothesis.)
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from tests.integration.server_harness import API_KEY, MODEL, LiveEngine, tiny_config

pytestmark = pytest.mark.integration
EXAMPLES = {"/v1/completions": 40, "/v1/chat/completions": 40}  # generation routes: the interesting ones
OTHER_EXAMPLES = 10


@pytest.fixture(scope="module")
def live(tiny_target, tiny_draft):
    config = tiny_config(tiny_target, tiny_draft, engine_args={"max_model_len": 64, "gpu_memory_utilization": 0.1})
    engine = LiveEngine(config)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def api_schema(live):
    base, _ = live.serve()
    return schemathesis.openapi.from_url(base + "/openapi.json")


def fuzz(operation, mode: GenerationMode, failures: list, counts: dict) -> None:
    examples = EXAMPLES.get(operation.path, OTHER_EXAMPLES)

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def run(case):
        if mode == GenerationMode.POSITIVE and isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = MODEL  # a random model id only ever meets the 404 check
        response = case.call(headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
        counts[response.status_code] = counts.get(response.status_code, 0) + 1
        if response.status_code >= 500:
            failures.append(f"{response.status_code} {case.method} {case.path} body={case.body!r}: {response.text[:300]}")

    try:
        run()
    except Unsatisfiable:  # no inputs to break (e.g. GET /health): nothing negative to send
        assert mode == GenerationMode.NEGATIVE


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_server_errors(api_schema, mode):
    failures: list[str] = []
    counts: dict[int, int] = {}
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/v1/models"}
    for operation in operations:
        fuzz(operation, mode, failures, counts)
    print(f"{mode}: responses by status {dict(sorted(counts.items()))}")
    assert not failures, "\n".join(failures[:10])
    if mode == GenerationMode.POSITIVE:
        assert counts.get(200, 0) > 0
