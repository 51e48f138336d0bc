"""The server's Prometheus metrics (prometheus-client), beside vLLM's own.

Ours live in a registry per app (so two apps in one process, as in tests, do not collide) and are
named ``vllm_lk_*``; vLLM's ``vllm:*`` metrics (among them the ``vllm:spec_decode_*`` counters)
live in prometheus-client's default registry, where vLLM's stat logger puts them. ``/metrics``
serves both, so one scrape sees the engine's counters and the per-request view side by side.
Every name and help text is listed in docs/server.md ("Metrics").
"""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from server.spec_stats import SpecStats
from server.window import SpecWindow

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)


def acceptance_buckets(k: int) -> tuple[float, ...]:
    """1.0 to K+1 in steps of 0.25: acceptance length can be no less than 1 and no more than K+1."""
    top = max(k, 1) + 1
    return tuple(1.0 + 0.25 * i for i in range(int((top - 1) / 0.25) + 1))


class WindowCollector:
    """Computes the rolling-window gauges at scrape time from the window's buckets."""

    def __init__(self, window: SpecWindow, seconds: float):
        self.window = window
        self.seconds = seconds

    def collect(self):
        stats, tokens, seconds = self.window.totals(self.seconds)
        length = GaugeMetricFamily(
            "vllm_lk_window_acceptance_length",
            "Acceptance length (1 + accepted / verification steps) over the rolling window; 0 when no step ran",
        )
        length.add_metric([], stats.acceptance_length or 0.0)
        rate = GaugeMetricFamily(
            "vllm_lk_window_acceptance_rate",
            "Accepted / drafted at each draft position over the rolling window",
            labels=["position"],
        )
        for position, value in enumerate(stats.acceptance_rates()):
            rate.add_metric([str(position)], value or 0.0)
        steps = GaugeMetricFamily("vllm_lk_window_verification_steps", "Verification steps in the rolling window")
        steps.add_metric([], stats.steps)
        throughput = GaugeMetricFamily(
            "vllm_lk_window_generation_tokens_per_second", "Generated tokens per second over the rolling window")
        throughput.add_metric([], tokens / seconds)
        span = GaugeMetricFamily("vllm_lk_window_seconds", "Length of the rolling window in seconds")
        span.add_metric([], seconds)
        return [length, rate, steps, throughput, span]


class EngineStatsCollector:
    """The engine's own drafting record and adaptive policy (vllm_lk.speculation's
    ``lk_speculation_stats``, fetched by /metrics just before it renders): what no per-request
    record shows, such as steps that skipped speculation, and the policy's live estimates."""

    def __init__(self) -> None:
        self.latest: dict | None = None

    def collect(self):
        stats = self.latest
        if not stats:
            return []
        steps = CounterMetricFamily("vllm_lk_spec_engine_steps", "Engine steps that ran the drafter")
        steps.add_metric([], stats["steps"])
        skipped = CounterMetricFamily(
            "vllm_lk_spec_steps_without_drafts", "Engine steps in which no request was given a draft (adaptive: k* = 0)")
        skipped.add_metric([], stats["steps_without_drafts"])
        counts = stats["request_steps_by_drafts"]
        cumulative, buckets = 0, []
        for drafts, count in enumerate(counts):
            cumulative += count
            buckets.append((str(float(drafts)), cumulative))
        buckets.append(("+Inf", cumulative))
        histogram = HistogramMetricFamily(
            "vllm_lk_spec_drafts_per_step", "Drafts made for a request in one engine step (one observation per request and step)")
        histogram.add_metric([], buckets, sum_value=float(sum(d * c for d, c in enumerate(counts))))
        families = [steps, skipped, histogram]
        if stats.get("estimated_speedup") is not None:
            speedup = GaugeMetricFamily(
                "vllm_lk_spec_estimated_speedup",
                "Adaptive speculation: measured tokens/s over the cost model's tokens/s without drafts (about the last 50 steps)")
            speedup.add_metric([], stats["estimated_speedup"])
            families.append(speedup)
        if stats.get("cost"):
            cost = GaugeMetricFamily(
                "vllm_lk_spec_cost_seconds", "Adaptive speculation's cost model: seconds per engine step, per request, "
                "per draft pass and per drafted token, by batch-size bucket and sampling mode (greedy: every request "
                "at temperature 0)", labels=["batch_bucket", "sampling", "term"])
            for key, constants in stats["cost"].items():
                bucket, _, sampling = key.partition(":")
                for term, value in constants.items():
                    cost.add_metric([bucket, sampling or "sampled", term], value)
            families.append(cost)
        return families


class CaptureCollector:
    """The traffic capture's counters (``--capture``), read at scrape time."""

    def __init__(self, capture) -> None:
        self.capture = capture

    def collect(self):
        written = CounterMetricFamily("vllm_lk_capture_records", "Served choices written to the capture directory")
        written.add_metric([], self.capture.written)
        dropped = CounterMetricFamily(
            "vllm_lk_capture_dropped_records", "Captured choices dropped (writer queue full or a write failed)")
        dropped.add_metric([], self.capture.dropped)
        deleted = CounterMetricFamily("vllm_lk_capture_deleted_files", "Capture files deleted to stay under the size cap")
        deleted.add_metric([], self.capture.deleted_files)
        return [written, dropped, deleted]


API_ENDPOINTS = ("/v1/completions", "/v1/chat/completions")
ALERTED_STATUSES = ("200", "429", "500", "503", "504")


class ServerMetrics:
    """All ``vllm_lk_*`` metrics of one app."""

    def __init__(self, num_positions: int, window: SpecWindow, window_s: float):
        self.registry = CollectorRegistry(auto_describe=True)
        self.num_positions = num_positions
        r = self.registry
        self.info = Info("vllm_lk", "What is served: target, drafter, method, K and the drafter's training loss", registry=r)
        self.requests = Counter(
            "vllm_lk_requests", "HTTP requests by endpoint and status code", ["endpoint", "status"], registry=r)
        self.running = Gauge("vllm_lk_requests_running", "Admitted requests that have produced their first token", registry=r)
        self.waiting = Gauge("vllm_lk_requests_waiting", "Admitted requests still waiting for their first token", registry=r)
        self.acceptance_length = Histogram(
            "vllm_lk_request_acceptance_length",
            "Per finished request: 1 + accepted drafts / verification steps (requests with at least one step)",
            buckets=acceptance_buckets(num_positions), registry=r)
        self.steps = Counter("vllm_lk_spec_verification_steps", "Verification steps of served requests", registry=r)
        self.drafted = Counter(
            "vllm_lk_spec_drafted_tokens", "Draft tokens proposed, by draft position (0-based)", ["position"], registry=r)
        self.accepted = Counter(
            "vllm_lk_spec_accepted_tokens", "Draft tokens accepted, by draft position (0-based)", ["position"], registry=r)
        self.ttft = Histogram(
            "vllm_lk_time_to_first_token_seconds", "Time from request arrival to its first generated token",
            buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram(
            "vllm_lk_time_per_output_token_seconds",
            "Per finished request: (last token time - first token time) / (tokens - 1), longest choice",
            buckets=TPOT_BUCKETS, registry=r)
        self.prompt_tokens = Counter("vllm_lk_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("vllm_lk_generation_tokens", "Tokens generated for clients", registry=r)
        # children looked up once (present from the start, so rate() works from zero): a labels()
        # lookup per engine output is a measurable share of the front end's time under load
        self._drafted = [self.drafted.labels(str(p)) for p in range(num_positions)]
        self._accepted = [self.accepted.labels(str(p)) for p in range(num_positions)]
        # the statuses the error alerts count, at 0 from the start: rate() cannot see a series'
        # first appearance, so an instance's first 429 or 5xx would otherwise not show in a rate
        for endpoint in API_ENDPOINTS:
            for status in ALERTED_STATUSES:
                self.requests.labels(endpoint, status)
        self.drafter_swaps = Counter(
            "vllm_lk_drafter_swaps", "Drafters swapped into the running server (POST /admin/drafter)", registry=r)
        self.registry.register(WindowCollector(window, window_s))
        self.engine_stats = EngineStatsCollector()
        self.registry.register(self.engine_stats)

    def ensure_positions(self, num_positions: int) -> None:
        """Count draft positions up to ``num_positions`` (a swapped-in drafter with a larger K)."""
        for position in range(self.num_positions, num_positions):
            self._drafted.append(self.drafted.labels(str(position)))
            self._accepted.append(self.accepted.labels(str(position)))
        self.num_positions = max(self.num_positions, num_positions)

    def set_info(self, **labels: str) -> None:
        self.info.info({key: str(value) for key, value in labels.items()})

    def add_output(self, new_tokens: int, delta: SpecStats | None) -> None:
        """Advance the token and speculative counters by one engine output (live, while requests run)."""
        if new_tokens:
            self.generation_tokens.inc(new_tokens)
        if delta is None:
            return
        self.steps.inc(delta.steps)
        for position in range(min(self.num_positions, delta.num_positions)):
            if delta.drafted[position]:
                self._drafted[position].inc(delta.drafted[position])
            if delta.accepted[position]:
                self._accepted[position].inc(delta.accepted[position])

    def render(self, engine_stats: dict | None = None) -> bytes:
        """Prometheus text of vLLM's metrics (default registry) followed by ours (with the
        engine's drafting record when given)."""
        self.engine_stats.latest = engine_stats
        return generate_latest(REGISTRY) + generate_latest(self.registry)
