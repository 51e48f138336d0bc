"""`vllm-lk bench speed`: does speculation pay, for which drafter, at which K?

No speculation against each drafter x {fixed K, adaptive} x temperature x concurrency, on one set
of held-out code prompts (``ignore_eos``, so every request decodes ``max_tokens``), measured in
interleaved rounds: the no-speculation engine stays up for the whole run and each drafter's for
its block; each round of a block visits every (temperature, concurrency) group in a new shuffled
order, and within a group the drafter's settings and no speculation (twice) back to back in a new
shuffled order, so drift in a shared machine's load falls on all cells alike and the cells a ratio
compares run close in time. Concurrency c means c requests in flight (a request admitted as one
finishes). Speedup is against
the no-speculation cells of the same block, round, temperature and concurrency; the report gives
the median over rounds (and blocks, for no speculation) and the min-max spread.

One engine per drafter, started at the largest K; fixed K below it and adaptive speculation are
switched at runtime (vllm_lk.speculation.set_speculation), so the settings of one drafter share
an engine and its warm caches. The drafters are the embedded default's recipe
(training.toy.default_drafter) per architecture, built on first use and cached.

Alongside each speedup: tau (tokens per verification step) and the bound tau / (1 + K c) that a
per-drafted-token cost c implies, with c fitted per drafter from the fixed-K rows
(speedup = tau / (1 + K c) solved for c and averaged).
"""

from __future__ import annotations

import json
import logging
import random
import statistics
import time
from pathlib import Path

from pydantic import Field
from tqdm.auto import tqdm

from training.config import FrozenConfig
from training.drafters import VLLM_METHODS
from training.train_config import DrafterKind
from vllm_lk.errors import InvalidInput

logger = logging.getLogger(__name__)


class SpeedConfig(FrozenConfig):
    target: Path | None = Field(None, description="HF target directory, or a Hugging Face id ORG/NAME[@REVISION] in the "
                                "local HF cache (default: the toy target, built if missing)")
    drafters: list[DrafterKind] = Field(["mlp", "eagle3", "medusa", "draft-model"], description="drafter architectures to measure (each built with the default drafter's recipe)")
    drafter_dirs: dict[str, Path] = Field(default_factory=dict, description="drafter directories to use instead of building (kind -> exported drafter); a key KIND:LABEL adds another drafter of that kind, measured beside the others (e.g. two builds compared in one run)")
    num_heads: int = Field(5, ge=1, description="heads / stages / TTT steps the drafters are trained with (the largest K served)")
    ks: list[int] = Field([1, 2, 3, 4, 5], min_length=1, description="fixed K values to measure (each <= num_heads)")
    adaptive: bool = Field(True, description="also measure adaptive speculation (vllm_lk.adaptive)")
    adaptive_variants: dict[str, dict] = Field(default_factory=dict, description="more adaptive policies measured beside the default one: label -> policy settings for lk_set_speculation (e.g. '{\"trim\": {\"trim\": true}}'); rows carry the label as policy")
    temperatures: list[float] = Field([0.0, 1.0], min_length=1, description="sampling temperatures")
    concurrency: list[int] = Field([1, 8], min_length=1, description="requests in flight at once")
    prompts: int = Field(8, ge=1, description="held-out code prompts per cell")
    waves: int = Field(3, ge=1, description="at concurrency c a cell decodes max(prompts, waves * c) requests (the prompts in "
                       "turn), c in flight, a new one admitted as one finishes: the final drain is then a small part of the "
                       "cell (1: one closed batch of c when prompts = c, the measurement before 2026-12-07)")
    max_tokens: int = Field(128, ge=8, description="tokens decoded per request (ignore_eos)")
    rounds: int = Field(2, ge=1, description="interleaved rounds (the spread is over rounds)")
    warmup_requests: int = Field(4, ge=0, description="requests per engine before measuring (caches; the adaptive policy's start-up measurement)")
    seed: int = Field(0, description="prompt sample and per-request seeds")
    gpu_memory_utilization: float = Field(0.1, gt=0, le=1, description="per engine (two run at a time)")
    max_model_len: int = Field(1024, ge=64, description="engine max_model_len")
    profile_k: int | None = Field(4, ge=1, description="K of the per-drafter step breakdown (training.bench.speed_profile; None: skip it)")

    @classmethod
    def quick(cls, **overrides) -> SpeedConfig:
        """<= 15 min on 2 cores once the drafters are cached: the two fastest drafters, K 1/3/4/5."""
        return cls(**{"drafters": ["mlp", "eagle3"], "ks": [1, 3, 4, 5], "rounds": 2, "prompts": 4, **overrides})


def kind_of(label: str) -> str:
    """The architecture of a drafter label (``mlp`` or ``mlp:tied``)."""
    return label.partition(":")[0]


def drafter_dirs(config: SpeedConfig, target: Path) -> dict[str, Path]:
    """Label -> exported drafter: each of ``drafters`` (given or built with the default drafter's
    recipe), then every other ``drafter_dirs`` entry."""
    from training.toy.default_drafter import DefaultDrafterConfig, ensure_default_drafter

    labels = list(config.drafters) + [label for label in config.drafter_dirs if label not in config.drafters]
    for label in labels:
        if kind_of(label) not in VLLM_METHODS:
            raise InvalidInput(f"drafter {label!r}: unknown kind {kind_of(label)!r} (expected one of {', '.join(VLLM_METHODS)})")
    return {label: config.drafter_dirs.get(label)
            or ensure_default_drafter(target, DefaultDrafterConfig(drafter=kind_of(label), num_heads=config.num_heads))
            for label in labels}


def start_engine(config: SpeedConfig, target: Path, kind: str | None, drafter: Path | None):
    from training.generate import EngineFields, make_llm

    engine = EngineFields(gpu_memory_utilization=config.gpu_memory_utilization, max_model_len=config.max_model_len,
                          max_num_seqs=max(config.concurrency))
    extra = {}
    if kind is not None:
        extra = {"speculative_config": {"method": VLLM_METHODS[kind_of(kind)], "model": str(drafter), "num_speculative_tokens": max(config.ks)},
                 "per_request_spec_decode_metrics": "summary"}
    # async scheduling off everywhere: with it vLLM reserves the configured K draft slots per
    # request before drafting, so a runtime K (fixed below the engine's, or adaptive) cannot apply;
    # off for no speculation too, so every row runs the same scheduler
    return make_llm(target, engine, seed=config.seed, disable_log_stats=False, async_scheduling=False, **extra)


def policy_settings(config: SpeedConfig, label: str | None) -> dict:
    """The adaptive policy settings of a variant (None: the default), every setting spelt out: the
    engine's policy keeps its settings across switches, so each cell sets them all. Each variant
    runs its own policy (its label), learning only from its own cells."""
    from dataclasses import fields

    from vllm_lk.adaptive import SETTINGS, Policy

    defaults = {f.name: f.default for f in fields(Policy) if f.name in SETTINGS}
    return {**defaults, **(config.adaptive_variants[label] if label else {}), "label": label or "default"}


def set_mode(llm, mode: str, k: int | None, settings: dict | None = None) -> None:
    llm.collective_rpc("lk_set_speculation", args=(mode, k, settings) if settings else (mode, k))


def run_cell(llm, prompts: list[list[int]], temperature: float, concurrency: int, config: SpeedConfig,
             requests: int | None = None) -> dict:
    """Decode ``requests`` requests (default: max(prompts, waves * concurrency); the prompts in
    turn) with ``concurrency`` in flight: a request is admitted as soon as one finishes, as
    continuous batching under that load runs them. Tokens, seconds and speculative counts.

    Until 2026-12-07 a cell ran the prompts in closed batches of ``concurrency`` (each batch ran
    until its slowest request finished), so at concurrency 8 with 8 prompts the cell was one
    batch of 8 draining to its slowest request, a state a loaded server is rarely in."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    engine = llm.llm_engine
    total = requests if requests is not None else max(len(prompts), config.waves * concurrency)
    tag = f"speed-{time.monotonic_ns()}"
    admitted = in_flight = tokens = steps = drafted = accepted = 0

    def admit() -> None:
        nonlocal admitted, in_flight
        params = SamplingParams(temperature=temperature, max_tokens=config.max_tokens, ignore_eos=True,
                                seed=config.seed * 1000 + admitted, output_kind=RequestOutputKind.FINAL_ONLY)
        engine.add_request(f"{tag}-{admitted}", TokensPrompt(prompt_token_ids=prompts[admitted % len(prompts)]), params)
        admitted, in_flight = admitted + 1, in_flight + 1

    began = time.perf_counter()
    while admitted < min(concurrency, total):
        admit()
    while in_flight:
        for out in engine.step():
            if not out.finished:
                continue
            in_flight -= 1
            if admitted < total:
                admit()
            tokens += len(out.outputs[0].token_ids)
            record = out.outputs[0].spec_decode_metrics
            if record is not None:
                steps += sum(record.histogram)
                accepted += sum(j * n for j, n in enumerate(record.histogram))
                drafted += record.num_draft_tokens
    seconds = time.perf_counter() - began
    return {"tokens": tokens, "seconds": seconds, "steps": steps, "drafted": drafted, "accepted": accepted,
            "requests": total}


def settings_of(config: SpeedConfig, kind: str) -> list[tuple]:
    """(drafter or None, mode, K, adaptive variant): what a drafter's block measures at each T and
    concurrency, no speculation twice among them."""
    settings = [(None, "none", 0, None)] * 2 + [(kind, "fixed", k, None) for k in config.ks]
    if config.adaptive:
        settings += [(kind, "adaptive", max(config.ks), label) for label in (None, *config.adaptive_variants)]
    return settings


def round_order(config: SpeedConfig, kind: str, round_index: int) -> list[tuple]:
    """(setting, T, concurrency) cells of one round of a block: the (T, concurrency) groups in a
    shuffled order and each group's settings shuffled within it, so the cells one speedup or
    adaptive / fixed ratio compares run back to back. (Until 2026-12-07 all of a round's cells were
    shuffled together: compared cells ran minutes apart, and a shared machine's speed swings as
    much within a round as the differences measured.)"""
    rng = random.Random(f"{config.seed}:{kind}:{round_index}")
    groups = [(t, c) for t in config.temperatures for c in config.concurrency]
    rng.shuffle(groups)
    order, base = [], settings_of(config, kind)
    for temperature, concurrency in groups:
        settings = list(base)
        rng.shuffle(settings)
        order += [(setting, temperature, concurrency) for setting in settings]
    return order


def measure(config: SpeedConfig, target: Path, drafters: dict[str, Path], prompts: list[list[int]]) -> list[dict]:
    """Every cell in every round; one record per (block, round, cell visit). The no-speculation
    engine stays up throughout; each drafter's engine for its block (two engines at a time fit
    a CPU machine's memory), where its settings and no speculation interleave round by round."""
    none = start_engine(config, target, None, None)
    records = []
    try:
        warm(none, None, prompts, config)
        groups = len(config.temperatures) * len(config.concurrency)
        bar = tqdm(total=config.rounds * groups * sum(len(settings_of(config, kind)) for kind in drafters), desc="bench speed",
                   unit="cell")
        for kind, path in drafters.items():
            llm = start_engine(config, target, kind, path)
            try:
                warm(llm, kind, prompts, config)
                for round_index in range(config.rounds):
                    for (cell_kind, mode, k, variant), temperature, concurrency in round_order(config, kind, round_index):
                        engine = llm if cell_kind is not None else none
                        if mode == "adaptive":
                            set_mode(engine, mode, None, policy_settings(config, variant))
                        elif cell_kind is not None:
                            set_mode(engine, mode, k)
                        before = policy_state(engine) if mode == "adaptive" else None
                        result = run_cell(engine, prompts, temperature, concurrency, config)
                        if before is not None:
                            result.update(policy_choices(before, policy_state(engine)))
                        records.append({"block": kind, "round": round_index, "drafter": cell_kind, "mode": mode, "K": k,
                                        "policy": (variant or "default") if mode == "adaptive" else None,
                                        "temperature": temperature, "concurrency": concurrency, **result})
                        bar.update()
            finally:
                llm.llm_engine.engine_core.shutdown()
        bar.close()
        return records
    finally:
        none.llm_engine.engine_core.shutdown()


def policy_state(llm) -> dict:
    return llm.collective_rpc("lk_speculation_state")[0]


def policy_choices(before: dict, after: dict) -> dict:
    """What the policy did during one cell: steps it planned at each cap k (explorations left
    out) and, at the end, every measured arm's mean seconds by (batch, mode)."""
    chosen = [a - b for a, b in zip(after["chosen"], before["chosen"])]
    return {"chosen": chosen, "arm_seconds": after["arm_seconds"]}


def warm(llm, kind: str | None, prompts: list[list[int]], config: SpeedConfig) -> None:
    """Caches, and the adaptive policy's start-up measurement, before anything is timed."""
    if kind is not None and config.adaptive:
        set_mode(llm, "adaptive", None, policy_settings(config, None))
    for temperature in config.temperatures:
        if config.warmup_requests:
            run_cell(llm, prompts[: config.warmup_requests], temperature, 1, config, requests=config.warmup_requests)


def summarize(records: list[dict], config: SpeedConfig) -> list[dict]:
    """The report rows: median speedup over rounds (against the same round's no-speculation
    rate at the same T and concurrency), its min-max spread, tau and drafts per step."""
    def rate(items):
        return sum(r["tokens"] for r in items) / sum(r["seconds"] for r in items)

    baseline = {}
    for r in records:
        if r["mode"] == "none":
            baseline.setdefault((r["block"], r["round"], r["temperature"], r["concurrency"]), []).append(r)
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["drafter"], r["mode"], r["K"], r.get("policy"), r["temperature"], r["concurrency"]), []).append(r)
    rows = []
    for (kind, mode, k, variant, temperature, concurrency), items in groups.items():
        per_round = {}
        for r in items:
            per_round.setdefault((r["block"], r["round"]), []).append(r)
        speedups = [rate(rs) / rate(baseline[(block, rnd, temperature, concurrency)]) for (block, rnd), rs in per_round.items()]
        steps = sum(r["steps"] for r in items)
        rows.append({
            "drafter": kind or "none", "mode": mode, "K": k, **({"policy": variant} if variant else {}),
            "temperature": temperature, "concurrency": concurrency,
            "tokens_per_s": rate(items), "speedup": statistics.median(speedups),
            "speedup_min": min(speedups), "speedup_max": max(speedups),
            "tau": 1 + sum(r["accepted"] for r in items) / steps if steps else None,
            "drafts_per_step": sum(r["drafted"] for r in items) / steps if steps else None,
            **({"chosen": [sum(col) for col in zip(*chosen)]} if (chosen := [r["chosen"] for r in items if "chosen" in r]) else {}),
        })
    add_cost_fit(rows)
    return sorted(rows, key=lambda r: (r["temperature"], r["concurrency"], r["drafter"] != "none", r["drafter"], r["mode"],
                                       r["K"], r.get("policy") != "default", r.get("policy") or ""))


def add_cost_fit(rows: list[dict]) -> None:
    """c per (drafter, T, concurrency) from its fixed rows (speedup = tau / (1 + K c)), and the
    bound tau / (1 + K c) beside every speculative row (adaptive: K = its drafts per step)."""
    fits: dict[tuple, list[float]] = {}
    for r in rows:
        if r["mode"] == "fixed" and r["tau"]:
            fits.setdefault((r["drafter"], r["temperature"], r["concurrency"]), []).append((r["tau"] / r["speedup"] - 1) / r["K"])
    for r in rows:
        c = fits.get((r["drafter"], r["temperature"], r["concurrency"]))
        if r["mode"] == "none" or not c or not r["tau"]:
            continue
        r["c"] = statistics.mean(c)
        k = r["K"] if r["mode"] == "fixed" else r["drafts_per_step"]
        r["bound"] = r["tau"] / (1 + k * r["c"])


def mode_label(row: dict) -> str:
    """``adaptive`` for the default policy, ``adaptive (LABEL)`` for a variant."""
    variant = row.get("policy")
    return f"{row['mode']} ({variant})" if variant and variant != "default" else row["mode"]


def markdown(report: dict) -> str:
    config = report["config"]
    lines = [
        "# vllm-lk bench speed", "",
        f"{report['environment']['platform']}, {report['environment']['cpus']} CPU cores; {config['prompts']} held-out code prompts x {config['max_tokens']} tokens "
        f"(ignore_eos), {config['rounds']} interleaved rounds; speedup = median over rounds vs no speculation "
        "(same round, T, concurrency) [min-max]; tau = tokens per verification step; "
        "c = fitted cost of one drafted token relative to a decode step; bound = tau / (1 + K c).", "",
        "| T | conc. | drafter | mode | K | tok/s | speedup [spread] | tau | drafts/step | c | bound |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        fmt = lambda v, f="{:.2f}": "–" if v is None else f.format(v)
        lines.append(
            f"| {r['temperature']:g} | {r['concurrency']} | {r['drafter']} | {mode_label(r)} | {r['K'] if r['mode'] == 'fixed' else '–'} | "
            f"{r['tokens_per_s']:.0f} | {r['speedup']:.2f}× [{r['speedup_min']:.2f}–{r['speedup_max']:.2f}] | {fmt(r['tau'])} | "
            f"{fmt(r['drafts_per_step'])} | {fmt(r.get('c'))} | {fmt(r.get('bound'))} |")
    lines += adaptive_choices(report)
    if report.get("breakdown"):
        names = ("target_forward", "draft_forward", "drafting", "verification", "sampling", "scheduler", "other_engine", "front_end", "step")
        lines += ["", "Where a step's time goes (ms per engine step, concurrency 1; training.bench.speed_profile; "
                  "drafting includes draft_forward; adaptive: K is the cap):", "",
                  "| drafter | mode | K | T | tok/s | tokens/step | " + " | ".join(names) + " | target forward by query tokens | drafting's parts |",
                  "|---" * (len(names) + 8) + "|"]
        for b in report["breakdown"]:
            by_tokens = ", ".join(f"{n}: {v:.2f}" for n, v in sorted(b["target_forward_ms_by_query_tokens"].items(), key=lambda kv: int(kv[0])) if int(n) <= 16)
            parts = ", ".join(f"{n}: {v:.2f}" for n, v in sorted(b.get("drafting_ms_per_step", {}).items()))
            lines.append(f"| {b['drafter']} | {b.get('mode', 'fixed')} | {b['K']} | {b['temperature']:g} | {b['tokens_per_s']:.0f} | {b['tokens_per_step']:.2f} | "
                         + " | ".join(f"{b['ms_per_step'][n]:.2f}" for n in names) + f" | {by_tokens} | {parts} |")
    return "\n".join(lines) + "\n"


def adaptive_choices(report: dict) -> list[str]:
    """Markdown: each adaptive cell's planned caps (share of planned steps by k) beside the
    arms' measured step seconds the policy held at the end of the cell's last round."""
    rows = [r for r in report["rows"] if r["mode"] == "adaptive" and r.get("chosen")]
    if not rows:
        return []
    max_k = len(rows[0]["chosen"]) - 1
    lines = ["", "Adaptive choices: share of planned steps at each cap k (explorations left out), and the policy's measured "
             "ms per step by k for the cell's batch size and mode at the end of its last round (– not measured):", "",
             "| T | conc. | drafter | mode | " + " | ".join(f"k={k}" for k in range(max_k + 1)) + " | ms/step by k |",
             "|---" * (max_k + 5) + "|"]
    for r in rows:
        total = max(sum(r["chosen"]), 1)
        last = [rec for rec in report.get("records", []) if rec["mode"] == "adaptive" and rec["drafter"] == r["drafter"]
                and rec.get("policy") == r.get("policy", "default") and rec["temperature"] == r["temperature"]
                and rec["concurrency"] == r["concurrency"]]
        batch = r["concurrency"]  # the steady batch: requests per cell >= concurrency (waves)
        key = f"{batch}:{'greedy' if r['temperature'] == 0 else 'sampled'}"
        arms = last[-1].get("arm_seconds", {}).get(key) if last else None
        ms = " / ".join("–" if v is None else f"{1000 * v:.2f}" for v in arms) if arms else "–"
        lines.append(f"| {r['temperature']:g} | {r['concurrency']} | {r['drafter']} | {mode_label(r)} | "
                     + " | ".join(f"{100 * n / total:.0f} %" for n in r["chosen"]) + f" | {ms} |")
    return lines


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    panels = sorted({(r["temperature"], r["concurrency"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), sharey=True, squeeze=False)
    for ax, (temperature, concurrency) in zip(axes[0], panels):
        panel = [r for r in rows if (r["temperature"], r["concurrency"]) == (temperature, concurrency) and r["mode"] != "none"]
        for kind in sorted({r["drafter"] for r in panel}):
            fixed = sorted((r for r in panel if r["drafter"] == kind and r["mode"] == "fixed"), key=lambda r: r["K"])
            line = ax.errorbar([r["K"] for r in fixed], [r["speedup"] for r in fixed],
                               yerr=[[r["speedup"] - r["speedup_min"] for r in fixed], [r["speedup_max"] - r["speedup"] for r in fixed]],
                               marker="o", capsize=2, label=f"{kind} fixed K")
            for r in panel:
                if r["drafter"] == kind and r["mode"] == "adaptive":
                    default = r.get("policy", "default") == "default"
                    ax.scatter([r["drafts_per_step"]], [r["speedup"]], marker="*" if default else "P", s=140, color=line[0].get_color(),
                               edgecolor="black", zorder=3, label=f"{kind} {mode_label(r)} (x = drafts/step)")
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
        ax.set_title(f"T={temperature:g}, concurrency {concurrency}")
        ax.set_xlabel("K (drafts per step)")
    axes[0][0].set_ylabel("speedup vs no speculation")
    handles, labels = axes[0][-1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def profile_steps(config: SpeedConfig, target: Path, drafters: dict[str, Path], prompts: list[list[int]]) -> list[dict]:
    """The step breakdown (training.bench.speed_profile, one process and engine per drafter): no
    speculation, and each drafter at fixed K = profile_k and adaptive with that cap, at each
    temperature; concurrency 1."""
    import subprocess
    import sys
    import tempfile

    k = min(config.profile_k, config.num_heads)
    modes = ("fixed", "adaptive") if config.adaptive else ("fixed",)
    rows = []
    for kind, path in tqdm([(None, None), *drafters.items()], desc="step breakdown"):
        runs = [(mode, t) for mode in (modes if kind else ("none",)) for t in config.temperatures]
        spec = {"target": str(target), "method": VLLM_METHODS[kind_of(kind)] if kind else None, "drafter": str(path) if path else None,
                "k": k, "runs": runs, "prompts": prompts, "max_tokens": config.max_tokens,
                "gpu_memory_utilization": config.gpu_memory_utilization, "max_model_len": config.max_model_len}
        with tempfile.TemporaryDirectory() as tmp:
            spec_file, out = Path(tmp) / "spec.json", Path(tmp) / "out.json"
            spec_file.write_text(json.dumps(spec))
            subprocess.run([sys.executable, "-m", "training.bench.speed_profile", "--spec", str(spec_file), "--out", str(out)],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            results = json.loads(out.read_text())
        rows += [{"drafter": kind or "none", "mode": mode, "K": k if kind else 0, "temperature": t, **result}
                 for (mode, t), result in zip(runs, results)]
    return rows


def bench_speed(config: SpeedConfig, out: str | Path | None = None, json_path: str | Path | None = None) -> dict:
    """Build what is missing, measure, write JSON (+ markdown and PNG beside it); the report."""
    from training.bench.reproduce import environment
    from training.generate import EngineFields, prepare_prompts, resolve_target

    target = resolve_target(config.target)
    assert max(config.ks) <= config.num_heads, "every K must be <= num_heads"
    drafters = drafter_dirs(config, target)
    _, prompts = prepare_prompts(f"builtin:code:heldout:{config.prompts}:{config.seed}", target,
                                 EngineFields(max_model_len=config.max_model_len), config.max_tokens)
    started = time.perf_counter()
    records = measure(config, target, drafters, prompts)
    breakdown = profile_steps(config, target, drafters, prompts) if config.profile_k else []
    report = {"config": json.loads(config.model_dump_json()), "target": str(target),
              "drafters": {k: str(v) for k, v in drafters.items()}, "rows": summarize(records, config),
              "breakdown": breakdown, "records": records, "seconds": time.perf_counter() - started,
              "environment": environment()}
    json_path = Path(json_path) if json_path else (Path(out) / "speed.json" if out else None)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2) + "\n")
        json_path.with_suffix(".md").write_text(markdown(report))
        plot(report, json_path.with_suffix(".png"))
    return report

