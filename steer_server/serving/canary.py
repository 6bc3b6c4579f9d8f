"""Canary checks: before a deployment serves, its steering must do what the profile records.

The profile carries canaries (:class:`~steer_server.profile.CanarySet`, written by the analysis): conflicts
with their inputs and the metric transformers measured on them unsteered and under each mode's block
(gain 0) and default gain. After the start-up handshake (every worker armed), the API server sends every
canary under every setting through every engine of the deployment as deployed (every data-parallel rank,
its tensor and pipeline layout, CUDA graphs as configured) and judges the served metric here:

- ``fingerprint`` match (default: the served checkpoint has the profile's fingerprint): each served
  metric within the profile's tolerance of the recorded one, so the unsteered model agrees with the
  analysed one and each setting moves each canary as recorded;
- ``geometry`` match (`--profile-match geometry`: a quantized or fine-tuned variant of the analysed model,
  whose fingerprint differs but whose geometry matches): each served *effect* (setting minus unsteered)
  within the tolerance plus :data:`GEOMETRY_RELATIVE` of the recorded effect.

A failure stops the start, naming the canary, the setting, the recorded and the served figures. What
passes is in the log and on the state endpoint. Canary requests are internal: they carry
``extra_args[CANARY_KEY]`` with the deployment's secret and need no policy exemption a client could use;
no client request may carry the key (:func:`~steer_server.serving.policy.asked_spec`, the request
builders and the EngineCore refuse it).

What a pass proves: on these inputs, this deployment's steering moves the model's answer logits as the
profile recorded, on every engine. What it does not prove: behaviour on other inputs, or after the
weights change (sleep / wake, weight updates: run the check again, `POST` :data:`RERUN_PATH`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from ..profile import CANARY_SETTINGS, Canary, CanarySet

# Under `--profile-match geometry`, a served effect may differ from the recorded one by the tolerance plus
# this share of the recorded effect (the heads must still do the profile's work, not the same digits).
GEOMETRY_RELATIVE = 0.5
# POST: run the canaries again (after the weights changed); under /v1, so that --api-key guards it.
RERUN_PATH = "/v1/modality_steer/canaries"
# Set (in the API server) only while the canary run sends its requests: the request builders let a
# request carry the canary key only then.
INTERNAL_RUN: ContextVar[bool] = ContextVar("modality_steer_canary_run", default=False)


def served_metric(logprobs: dict[int, float], canary: Canary) -> float:
    """The analysis metric from the served first token's logprobs (token id -> log-probability, raw, for
    at least the canary's answer tokens): logsumexp over the instructed answer's first tokens minus
    logsumexp over the competing answer's.

    Raises:
        KeyError: an answer token the server did not return.
    """

    def pooled(ids: list[int]) -> float:
        values = [logprobs[i] for i in ids]
        top = max(values)
        return top + math.log(sum(math.exp(v - top) for v in values))

    return pooled(canary.instructed_token_ids) - pooled(canary.competing_token_ids)


@dataclass(frozen=True)
class CanaryCheck:
    """One canary under one setting on one engine: what was recorded, what was served, and the verdict."""

    rank: int
    canary: str
    setting: str
    recorded: float
    served: float
    compared: str  # "metric" or "effect"
    difference: float
    allowed: float

    @property
    def ok(self) -> bool:
        return self.difference <= self.allowed

    def describe(self) -> str:
        return (
            f"canary {self.canary} ({self.setting}, data-parallel rank {self.rank}): recorded {self.compared} "
            f"{self.recorded:+.3f}, served {self.served:+.3f} (off by {self.difference:.3f}, allowed "
            f"{self.allowed:.3f})"
        )


def judge(canaries: CanarySet, served: dict[tuple[int, str, str], float], match: str) -> list[CanaryCheck]:
    """Every check of a run: `served` maps (data-parallel rank, canary id, setting) to the served metric.

    Raises:
        KeyError: a (rank, canary, setting) the run did not serve.
    """
    ranks = sorted({rank for rank, _, _ in served})
    checks = []
    for rank in ranks:
        for canary in canaries.samples:
            off_recorded, off_served = canary.recorded["off"], served[(rank, canary.id, "off")]
            for setting in CANARY_SETTINGS:
                if match == "geometry":
                    if setting == "off":
                        continue  # another checkpoint: its unsteered figures may differ
                    recorded = canary.recorded[setting] - off_recorded
                    value = served[(rank, canary.id, setting)] - off_served
                    allowed = canaries.tolerance + GEOMETRY_RELATIVE * abs(recorded)
                    compared = "effect"
                else:
                    recorded, value = canary.recorded[setting], served[(rank, canary.id, setting)]
                    allowed, compared = canaries.tolerance, "metric"
                checks.append(
                    CanaryCheck(
                        rank, canary.id, setting, recorded, value, compared, abs(value - recorded), allowed
                    )
                )
    return checks


@dataclass
class CanaryReport:
    """The outcome of a canary run: "passed", "failed" or "skipped" (`--canaries off`), with its checks."""

    status: str
    match: str
    checks: list[CanaryCheck] = field(default_factory=list)
    seconds: float = 0.0
    finished_at: float = field(default_factory=time.time)
    reason: str = ""

    @classmethod
    def of(cls, checks: list[CanaryCheck], match: str, seconds: float) -> CanaryReport:
        return cls("passed" if checks and all(c.ok for c in checks) else "failed", match, checks, seconds)

    def failures(self) -> list[CanaryCheck]:
        return [c for c in self.checks if not c.ok]

    def message(self) -> str:
        """One line for the log (passed), or the failures, worst first (failed)."""
        if self.status == "skipped":
            return f"modality-steer: canary checks skipped ({self.reason}); steering is served unverified"
        if self.status == "passed":
            worst = max(self.checks, key=lambda c: c.difference / c.allowed)
            return (
                f"modality-steer: canaries passed ({len(self.checks)} checks, {self.match} match, "
                f"{self.seconds:.1f} s); closest to its limit: {worst.describe()}"
            )
        failures = sorted(self.failures(), key=lambda c: -c.difference / c.allowed)
        lines = [c.describe() for c in failures[:6]]
        more = f" (and {len(failures) - 6} more)" if len(failures) > 6 else ""
        return (
            f"modality-steer: steering does not do what the profile records ({len(failures)} of "
            f"{len(self.checks)} canary checks failed{more}, {self.match} match); refusing to serve:\n  "
            + "\n  ".join(lines)
            + (f"\n  {self.reason}" if self.reason else "")
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (the state endpoint)."""
        return {
            "status": self.status,
            "match": self.match,
            "checks": len(self.checks),
            "failed": [c.describe() for c in self.failures()],
            "seconds": round(self.seconds, 2),
            "finished_at": self.finished_at,
            "reason": self.reason,
        }


_LAST: list[CanaryReport] = []
# Called with each recorded report (the API server's metrics, `steer_server.serving.api`).
_LISTENERS: list[Callable[[CanaryReport], None]] = []
# Every status a report can have, and "pending" before the first run.
STATUSES = ("pending", "passed", "failed", "skipped")


def record(report: CanaryReport) -> None:
    """Keep `report` as this process's latest canary outcome and tell the listeners."""
    _LAST[:] = [report]
    for listener in _LISTENERS:
        listener(report)


def on_record(listener: Callable[[CanaryReport], None]) -> None:
    """Call `listener` with every report :func:`record` keeps from now on."""
    _LISTENERS.append(listener)


def last_report() -> CanaryReport | None:
    """This process's latest canary outcome (None: no run yet)."""
    return _LAST[0] if _LAST else None


def serving_blocked() -> bool:
    """Whether the latest run failed: requests that reach the engine are then refused (503)."""
    report = last_report()
    return report is not None and report.status == "failed"
