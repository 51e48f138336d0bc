"""`vllm-lk bench adapt`: does the closed loop (capture -> LK fine-tune -> live swap) pay on served traffic?

The start drafter is the default drafter's recipe trained on its code prompts only (cached; or
``--drafter DIR``). A real server (`vllm-lk serve --capture DIR --admin-key KEY`, its own
process, uvicorn on 127.0.0.1) serves it; the traffic is of another kind: docstring -> function
chat requests (``/v1/chat/completions``), which the drafter never saw. The run alternates:

    period 0 (served, captured) -> adapt round 1 -> period 1 -> adapt round 2 -> period 2

A period is ``requests_per_period`` chat requests at ``concurrency``, each prompt used once in
the whole run (periods never repeat a prompt, so a round cannot have trained on the prompts it is
then measured on). Served tau of a period comes from the server's own counters (the deltas of
``vllm_lk_spec_verification_steps_total`` and ``vllm_lk_spec_accepted_tokens_total`` on
/metrics): tau = 1 + accepted / steps; its standard error is the ratio estimator's over the
period's requests (each response's ``usage.speculative``). An adapt round is `vllm-lk adapt` (one
round: snapshot of everything captured so far, LK fine-tune from the served drafter, offline alpha
on held-out captured records, swap through ``POST /admin/drafter`` past the margin); while it runs,
``background_clients`` keep sending requests (captured too), so a swap happens under load. Every
request that does not answer 200 counts as failed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from pydantic import Field

from training.config import FrozenConfig
from vllm_lk.errors import InvalidInput

logger = logging.getLogger(__name__)
MODEL = "bench-adapt"


class AdaptBenchConfig(FrozenConfig):
    target: Path | None = Field(None, description="HF target directory (default: the toy target, built if missing)")
    drafter: Path | None = Field(None, description="start drafter (default: the default drafter's recipe on its code prompts only, built and cached)")
    start_steps: int = Field(600, ge=1, description="training steps of the code-only start drafter (when built)")
    num_speculative_tokens: int = Field(4, ge=1, description="served K (fixed speculation, so tau measures the drafter, not the policy)")
    rounds: int = Field(2, ge=1, description="adaptation rounds")
    requests_per_period: int = Field(160, ge=8, description="chat requests per measured period (one before the first round, one after each)")
    concurrency: int = Field(8, ge=1, description="requests in flight during a period")
    background_clients: int = Field(1, ge=0, description="clients sending requests while a round fine-tunes and swaps")
    background_prompts: int = Field(1200, ge=0, description="distinct prompts the background clients may send per round (they stop when these run out)")
    max_tokens: int = Field(128, ge=8, description="max_tokens of each request")
    temperature: float = Field(1.0, ge=0, description="sampling temperature of the traffic (and of adapt's offline alpha)")
    fine_tune_steps: int = Field(300, ge=1, description="LK fine-tuning steps per round")
    loss: str = Field("lk-hybrid", description="fine-tuning loss")
    lr: float = Field(1e-3, gt=0, description="fine-tuning peak learning rate")
    batch_size: int = Field(8, ge=1, description="fine-tuning sequences per step")
    margin: float = Field(0.02, ge=0, description="adapt swaps only when predicted tau improves by this share")
    seed: int = Field(0, description="prompt draw, request seeds and fine-tune seed")

    @classmethod
    def quick(cls, **overrides) -> AdaptBenchConfig:
        """<= 15 min on 2 cores once the start drafter is cached."""
        return cls(**{"requests_per_period": 96, "fine_tune_steps": 150, **overrides})


# ----------------------------------------------------------------------------------------------
# measuring what the server reports


def counters(metrics_text: str) -> dict[str, float]:
    """Verification steps, accepted draft tokens (all positions) and captured records from a /metrics page."""
    from prometheus_client.parser import text_string_to_metric_families

    names = {"vllm_lk_spec_verification_steps_total": "steps", "vllm_lk_spec_accepted_tokens_total": "accepted",
             "vllm_lk_capture_records_total": "captured"}
    totals = dict.fromkeys(names.values(), 0.0)
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name in names:
                totals[names[sample.name]] += sample.value
    return totals


def ratio_tau(per_request: list[tuple[int, int]]) -> tuple[float, float]:
    """tau = 1 + sum(accepted) / sum(steps) over requests (steps_i, accepted_i), and its standard
    error as a ratio estimator over requests: sqrt(sum (a_i - r s_i)^2 / (n (n - 1))) / mean(s).
    (Not reproduce_report.tau_standard_error, which treats steps as independent: here the steps of
    one request share its prompt, and periods differ in their prompts.)"""
    rows = [(s, a) for s, a in per_request if s > 0]
    if not rows:
        return float("nan"), float("nan")
    n, total_s, total_a = len(rows), sum(s for s, _ in rows), sum(a for _, a in rows)
    r = total_a / total_s
    if n < 2:
        return 1 + r, float("nan")
    se = math.sqrt(sum((a - r * s) ** 2 for s, a in rows) / (n * (n - 1))) / (total_s / n)
    return 1 + r, se


# ----------------------------------------------------------------------------------------------
# the server and its traffic


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`vllm-lk serve` in its own process group (the engine core is its child)."""

    def __init__(self, target: Path, drafter: Path, capture: Path, admin_key: str, config: AdaptBenchConfig, log: Path,
                 cores: list[int] | None = None):
        self.base = f"http://127.0.0.1:{free_port()}"
        command = [sys.executable, "-m", "server.cli", "serve", "--target", str(target), "--drafter", str(drafter),
                   "--num-speculative-tokens", str(config.num_speculative_tokens), "--speculation", "fixed",
                   "--port", self.base.rsplit(":", 1)[1], "--served-model-name", MODEL, "--capture", str(capture)]
        self.log = log
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "VLLM_LK_ADMIN_KEY": admin_key}
        pin = None
        if cores:  # the engine's OpenMP threads bind to these cores, and every process of the server stays on them
            env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, cores))
            pin = lambda: os.sched_setaffinity(0, cores)  # noqa: E731
        self.proc = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True, preexec_fn=pin)

    def wait_ready(self, timeout: float = 900) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}); log tail:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.base + "/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise TimeoutError(f"{self.base}/ready not ready after {timeout:.0f} s; log {self.log}")

    def counters(self) -> dict[str, float]:
        import httpx

        return counters(httpx.get(self.base + "/metrics", timeout=30).text)

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


async def drive(base: str, requests: list[dict], concurrency: int, stop: threading.Event | None = None) -> dict:
    """Send every request, ``concurrency`` at a time (with ``stop``: until it is set); per-request
    (steps, accepted) from ``usage.speculative`` and the failures."""
    import httpx

    result = {"per_request": [], "failed": 0, "errors": []}
    queue: asyncio.Queue = asyncio.Queue()
    for body in requests:
        queue.put_nowait(body)

    async def worker(http) -> None:
        while not queue.empty() and not (stop is not None and stop.is_set()):
            body = queue.get_nowait()
            try:
                response = await http.post("/v1/chat/completions", json=body)
                if response.status_code != 200:
                    raise RuntimeError(f"{response.status_code} {response.text[:200]}")
                spec = response.json()["usage"]["speculative"] or {}
                result["per_request"].append((spec.get("verification_steps", 0), spec.get("accepted_tokens", 0)))
            except Exception as exc:  # noqa: BLE001 - every failure is counted and reported
                result["failed"] += 1
                result["errors"].append(str(exc)[:300])

    async with httpx.AsyncClient(base_url=base, timeout=600) as http:
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
    return result


def chat_requests(config: AdaptBenchConfig, target: Path) -> list[dict]:
    """Docstring -> function chat requests, no prompt twice in the run (a repeated prompt could be
    trained on and then measured): the periods' first, then the background's."""
    from training.prompts import builtin_prompts, toy_corpus_settings

    count = config.requests_per_period * (config.rounds + 1)
    if config.background_clients:
        count += config.background_prompts * config.rounds
    seen: set[str] = set()

    def new_prompt(record) -> bool:  # some docstrings recur in the corpus
        content = record.messages[0]["content"]
        return content not in seen and not seen.add(content)

    records = builtin_prompts("docstring", "train", count, config.seed, keep=new_prompt, **toy_corpus_settings(target))
    return [{"model": MODEL, "messages": list(r.messages), "max_tokens": config.max_tokens,
             "temperature": config.temperature, "seed": config.seed * 100_000 + i} for i, r in enumerate(records)]


def wait_captured(server: Server, expected: int, timeout: float = 120) -> None:
    """Records reach the disk through the server's writer thread: wait until it has written ``expected``."""
    deadline = time.monotonic() + timeout
    while server.counters()["captured"] < expected and time.monotonic() < deadline:
        time.sleep(0.2)


# ----------------------------------------------------------------------------------------------
# the run


def start_drafter(config: AdaptBenchConfig, target: Path) -> Path:
    """The drafter the loop starts from: given, or the default recipe without its docstring prompts."""
    from training.toy.default_drafter import DefaultDrafterConfig, ensure_default_drafter

    if config.drafter is not None:
        return Path(config.drafter).resolve()
    return ensure_default_drafter(target, DefaultDrafterConfig(docstring_prompts=0, steps=config.start_steps, seed=config.seed))


def split_cores() -> tuple[list[int], list[int]] | None:
    """Without a GPU: the first half of this process's cores for the server, the rest for the
    fine-tune. Unsplit, the engine's OpenMP threads (bound to every core, spinning between steps
    under load) and the trainer's slow each other down: a fine-tune step took 43-85 s beside a
    loaded server against 0.6 s alone (2 cores, measured)."""
    import torch

    cores = sorted(os.sched_getaffinity(0))
    if torch.cuda.is_available() or len(cores) < 2:
        return None
    half = len(cores) // 2
    return cores[:half], cores[half:]


def measure_period(server: Server, requests: list[dict], concurrency: int) -> dict:
    before = server.counters()
    started = time.monotonic()
    result = asyncio.run(drive(server.base, requests, concurrency))
    seconds = time.monotonic() - started
    after = server.counters()
    steps, accepted = after["steps"] - before["steps"], after["accepted"] - before["accepted"]
    tau, se = ratio_tau(result["per_request"])
    return {"served_tau": 1 + accepted / steps if steps else float("nan"), "served_tau_se": se,
            "tau_from_usage": tau, "requests": len(result["per_request"]), "failed": result["failed"],
            "errors": result["errors"][:5], "period_seconds": round(seconds, 1)}


class Background:
    """``clients`` sending ``requests`` (each once) until stopped or done."""

    def __init__(self, base: str, requests: list[dict], clients: int):
        self.stop = threading.Event()
        self.result: dict = {"per_request": [], "failed": 0, "errors": []}
        self._thread = threading.Thread(target=self._run, args=(base, requests, clients), daemon=True)
        if clients and requests:
            self._thread.start()

    def _run(self, base: str, requests: list[dict], clients: int) -> None:
        self.result = asyncio.run(drive(base, requests, clients, stop=self.stop))

    def finish(self) -> dict:
        self.stop.set()
        if self._thread.is_alive():
            self._thread.join()
        return self.result


def bench_adapt(config: AdaptBenchConfig, out: str | Path, json_path: str | Path | None = None) -> dict:
    import torch
    from tqdm.auto import tqdm

    from training.adapt import AdaptConfig, Endpoint, adapt
    from training.generate import resolve_target

    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    target = resolve_target(config.target)
    drafter = start_drafter(config, target)
    requests = chat_requests(config, target)
    per = config.requests_per_period
    periods = [requests[i * per:(i + 1) * per] for i in range(config.rounds + 1)]
    background_pool = requests[(config.rounds + 1) * per:]
    capture = out / "capture"
    if capture.exists() and any(capture.iterdir()):
        raise InvalidInput(f"{capture} holds an earlier run's traffic: use a new --out")
    admin_key = os.urandom(16).hex()  # the server's admin routes, for this run only
    split = split_cores()
    server = Server(target, drafter, capture, admin_key, config, out / "server.log", cores=split[0] if split else None)
    own_cores, own_threads = os.sched_getaffinity(0), torch.get_num_threads()
    if split:
        os.sched_setaffinity(0, split[1])
        torch.set_num_threads(len(split[1]))
    rounds: list[dict] = []
    answered = failed = 0
    adapt_config = AdaptConfig(capture=capture, target=target, steps=config.fine_tune_steps, loss=config.loss, lr=config.lr,
                               batch_size=config.batch_size, temperature=config.temperature, seed=config.seed,
                               num_speculative_tokens=config.num_speculative_tokens, margin=config.margin,
                               min_records=min(64, per // 2))
    try:
        server.wait_ready()
        bar = tqdm(total=2 * config.rounds + 1, desc="bench adapt", unit="stage")
        period = measure_period(server, periods[0], config.concurrency)
        answered, failed = answered + period["requests"], failed + period["failed"]
        rounds.append({"round": 0, "swapped": False, "seconds": 0.0, **period})
        bar.update()
        for number in range(1, config.rounds + 1):
            wait_captured(server, answered)  # what this round's snapshot should hold
            pool = background_pool[(number - 1) * config.background_prompts:number * config.background_prompts]
            background = Background(server.base, pool, config.background_clients)
            started = time.monotonic()
            try:
                record = adapt(adapt_config.model_copy(update={"rounds": number}), out / "adapt", Endpoint(server.base, admin_key))[-1]
            finally:
                side = background.finish()
            seconds = time.monotonic() - started
            answered, failed = answered + len(side["per_request"]), failed + side["failed"]
            bar.update()
            period = measure_period(server, periods[number], config.concurrency)
            answered, failed = answered + period["requests"], failed + period["failed"]
            rounds.append({"round": number, "swapped": bool(record.get("swapped")), "seconds": round(seconds, 1), **period,
                           "predicted_tau_before": (record.get("before") or {}).get("tau"),
                           "predicted_tau_after": (record.get("after") or {}).get("tau"),
                           "records": (record.get("data") or {}).get("records"),
                           "background_requests": len(side["per_request"]), "background_failed": side["failed"],
                           "reason": record.get("refused") or record.get("reason"), "swap": record.get("swap")})
            bar.update()
        bar.close()
    finally:
        server.close()
        os.sched_setaffinity(0, own_cores)
        torch.set_num_threads(own_threads)
    report = {"rounds": rounds, "failed_requests": failed, "requests": answered + failed, "start_drafter": str(drafter),
              "cores": {"server": split[0], "fine_tune": split[1]} if split else None,
              "target": str(target), "config": json.loads(config.model_dump_json())}
    first, last = rounds[0]["served_tau"], rounds[-1]["served_tau"]
    report["summary"] = {"served_tau_start": first, "served_tau_end": last, "gain": last / first - 1,
                         "gain_round_1": rounds[1]["served_tau"] / first - 1 if len(rounds) > 1 else None}
    json_path = Path(json_path) if json_path else out / "adapt.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    json_path.with_suffix(".md").write_text(markdown(report))
    return report


def markdown(report: dict) -> str:
    lines = ["| round | served tau (± SE) | vs round 0 | swapped | predicted tau (before -> after) | round s | requests | failed |",
             "|---|---|---|---|---|---|---|---|"]
    base = report["rounds"][0]["served_tau"]
    for r in report["rounds"]:
        predicted = (f"{r['predicted_tau_before']:.3f} -> {r['predicted_tau_after']:.3f}"
                     if r.get("predicted_tau_after") is not None else "—")
        lines.append(f"| {r['round']} | {r['served_tau']:.3f} ± {r['served_tau_se']:.3f} | {r['served_tau'] / base - 1:+.1%} | "
                     f"{'yes' if r['swapped'] else 'no'} | {predicted} | {r['seconds']:.0f} | {r['requests']} | {r['failed']} |")
    lines.append("")
    lines.append(f"{report['requests']} requests sent, {report['failed_requests']} failed; start drafter {report['start_drafter']}")
    return "\n".join(lines) + "\n"

