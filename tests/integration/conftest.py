"""Fixtures shared by the server test modules."""

from __future__ import annotations

import pytest

from tests.integration.server_harness import LiveEngine, tiny_config


@pytest.fixture(scope="module")
def live(tiny_target, tiny_draft):
    """A real AsyncLLM (tiny target + tiny draft) behind the app, one per test module; a module
    that needs other engine limits defines its own ``live``."""
    engine = LiveEngine(tiny_config(tiny_target, tiny_draft))
    yield engine
    engine.close()
