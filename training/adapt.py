"""`vllm-lk adapt`: served traffic -> an LK fine-tune of the served drafter -> swap if it is better.

One round:
1. **data** — every record the server captured (`vllm-lk serve --capture DIR`), deduplicated by
   id, split by a hash of its prompt into training and held-out records (a record stays on its
   side from round to round, and so does every answer to a repeated prompt), snapshot into the
   round's directory. Too few records: the round is
   refused with the reason, nothing else happens.
2. **fine-tune** — `vllm-lk train --init-from CURRENT` with the LK loss, a few hundred steps
   (the trainer's checkpoints make it resumable).
3. **evaluate** — offline α per head of the current and the new drafter on the held-out records,
   at the served temperature, and the τ each predicts at the served K.
4. **swap** — only if the new τ beats the current one by ``margin`` (relative): through the
   server's ``POST /admin/drafter`` when an endpoint is given. The new drafter is the next round's
   current one.

Each round writes ``round-N/record.json``; ``rounds.jsonl`` in the work directory lists them, and
``state.json`` says which drafter is current. A round killed at any point resumes where it was
when adapt is started again with the same work directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path

from pydantic import Field

from training.checkpoint import write_text_atomic
from training.config import FrozenConfig
from vllm_lk.errors import InvalidInput

logger = logging.getLogger(__name__)


class AdaptConfig(FrozenConfig):
    """`vllm-lk adapt`: where the traffic is, what to fine-tune, when to swap."""

    capture: Path = Field(..., description="the server's capture directory (`vllm-lk serve --capture DIR`)")
    target: Path | None = Field(None, description="the served target's directory (default: the toy target)")
    drafter: Path | None = Field(
        None, description="the served drafter's directory (default: what the endpoint's GET /admin/drafter reports)")
    steps: int = Field(300, ge=1, description="fine-tuning steps per round")
    loss: str = Field("lk-hybrid", description="fine-tuning loss")
    lr: float = Field(1e-3, gt=0, description="peak learning rate of the fine-tune")
    batch_size: int = Field(8, ge=1, description="sequences per step")
    seq_len: int = Field(256, ge=8, description="tokens per training sequence")
    heldout_share: float = Field(0.15, gt=0, lt=1, description="share of prompts (by a hash of the prompt) held out for the swap decision")
    min_records: int = Field(64, ge=2, description="fewest captured records a round trains on (else it is refused)")
    temperature: float = Field(1.0, ge=0, description="temperature of the offline alpha (the traffic's)")
    num_speculative_tokens: int | None = Field(None, ge=1, description="served K (default: the drafter's LK metadata)")
    margin: float = Field(0.02, ge=0, description="swap only when predicted tau improves by at least this share")
    rounds: int = Field(1, ge=1, description="rounds to run")
    every_s: float = Field(0.0, ge=0, description="seconds between the starts of rounds (0: back to back)")
    seed: int = Field(0, description="seed of the split and the fine-tune")


def _heldout(key: str, share: float) -> bool:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little") / 2**32 < share


def _split_key(record: dict) -> str:
    """The prompt a record answers: requests repeating a prompt fall on one side of the split (split
    by request id, a repeated prompt's answers on both sides made the held-out alpha optimistic)."""
    ids = record.get("prompt_token_ids")
    return json.dumps(ids) if ids else str(record.get("prompt", record.get("id")))


def snapshot(config: AdaptConfig, round_dir: Path) -> dict:
    """Split the captured records into round_dir/train.jsonl and heldout.jsonl (once per round)."""
    counts_file = round_dir / "data.json"
    if counts_file.is_file():
        return json.loads(counts_file.read_text())
    seen: dict[str, tuple[str, bool]] = {}  # id -> (line, held out)
    for path in sorted(Path(config.capture).glob("capture-*.jsonl")):  # server.capture's files, oldest first
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
            try:
                record = json.loads(line)
                rid = record["id"]
            except (json.JSONDecodeError, KeyError, TypeError):
                logger.warning("%s:%d: not a capture record; skipped", path, number)  # a line being written
                continue
            seen[str(rid)] = (line, _heldout(_split_key(record), config.heldout_share))
    train = [line for line, held in seen.values() if not held]
    heldout = [line for line, held in seen.values() if held]
    round_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(round_dir / "train.jsonl", "".join(line + "\n" for line in train))
    write_text_atomic(round_dir / "heldout.jsonl", "".join(line + "\n" for line in heldout))
    counts = {"records": len(seen), "train": len(train), "heldout": len(heldout)}
    write_text_atomic(counts_file, json.dumps(counts) + "\n")
    return counts


def offline_tau(target: Path, drafter: Path, heldout: Path, temperature: float, k: int) -> dict:
    """Offline alpha per head on the held-out records, with its standard error, and the tau it predicts at K."""
    from training.data import read_examples
    from training.evaluate import EvalConfig, offline_alphas, predict
    from training.target import load_target

    _, tokenizer = load_target(target)
    examples = read_examples(heldout, tokenizer.vocab_size)
    sequences = [(list(e.token_ids), e.response_start, None) for e in examples]
    config = EvalConfig(target=target, drafter=drafter, temperature=temperature)
    alphas, rows, _ = offline_alphas(config, target, sequences)
    prediction = predict(alphas, k)
    # alpha of one row is in [0, 1]: its variance is at most alpha (1 - alpha); rows of one sequence are
    # correlated, so the standard error is taken over sequences (an upper estimate over rows as if independent)
    se = [math.sqrt(a * (1 - a) / max(1, len(sequences))) for a in alphas]
    return {"alpha": alphas, "alpha_se": se, "rows": rows, "tau": prediction["tau"], "sequences": len(sequences)}


def _k(config: AdaptConfig, drafter: Path) -> int:
    from vllm_lk.checkpoint import read_lk_metadata

    if config.num_speculative_tokens:
        return config.num_speculative_tokens
    metadata = read_lk_metadata(drafter) or {}
    return int(metadata.get("num_speculative_tokens") or metadata.get("num_heads") or 3)


def run_round(config: AdaptConfig, work: Path, number: int, current: Path, endpoint: Endpoint | None) -> dict:
    from training.generate import resolve_target
    from training.train_config import TrainConfig
    from training.trainer import train

    round_dir = work / f"round-{number}"
    record_file = round_dir / "record.json"
    if record_file.is_file():
        return json.loads(record_file.read_text())
    started = time.monotonic()
    target = resolve_target(config.target)
    data = snapshot(config, round_dir)
    record: dict = {"round": number, "current": str(current), "data": data}
    if data["train"] < config.min_records or data["heldout"] < 2:
        record.update(swapped=False, refused=f"too little captured traffic: {data['train']} training and "
                      f"{data['heldout']} held-out records (need {config.min_records} and 2)")
        return _finish(record_file, record, started)
    k = _k(config, current)
    run_dir = round_dir / "run"
    train_config = TrainConfig(init_from=str(current), loss=config.loss, steps=config.steps, lr=config.lr,
                               batch_size=config.batch_size, seq_len=config.seq_len, seed=config.seed + number,
                               warmup_steps=min(20, config.steps // 10), eval_sequences=min(16, data["train"] // 4))
    train(train_config, target, round_dir / "train.jsonl", run_dir, resume=(run_dir / "checkpoints").is_dir())
    new = run_dir / "drafter"
    before = offline_tau(target, current, round_dir / "heldout.jsonl", config.temperature, k)
    after = offline_tau(target, new, round_dir / "heldout.jsonl", config.temperature, k)
    better = after["tau"] >= before["tau"] * (1 + config.margin)
    record.update(k=k, before=before, after=after, new=str(new), improvement=after["tau"] / before["tau"] - 1, better=better)
    record["swapped"] = False
    if not better:
        record["reason"] = f"predicted tau {after['tau']:.3f} vs {before['tau']:.3f}: below the {config.margin:.0%} margin"
    elif endpoint is None:
        record["reason"] = "no endpoint: the new drafter is ready to serve, not swapped"
    else:
        record["swap"] = endpoint.swap(new)
        record["swapped"] = True
    return _finish(record_file, record, started)


def _finish(record_file: Path, record: dict, started: float) -> dict:
    record["seconds"] = round(time.monotonic() - started, 1)
    record_file.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(record_file, json.dumps(record, indent=2) + "\n")
    return record


class Endpoint:
    """The serving server's admin routes."""

    def __init__(self, url: str, admin_key: str):
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {admin_key}"}

    def served_drafter(self) -> Path:
        import httpx

        response = httpx.get(self.url + "/admin/drafter", headers=self.headers, timeout=30)
        if response.status_code != 200:
            raise InvalidInput(f"{self.url}/admin/drafter answered {response.status_code}: {response.text[:300]}")
        drafter = response.json()["served"]["drafter"]
        if not drafter:
            raise InvalidInput(f"{self.url} serves no drafter: nothing to adapt")
        return Path(drafter)

    def swap(self, path: Path) -> dict:
        import httpx

        response = httpx.post(self.url + "/admin/drafter", json={"path": str(path)}, headers=self.headers, timeout=900)
        if response.status_code != 200:
            raise InvalidInput(f"the server refused the new drafter {path}: {response.status_code} {response.text[:300]}")
        return response.json()["swap"]


def adapt(config: AdaptConfig, work: str | Path, endpoint: Endpoint | None = None) -> list[dict]:
    """Run ``config.rounds`` rounds (resuming any that a crash cut short); returns their records."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    state_file = work / "state.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {"round": 0, "current": None}
    if state["current"] is None:
        drafter = config.drafter or (endpoint.served_drafter() if endpoint is not None else None)
        if drafter is None:
            raise InvalidInput("adapt needs --drafter DIR or --endpoint URL with an admin key (to ask what is served)")
        state["current"] = str(Path(drafter).resolve())
    records = []
    while state["round"] < config.rounds:
        started = time.monotonic()
        number = state["round"] + 1
        logger.info("adapt round %d: fine-tuning %s on %s", number, state["current"], config.capture)
        record = run_round(config, work, number, Path(state["current"]), endpoint)
        records.append(record)
        with (work / "rounds.jsonl").open("a") as handle:
            handle.write(json.dumps({k: record.get(k) for k in ("round", "swapped", "improvement", "refused", "reason", "seconds")}) + "\n")
        if record.get("better"):  # swapped, or (without an endpoint) ready to serve: the next round starts from it
            state["current"] = record["new"]
        state["round"] = number
        write_text_atomic(state_file, json.dumps(state) + "\n")
        logger.info("adapt round %d: %s", number, summary_line(record))
        if state["round"] < config.rounds and config.every_s:
            time.sleep(max(0.0, config.every_s - (time.monotonic() - started)))
    return records


def summary_line(record: dict) -> str:
    if record.get("refused"):
        return f"refused: {record['refused']}"
    return (f"predicted tau {record['before']['tau']:.3f} -> {record['after']['tau']:.3f} "
            f"({record['improvement']:+.1%}), {'swapped' if record['swapped'] else 'kept: ' + record['reason']}, "
            f"{record['seconds']:.0f} s")
