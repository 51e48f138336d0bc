"""The LK metadata file that `vllm-lk train`/`export` writes beside an exported drafter.

``lk_metadata.json`` records how a head was trained (loss, eta, gamma, temperatures, data hash,
target) and what it is expected to do (offline alpha per head, predicted acceptance length tau),
so a server can report it and a user can check served acceptance against the prediction.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

METADATA_FILE = "lk_metadata.json"
FORMAT = "vllm-lk-drafter/1"


def read_lk_metadata(drafter_dir: str | Path) -> dict | None:
    """The metadata of an exported drafter, or None for a directory without it (any HF draft)."""
    path = Path(drafter_dir) / METADATA_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if data.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown format {data.get('format')!r} (expected {FORMAT})")
    return data


def predicted_acceptance(alphas: list[float], k: int) -> list[float] | None:
    """Per draft position 1..k, the predicted acceptance prod_{j<=i} alpha_j from the offline alpha
    of each head (one alpha: an independent draft model, drafted k times); tau = 1 + their sum.
    None when there are fewer heads than k. The one home of this formula: training's prediction
    and the server's dashboard use it."""
    if len(alphas) == 1:
        alphas = list(alphas) * k
    if len(alphas) < k:
        return None
    return [math.prod(alphas[: i + 1]) for i in range(k)]
