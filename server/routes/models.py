"""GET /v1/models and GET /v1/models/{model}: the target, with what speculates for it."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from server.auth import require_key
from server.errors import APIError
from server.routes.common import server_state
from server.schemas import ERROR_RESPONSES, ModelCard, ModelList
from server.state import ServerState

router = APIRouter(dependencies=[Depends(require_key)])


def model_card(state: ServerState) -> ModelCard:
    spec = state.spec
    speculative = None
    if spec.drafter is not None:
        speculative = {
            "drafter": spec.drafter, "method": spec.method, "num_speculative_tokens": spec.num_speculative_tokens,
            "lk_metadata": spec.lk_metadata, "identity": state.drafter_identity, "swaps": state.swaps,
        }
    return ModelCard(id=state.model_name, created=state.created, root=str(state.config.target),
                     max_model_len=state.max_model_len, speculative=speculative, drafter_build=state.drafter_build)


@router.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES, summary="List the served model")
async def list_models(request: Request) -> ModelList:
    return ModelList(data=[model_card(server_state(request))])


# `:path`: an id given as a Hugging Face id (ORG/NAME, the default for a target given by id) holds a slash
@router.get("/v1/models/{model:path}", response_model=ModelCard, responses=ERROR_RESPONSES, summary="Describe a model")
async def get_model(model: str, request: Request) -> ModelCard:
    state = server_state(request)
    if model != state.model_name:
        raise APIError(404, f"the model {model!r} does not exist; this server serves {state.model_name!r}",
                       param="model", code="model_not_found")
    return model_card(state)
