"""GET /metrics (Prometheus text), GET /dashboard (a live page) and GET /dashboard/data (its JSON).

The dashboard is for people without Grafana at hand: one self-contained HTML file (inline JS and
SVG, nothing fetched from elsewhere) that polls /dashboard/data, which is the server's own rolling
window — the same numbers as the ``vllm_lk_window_*`` gauges, bucketed over the last minutes.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from server.auth import require_key_unless_open
from server.routes.common import server_state
from server.schemas import ERROR_RESPONSES

router = APIRouter(dependencies=[Depends(require_key_unless_open)])


@cache
def dashboard_page() -> str:
    return (Path(__file__).resolve().parent.parent / "dashboard.html").read_text()


@router.get("/metrics", response_class=Response, responses=ERROR_RESPONSES, summary="Prometheus metrics")
async def metrics(request: Request) -> Response:
    state = server_state(request)
    return Response(state.metrics.render(await state.engine_stats()), media_type=CONTENT_TYPE_LATEST)


@router.get("/dashboard", response_class=HTMLResponse, responses=ERROR_RESPONSES, summary="Live acceptance page")
async def dashboard() -> HTMLResponse:
    return HTMLResponse(dashboard_page())


def served_prediction(metadata: dict, k: int) -> dict:
    """The offline predicted tau at the K being served (the metadata's own is for the trained K,
    which can differ: the default drafter trains 5 heads and serves 4), and the temperature the
    offline alpha was measured at, so the page can say what the prediction is for."""
    from vllm_lk.checkpoint import predicted_acceptance

    alphas = metadata.get("offline_alpha") or []
    per_position = predicted_acceptance(alphas, k) if alphas and k else None
    tau = 1 + sum(per_position) if per_position is not None else None
    return {"predicted_tau": tau, "predicted_for": {"k": k, "temperature": metadata.get("offline_temperature")}}


@router.get("/dashboard/data", responses=ERROR_RESPONSES, summary="Rolling acceptance data behind /dashboard")
async def dashboard_data(request: Request) -> dict:
    state = server_state(request)
    stats, tokens, seconds = state.window.totals(state.config.window_s)
    metadata = state.spec.lk_metadata or {}
    k = state.spec.num_speculative_tokens
    return {
        "info": {
            "model": state.model_name, "drafter": state.spec.drafter, "method": state.spec.method,
            "num_speculative_tokens": k, "loss": state.spec.loss, "drafter_id": state.drafter_identity,
            "swaps": state.swaps, "swap": state.swap_status, "drafter_build": state.drafter_build,
            **served_prediction(metadata, k), "offline_alpha": metadata.get("offline_alpha"),
        },
        "window": {
            "seconds": seconds, "verification_steps": stats.steps, "acceptance_length": stats.acceptance_length,
            "acceptance_rate_per_position": stats.acceptance_rates(), "tokens_per_second": tokens / seconds,
        },
        "series": state.window.series(),
    }
