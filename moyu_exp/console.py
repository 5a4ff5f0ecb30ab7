"""The console: signal, not noise, and a run that ends by showing its result.

:func:`quiet` keeps the libraries' chatter (lm-eval's and transformers' INFO and warnings about
how they are driven) out of the console; it still reaches the run's log file (``moyu_exp.log``),
and ``verbose=true`` lets it through. moyu_exp's own messages (fallbacks, cache rebuilds,
calibration) stay visible.

:func:`render`: a single run (and a probe) ends like lm-eval's CLI does, with its numbers on the
console: the point, the achieved sparsity, each task's metrics in lm-eval's own table (stderr
included), fidelity, the timing, the wall time of each phase, the ``results.json`` path and the
``wandb sync`` command of the offline run. Sweeps end with their comparison table instead
(:mod:`moyu_exp.sweep`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

OWN = "moyu_exp"


class _OwnOrSevere(logging.Filter):
    """Pass moyu_exp's records, and anything else at ERROR or above."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == OWN or record.name.startswith(OWN + "."):
            return True
        if record.name == "py.warnings":
            return OWN in str(record.args[0] if record.args else record.getMessage())
        return record.levelno >= logging.ERROR


def quiet(verbose: bool) -> None:
    """Filter the console handlers of the root logger (the log file keeps everything), and
    route Python warnings through logging so that library warnings are filtered alike."""
    logging.captureWarnings(True)
    if verbose:
        return
    # datasets' "Generating split" bars are about its own file cache, not about the run
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    for handler in logging.getLogger().handlers:
        console = isinstance(handler, logging.StreamHandler) and not isinstance(
            handler, logging.FileHandler
        )
        if console and not any(isinstance(f, _OwnOrSevere) for f in handler.filters):
            handler.addFilter(_OwnOrSevere())


def render(payload: dict[str, Any], run_dir: Path) -> str:
    """The closing summary of a finished run or probe (see the module docstring)."""
    lines = [_headline(payload)]
    if payload.get("probe"):
        lines += _probe(payload["probe"], run_dir)
    else:
        lines += _sparsity(payload)
        lines += _calibration(payload.get("calibration") or {})
        table = task_table(payload)
        if table:
            lines += ["", table.rstrip(), ""]
        lines += _fidelity(payload)
        lines += _generation(payload)
        bench_detail = (payload.get("sparsity_detail") or {}).get("bench") or {}
        lines += _timing(payload.get("bench") or {}, bench_detail.get("ideal_speedup"))
    lines += _phases(payload.get("timings") or {})
    lines += _where(payload, run_dir)
    return "\n".join(lines)


def _headline(payload: dict[str, Any]) -> str:
    config = payload.get("config") or {}
    model = (config.get("model") or {}).get("name", "?")
    probe = payload.get("probe")
    subject = f"probe {probe['name']}" if probe else f"strategy {payload.get('strategy')}"
    resumed = " (served from a finished point)" if payload.get("resumed_from") else ""
    return (
        f"moyu_exp: {subject} at sparsity {payload.get('sparsity')} on {model}: "
        f"{payload.get('status')}{resumed}"
    )


def _sparsity(payload: dict[str, Any]) -> list[str]:
    achieved = payload.get("achieved_sparsity")
    if achieved is None:
        return ["  sparsity    nothing ran sparse (no evaluation, no timing)"]
    site = payload.get("site_sparsity")
    ideal = payload.get("ideal_speedup")
    parts = [f"model-level {achieved:.3f}"]
    if site is not None:
        parts.append(f"at its sites {site:.3f}")
    if ideal is not None:
        mb = (payload.get("weight_bytes_per_token") or 0) / 1e6
        parts.append(f"bytes-bound ideal {ideal:.2f}x ({mb:.1f} MB of weights per token)")
    scored = [
        f"{task} {detail['sparse_scored_fraction']:.0%}"
        for task, detail in (payload.get("eval_details") or {}).items()
        if detail.get("sparse_scored_fraction") is not None
    ]
    lines = [f"  sparsity    {' | '.join(parts)}"]
    if scored:
        lines.append(f"  protocol    scored positions that ran sparse: {', '.join(scored)}")
    return lines


def _calibration(calibration: dict[str, Any]) -> list[str]:
    if not calibration:
        return []
    how = "read from the cache" if calibration.get("cache") == "hit" else "computed and cached"
    parts = calibration.get("parts") or {}
    if parts:
        how += " (" + ", ".join(f"{kind} {origin}" for kind, origin in parts.items()) + ")"
    return [
        f"  calibrated  {calibration.get('tokens_used')} tokens of '{calibration.get('dataset')}'"
        f" in {calibration.get('rows')} row(s), digest {calibration.get('token_digest')}: {how}"
    ]


def task_table(payload: dict[str, Any]) -> str:
    """The lm-eval tasks' metrics in lm-eval's own markdown table (fidelity is not a task)."""
    from lm_eval.utils import make_table

    details = payload.get("eval_details") or {}
    tasks = {t: m for t, m in (payload.get("eval") or {}).items() if t != "fidelity"}
    if not tasks:
        return ""
    results: dict[str, dict[str, Any]] = {}
    for task, metrics in tasks.items():
        row: dict[str, Any] = {"alias": task}
        for metric, value in metrics.items():
            if metric.endswith("_stderr"):
                continue
            name, _, filt = metric.partition(",")
            filt = filt or "none"
            stderr = metrics.get(f"{name}_stderr" + (f",{filt}" if filt != "none" else ""))
            row[f"{name},{filt}"] = value
            row[f"{name}_stderr,{filt}"] = "N/A" if stderr is None else stderr
        results[task] = row
    shots = ((payload.get("config") or {}).get("eval") or {}).get("num_fewshot") or 0
    table = {
        "results": results,
        "versions": {t: (details.get(t) or {}).get("version") for t in tasks},
        "n-shot": dict.fromkeys(tasks, shots),
        "higher_is_better": {
            t: (details.get(t) or {}).get("higher_is_better") or {} for t in tasks
        },
    }
    return make_table(table)


def _generation(payload: dict[str, Any]) -> list[str]:
    gen = (payload.get("eval") or {}).get("generation")
    if not gen:
        return []
    buckets = " | ".join(
        f"{key[3:].replace('_', '-')}: {gen[key]:.4f}" for key in gen if key.startswith("kl_")
    )
    sparsity = gen.get("model_sparsity")
    where = "" if sparsity is None else f" (model-level sparsity {sparsity:.3f})"
    return [
        f"  generation  KL(dense || sparse) by distance {buckets} nats | top-1 agreement "
        f"{gen['top1_agreement']:.3f} over {int(gen['prompts'])} x {int(gen['tokens'])} "
        f"generated tokens{where}"
    ]


def _fidelity(payload: dict[str, Any]) -> list[str]:
    fidelity = (payload.get("eval") or {}).get("fidelity")
    if not fidelity:
        return []
    return [
        f"  fidelity    KL(dense || sparse) {fidelity['kl']:.4f} nats | top-1 agreement "
        f"{fidelity['top1_agreement']:.3f} over {int(fidelity['tokens'])} positions "
        f"({fidelity.get('sparse_fraction', 1.0):.0%} of them sparse)"
    ]


def _timing(bench: dict[str, Any], ideal: float | None = None) -> list[str]:
    """The bench's line; ``ideal``: the bytes-bound ideal of the sets its decode steps kept."""
    if not bench:
        return []
    line = (
        f"  timing      {bench['mode']}: {bench['decode_tokens_per_s']:.1f} tokens/s decode, "
        f"{bench['prefill_ms']:.0f} ms prefill of {bench['prompt_tokens']} tokens"
    )
    if bench.get("speedup") is not None:
        line += (
            f"; paired speedup {bench['speedup']:.2f}x (IQR {bench['speedup_iqr']:.2f}) over "
            f"dense {bench['dense_tokens_per_s']:.1f} tokens/s, ideal "
            f"{ideal or float('nan'):.2f}x, efficiency {bench['efficiency']:.2f}"
        )
    elif bench.get("mode") == "simulated":
        line += " (masked forward: accuracy, not speed; bench.mode=kernel times real skipping)"
    return [line]


def _probe(probe: dict[str, Any], run_dir: Path) -> list[str]:
    lines = [f"  question    {probe.get('question')}"]
    for key, value in _headline_numbers(probe.get("numbers") or {}):
        lines.append(f"  {key:<11} {value}")
    for figure in probe.get("figures") or []:
        lines.append(f"  figure      {Path(run_dir) / figure}")
    return lines


def _headline_numbers(numbers: dict[str, Any], limit: int = 8) -> list[tuple[str, str]]:
    """The probe's top-level scalars and one level of named means (e.g. per source)."""
    out: list[tuple[str, str]] = []
    for key, value in numbers.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            out.append((key, f"{value:.4g}"))
        elif isinstance(value, dict):
            means = {k: v for k, v in value.items() if isinstance(v, int | float) and "mean" in k}
            nested = {
                k: v["mean"]
                for k, v in value.items()
                if isinstance(v, dict) and isinstance(v.get("mean"), int | float)
            }
            picked = {**means, **nested}
            if picked:
                shown = ", ".join(f"{k} {v:.4g}" for k, v in list(picked.items())[:4])
                out.append((key, shown))
    return out[:limit]


def _phases(timings: dict[str, float]) -> list[str]:
    if not timings:
        return []
    parts = [f"{phase.removesuffix('_s')} {seconds:.1f} s" for phase, seconds in timings.items()]
    return [f"  time        {' | '.join(parts)}"]


def _where(payload: dict[str, Any], run_dir: Path) -> list[str]:
    lines = [f"  results     {Path(run_dir) / 'results.json'}"]
    offline = sorted((Path(run_dir) / "wandb").glob("offline-run-*"))
    if offline:
        lines.append(f"  W&B         wandb sync {offline[-1]}")
    return lines
