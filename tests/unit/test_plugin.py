import importlib
import importlib.metadata as md
import logging
import subprocess
import sys

import pytest

import vllm_lk.plugin


class ListHandler(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture()
def fresh_plugin(monkeypatch):
    """The plugin module as in a process where vLLM has not yet called register(), with a
    handler of our own on its logger (vLLM's handler is not configured in the test process)."""
    monkeypatch.delenv("VLLM_LK_DISABLE", raising=False)
    module = importlib.reload(vllm_lk.plugin)
    module._ensure_vllm_logging()  # as in a vLLM process; configuring later would drop our handler
    handler = ListHandler()
    module.logger.addHandler(handler)
    old_level = module.logger.level
    module.logger.setLevel(logging.INFO)
    yield module, handler.lines
    module.logger.removeHandler(handler)
    module.logger.setLevel(old_level)
    importlib.reload(vllm_lk.plugin)


def test_entry_point_is_registered_with_vllm():
    eps = [ep for ep in md.entry_points(group="vllm.general_plugins") if ep.name == "vllm_lk"]
    assert len(eps) == 1 and eps[0].load() is vllm_lk.plugin.register


def test_logger_is_under_vllms_logger_so_vllms_handler_formats_it():
    assert vllm_lk.plugin.logger.name.startswith("vllm.")


def test_register_is_idempotent_and_logs_one_line(fresh_plugin):
    plugin, lines = fresh_plugin
    assert not plugin.is_active()
    plugin.register()
    plugin.register()
    assert len(lines) == 1 and lines[0].startswith("vllm_lk 0.1.0 active")
    assert plugin.is_active()


@pytest.mark.parametrize("value", ["1", "true", "yes"])
def test_disable_switch(fresh_plugin, monkeypatch, value):
    plugin, lines = fresh_plugin
    monkeypatch.setenv("VLLM_LK_DISABLE", value)
    plugin.register()
    assert not plugin.is_active()
    assert len(lines) == 1 and lines[0].startswith("vllm_lk 0.1.0 disabled")


def test_vllms_plugin_loader_activates_it_unless_disabled(clean_env):
    code = "import vllm.plugins as p, vllm_lk.plugin as lk; p.load_general_plugins(); print('ACTIVE', lk.is_active())"
    for disable, expected in (("0", "ACTIVE True"), ("1", "ACTIVE False")):
        env = dict(clean_env, VLLM_LK_DISABLE=disable)
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert expected in proc.stdout


def test_spec_metrics_deltas_add_up_to_the_engines_record():
    """The engine core sends each running request's per-step lists from the first step not yet
    sent (O(new steps) per output); the front end's record must equal the engine's after any
    sequence of outputs, and vLLM's final full record replaces it."""
    from vllm.v1.metrics.stats import RequestSpecDecodeMetrics

    from vllm_lk.request_metrics import _delta, _merge_spec_metrics

    class Request:
        pass

    request, engine = Request(), RequestSpecDecodeMetrics.new(3)
    front = None
    sizes = []
    for step, (drafted, accepted) in enumerate([(3, 1), (3, 3), (2, 0), (0, 0), (3, 2), (1, 1)]):
        if drafted:
            engine.observe(drafted, accepted, detailed=True)
        if step != 1:  # a step whose output was not sent (e.g. no new token) is caught up later
            delta = _delta(request, engine)
            sizes.append(len(delta.per_step_drafted))
            front = _merge_spec_metrics(front, delta)
            assert front.per_step_drafted == engine.per_step_drafted
            assert front.per_step_accepted == engine.per_step_accepted
            assert front.histogram == engine.histogram and front.num_draft_tokens == engine.num_draft_tokens
    assert sizes == [1, 2, 0, 1, 1]  # only new steps travel
    assert _merge_spec_metrics(front, engine) is engine  # the final full record replaces
    summary = RequestSpecDecodeMetrics.new(3)  # "summary" level: no per-step lists
    summary.observe(3, 2)
    merged = _merge_spec_metrics(None, _delta(Request(), summary))
    summary.observe(3, 1)
    merged = _merge_spec_metrics(merged, _delta(Request(), summary))
    assert merged.histogram == [0, 1, 1, 0] and merged.num_draft_tokens == 6
