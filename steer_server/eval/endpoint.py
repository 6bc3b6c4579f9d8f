"""Modality following measured through an OpenAI-compatible endpoint.

Every sample is sent with the official `openai` client; every failure is recorded with the sample's id
(a run with errors reports them, it never shrinks the denominator silently).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..data.prompts import openai_messages
from ..data.schema import LoadedSample, Sample
from ..data.scoring import mf_report
from ..stats import Estimate


@dataclass
class ServedRun:
    """Answers and errors by sample id, and each answered request's latency (seconds)."""

    answers: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)


ExtraBody = dict[str, Any] | Callable[[Sample], dict[str, Any] | None] | None


def steer_body(spec: str) -> ExtraBody:
    """`--steer` values: a spec sent as is, or `instructed[:GAIN]`: each sample's own instruction mode
    (at the profile's default gain, or GAIN)."""
    if spec == "off":
        return None
    if spec == "instructed" or spec.startswith("instructed:"):
        gain = float(spec.split(":", 1)[1]) if ":" in spec else None

        def per_sample(sample: Sample) -> dict[str, Any]:
            value: Any = sample.follow if gain is None else {"follow": sample.follow, "gain": gain}
            return {"modality_steer": value}

        return per_sample
    value: Any = json.loads(spec) if spec.lstrip().startswith("{") else spec
    return {"modality_steer": value}


def _ask(
    client: Any, model: str, loaded: LoadedSample, max_tokens: int, extra_body: ExtraBody
) -> tuple[str, float]:
    body = extra_body(loaded.sample) if callable(extra_body) else extra_body
    started = time.perf_counter()
    reply = client.chat.completions.create(
        model=model,
        messages=openai_messages(loaded),
        max_tokens=max_tokens,
        temperature=0,
        extra_body=body,
    )
    content = reply.choices[0].message.content
    if content is None:
        raise ValueError("the reply has no content")
    return content, time.perf_counter() - started


def served_answers(
    client: Any,
    model: str,
    samples: Sequence[LoadedSample],
    *,
    concurrency: int = 8,
    max_tokens: int = 8,
    extra_body: ExtraBody = None,
    progress: bool = False,
    desc: str = "served eval",
) -> ServedRun:
    """Greedy answers for every sample (temperature 0), `concurrency` requests in flight."""
    from tqdm import tqdm

    run = ServedRun()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        futures = {pool.submit(_ask, client, model, s, max_tokens, extra_body): s for s in samples}
        for future in tqdm(futures, desc=desc, disable=not progress, unit="req"):
            sample_id = futures[future].sample.id
            try:
                answer, seconds = future.result()
            except Exception as exc:  # each failure is reported by sample id
                run.errors[sample_id] = f"{type(exc).__name__}: {exc}"
                continue
            run.answers[sample_id] = answer
            run.latencies.append(seconds)
    return run


def served_report(samples: Sequence[LoadedSample], run: ServedRun) -> dict[str, Any]:
    """MF figures over the samples that were answered, with the errors listed beside them."""
    answered = [s.sample for s in samples if s.sample.id in run.answers]
    report = mf_report(answered, [run.answers[s.id] for s in answered]).as_dict()
    report["requests"] = len(samples)
    report["errors"] = len(run.errors)
    report["error_samples"] = dict(list(run.errors.items())[:20])
    if run.latencies:
        ordered = sorted(run.latencies)
        report["latency_s"] = {
            "p50": statistics.median(ordered),
            "p99": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
            "mean": statistics.fmean(ordered),
        }
    return report


def summary_line(report: dict[str, Any]) -> str:
    """One line for people: the MF ratio, each instruction's and the control accuracy of a
    :func:`served_report`, with 95% intervals and counts."""
    intervals = report["intervals"]
    parts = [f"MF ratio {Estimate.from_dict(intervals['mf_ratio']).percent(digits=1)}"]
    for follow, estimate in intervals["mf_ratio_by_follow"].items():
        parts.append(f'"rely on the {follow}" {Estimate.from_dict(estimate).percent(digits=1)}')
    parts.append(f"control accuracy {Estimate.from_dict(intervals['control_accuracy']).percent(digits=1)}")
    return "; ".join(parts) + " (95% CI)"
