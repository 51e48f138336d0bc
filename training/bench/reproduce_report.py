"""The numbers of `vllm-lk bench reproduce`, from its per-pair evaluation records: the table, the
gain over KL, served-vs-predicted agreement, the markdown and the plot. Pure functions of plain
dicts (no engine, no torch), so they are unit tested on hand-made records.

An evaluation record (one per served (pair, held-out set, temperature)) is a dict with
``drafter, loss, seed, set, temperature, served_tau, predicted_tau, predicted_tau_at_steps,
served_acceptance, predicted_acceptance, source`` (the per-pair JSON it was read from).
``predicted_tau`` assumes positions independent at their mean alpha (what a training run's
lk_metadata promises); ``predicted_tau_at_steps`` evaluates the same heads at the contexts the
served verification steps started from (training.evaluate.predict_at_steps).

    gain over KL = tau(loss) / tau(KL) - 1        same drafter, set, temperature; seed means
    served vs predicted = served tau / predicted tau - 1      per record (the issue's 3 % bar)
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

BASELINE_LOSS = "kl"
KEY = ("drafter", "loss", "temperature", "set")


def _mean(values: list[float]) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.fmean(values) if values else math.nan


def relative(value: float, reference: float) -> float:
    """value / reference - 1 (nan when either is missing or the reference is 0)."""
    if value is None or reference is None or math.isnan(value) or math.isnan(reference) or reference == 0:
        return math.nan
    return value / reference - 1


def tau_standard_error(accepted_per_position: list[int], steps: int) -> float:
    """Standard error of served tau from its per-position counts (steps treated as independent).

    A step's accepted count N has P(N >= k) = (steps that accepted drafts 1..k) / steps, so its
    mean and variance follow from the per-position counts: E[N] = sum_k P(N >= k),
    E[N^2] = sum_k (2k - 1) P(N >= k)."""
    if not steps:
        return math.nan
    tails = [a / steps for a in accepted_per_position]
    mean = sum(tails)
    second = sum((2 * k - 1) * tail for k, tail in enumerate(tails, start=1))
    return math.sqrt(max(second - mean**2, 0.0) / steps)


def agreement(records: list[dict], tolerance: float) -> list[dict]:
    """Served vs predicted tau for every record, with whether it is within ``tolerance``."""
    rows = []
    for r in records:
        diff = relative(r["served_tau"], r["predicted_tau"])
        at_steps = r.get("predicted_tau_at_steps", math.nan)
        diff_steps = relative(r["served_tau"], at_steps)
        rows.append({**{k: r[k] for k in (*KEY, "seed")}, "served_tau": r["served_tau"], "predicted_tau": r["predicted_tau"],
                     "served_vs_predicted": diff, "within_tolerance": _within(diff, tolerance),
                     "predicted_tau_at_steps": at_steps, "served_vs_at_steps": diff_steps,
                     "served_tau_se": r.get("served_tau_se", math.nan),
                     "at_steps_z": (r["served_tau"] - at_steps) / r["served_tau_se"] if r.get("served_tau_se") else math.nan,
                     "at_steps_within_tolerance": _within(diff_steps, tolerance)})
    return rows


def _within(diff: float, tolerance: float) -> bool:
    return bool(abs(diff) <= tolerance) if not math.isnan(diff) else False


def baseline_of(loss: str) -> str:
    """The row a loss's gain is measured over: KL from scratch, or for a fine-tuning row "A+B"
    (head trained with A, then fine-tuned with B) the same head fine-tuned with KL, "A+kl"."""
    return f"{loss.split('+')[0]}+{BASELINE_LOSS}" if "+" in loss else BASELINE_LOSS


def table(records: list[dict], order: dict[str, list] | None = None) -> list[dict]:
    """One row per (drafter, loss, temperature, set): seed means of served and predicted tau, and
    their relative gain over the row baseline_of(loss) with the same drafter, temperature and set."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault(tuple(r[k] for k in KEY), []).append(r)
    rows = {}
    for key, members in groups.items():
        seeds = sorted(members, key=lambda r: r["seed"])
        rows[key] = {
            **dict(zip(KEY, key)),
            "seeds": [r["seed"] for r in seeds],
            "served_tau": _mean([r["served_tau"] for r in seeds]),
            "served_tau_per_seed": [r["served_tau"] for r in seeds],
            "predicted_tau": _mean([r["predicted_tau"] for r in seeds]),
            "predicted_tau_at_steps": _mean([r.get("predicted_tau_at_steps", math.nan) for r in seeds]),
            "served_acceptance_1": _mean([r["served_acceptance"][0] for r in seeds if r["served_acceptance"]]),
            "sources": [r["source"] for r in seeds],
        }
    for row in rows.values():
        base = rows.get((row["drafter"], baseline_of(row["loss"]), row["temperature"], row["set"]))
        row["served_gain_over_kl"] = relative(row["served_tau"], base["served_tau"]) if base else math.nan
        row["predicted_gain_over_kl"] = relative(row["predicted_tau"], base["predicted_tau"]) if base else math.nan
    return sorted(rows.values(), key=lambda row: _sort_key(row, order or {}))


def _sort_key(row: dict, order: dict[str, list]) -> tuple:
    def rank(field):
        values = order.get(field, [])
        return values.index(row[field]) if row[field] in values else len(values)

    return (rank("drafter"), rank("loss"), row["temperature"], rank("set"), str(row["drafter"]), str(row["loss"]), str(row["set"]))


def gain_summary(rows: list[dict], temperature: float = 1.0) -> dict[str, dict[str, float]]:
    """drafter -> loss -> served gain over KL at ``temperature``, averaged over the held-out sets."""
    out: dict[str, dict[str, float]] = {}
    for row in rows:
        if row["temperature"] == temperature and row["loss"] != baseline_of(row["loss"]):
            out.setdefault(row["drafter"], {}).setdefault(row["loss"], []).append(row["served_gain_over_kl"])
    return {d: {loss: _mean(v) for loss, v in losses.items()} for d, losses in out.items()}


def best_pair(records: list[dict], temperature: float) -> tuple[str, str, int] | None:
    """(drafter, loss, seed) with the highest served tau at ``temperature``, averaged over sets."""
    scores: dict[tuple, list[float]] = {}
    for r in records:
        if r["temperature"] == temperature:
            scores.setdefault((r["drafter"], r["loss"], r["seed"]), []).append(r["served_tau"])
    return max(scores, key=lambda k: _mean(scores[k])) if scores else None


# ----------------------------------------------------------------------------------------------
# rendering


def percent(value: float) -> str:
    if value is None or math.isnan(value):
        return "–"
    return f"{round(100 * value, 1) + 0.0:+.1f} %"  # + 0.0: no "-0.0 %" for a rounding-level negative


def _num(value: float) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.3f}"


def pivot_markdown(rows: list[dict], config: dict) -> list[str]:
    """The compact table: one row per drafter x loss, one column per (T, set): served tau and, for
    losses other than KL, the gain over KL."""
    columns = [(t, kind) for t in config["temperatures"] for kind in config["heldout_sets"]]
    cells = {(r["drafter"], r["loss"], r["temperature"], r["set"]): r for r in rows}
    lines = ["| drafter | loss | " + " | ".join(f"T={t:g} {kind}" for t, kind in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for drafter in dict.fromkeys(r["drafter"] for r in rows):
        for loss in dict.fromkeys(r["loss"] for r in rows if r["drafter"] == drafter):
            shown = []
            for t, kind in columns:
                row = cells.get((drafter, loss, t, kind))
                if row is None:
                    shown.append("–")
                else:
                    gain = "" if loss == baseline_of(loss) else f" ({percent(row['served_gain_over_kl'])})"
                    shown.append(_num(row["served_tau"]) + gain)
            lines.append(f"| {drafter} | {loss} | " + " | ".join(shown) + " |")
    return lines


def markdown(report: dict) -> str:
    """The README-ready summary: setup line, the table, the bars, throughput."""
    config, rows = report["config"], report["table"]
    tolerance = config["tau_tolerance"]
    lines = [
        "# KL vs TV vs LK: served acceptance length on the held-out sets",
        "",
        (f"Target `{report['target']['path']}`; data `{report['data']['path']}` (sha256 `{report['data']['sha256'][:12]}`, "
        f"{report['data']['examples']} examples); {config['steps']} steps × batch {config['batch_size']} per run; "
        f"seeds {config['seeds']}; K = {config['num_speculative_tokens']}; {config['heldout_prompts']} prompts × "
        f"{config['eval_max_tokens']} tokens per held-out set. τ = mean acceptance length incl. the bonus token; "
        "gain = τ / τ(KL) − 1 for the same drafter, T and set (seed means); a row `kl+B` is the KL head fine-tuned "
        f"{config.get('finetune_steps', 0)} more steps with B from its export, its gain over `kl+kl`. Per-run files: "
        f"`{report['out']}/runs/`, `{report['out']}/evals/`."),
        "",
        *pivot_markdown(rows, config),
        "",
        "Every evaluation, with the offline predictions beside it:",
        "",
        "| drafter | loss | T | set | served τ | predicted τ | served/predicted − 1 | predicted at served steps | served/that − 1 | gain vs KL (served) | gain vs KL (predicted) | acc. pos 1 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['drafter']} | {row['loss']} | {row['temperature']:g} | {row['set']} | {_num(row['served_tau'])} | "
            f"{_num(row['predicted_tau'])} | {percent(relative(row['served_tau'], row['predicted_tau']))} | "
            f"{_num(row['predicted_tau_at_steps'])} | {percent(relative(row['served_tau'], row['predicted_tau_at_steps']))} | "
            f"{percent(row['served_gain_over_kl'])} | {percent(row['predicted_gain_over_kl'])} | {_num(row['served_acceptance_1'])} |"
        )
    lines += ["", "## Bars", ""]
    for temperature in config["temperatures"]:
        for drafter, gains in gain_summary(rows, temperature).items():
            shown = ", ".join(f"{loss} {percent(g)}" for loss, g in gains.items())
            lines.append(f"- T={temperature:g}, {drafter}: served τ gain over KL (mean over sets): {shown}")
    agree = report["agreement"]
    for name, diff_key, flag in (("predicted τ (independent positions)", "served_vs_predicted", "within_tolerance"),
                                 ("predicted τ at the served steps", "served_vs_at_steps", "at_steps_within_tolerance")):
        within = sum(a.get(flag, False) for a in agree)
        diffs = [a for a in agree if not math.isnan(a.get(diff_key, math.nan))]
        worst = max(diffs, key=lambda a: abs(a[diff_key]), default=None)
        lines.append(f"- served vs {name} within {100 * tolerance:g} %: {within} of {len(agree)} evaluations"
                     + (f" (worst: {worst['drafter']}/{worst['loss']} seed {worst['seed']} T={worst['temperature']:g} "
                        f"{worst['set']}: {percent(worst[diff_key])})" if worst else ""))
    z = [abs(a["at_steps_z"]) for a in agree if not math.isnan(a.get("at_steps_z", math.nan))]
    if z:
        se = [a["served_tau_se"] / a["served_tau"] for a in agree if not math.isnan(a.get("served_tau_se", math.nan))]
        lines.append(f"- sampling noise: served τ's standard error is {100 * min(se):.1f}–{100 * max(se):.1f} % of τ; "
                     f"|served − predicted at the served steps| ≤ 2 standard errors in {sum(v <= 2 for v in z)} of {len(z)}, "
                     f"≤ 3 in {sum(v <= 3 for v in z)} (largest {max(z):.1f})")
    if throughput := report.get("throughput"):
        lines += ["", "## Decode throughput, best pair vs no speculation", ""]
        pair = throughput["pair"]
        lines.append(f"{pair['drafter']}/{pair['loss']} seed {pair['seed']}, {throughput['prompts']} prompts, "
                     f"concurrency {throughput['concurrency']}:")
        lines.append("")
        lines += ["| T | tokens/s without | tokens/s with | speedup | τ |", "|---|---|---|---|---|"]
        for m in throughput["measurements"]:
            lines.append(f"| {m['temperature']:g} | {m['baseline_tokens_per_s']:.1f} | {m['speculative_tokens_per_s']:.1f} | "
                         f"{m['speedup']:.2f}× | {_num(m['tau'])} |")
    lines += ["", f"Plot: `{Path(report['plot']).name}`. Timings of this invocation (s): "
              + ", ".join(f"{k} {v:.0f}" for k, v in report["timings"].items())]
    if recorded := report.get("recorded_seconds"):
        lines[-1] += ("; work recorded in the run files, whenever it ran (s): "
                      + ", ".join(f"{k.replace('_', ' ')} {v:.0f}" for k, v in recorded.items()))
    lines.append("")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> Path:
    """Served tau (bars) and the two predictions (dots, crosses), one panel per (temperature, set)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config, rows = report["config"], report["table"]
    temps, sets = config["temperatures"], config["heldout_sets"]
    drafters = [d for d in config["drafters"] if any(r["drafter"] == d for r in rows)]
    losses = config["losses"]
    fig, axes = plt.subplots(len(temps), len(sets), figsize=(4.5 * len(sets), 3.4 * len(temps)), squeeze=False)
    width = 0.8 / max(len(losses), 1)
    for i, temperature in enumerate(temps):
        for j, kind in enumerate(sets):
            ax = axes[i][j]
            for n, loss in enumerate(losses):
                by_drafter = {r["drafter"]: r for r in rows if r["loss"] == loss and r["temperature"] == temperature and r["set"] == kind}
                xs = [d + (n - (len(losses) - 1) / 2) * width for d in range(len(drafters))]
                served = [by_drafter[d]["served_tau"] if d in by_drafter else math.nan for d in drafters]
                predicted = [by_drafter[d]["predicted_tau"] if d in by_drafter else math.nan for d in drafters]
                ax.bar(xs, served, width, label=loss)
                at_steps = [by_drafter[d].get("predicted_tau_at_steps", math.nan) if d in by_drafter else math.nan for d in drafters]
                ax.plot(xs, predicted, "k.", label="predicted (independent positions)" if n == 0 else None)
                ax.plot(xs, at_steps, "kx", markersize=4, label="predicted at the served steps" if n == 0 else None)
            ax.set_xticks(range(len(drafters)), drafters)
            ax.set_title(f"T={temperature:g}, {kind} (held out)")
            ax.set_ylabel("served τ")
            ax.set_ylim(bottom=1.0)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle(f"K={config['num_speculative_tokens']}, {config['steps']} steps, seeds {config['seeds']}")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
