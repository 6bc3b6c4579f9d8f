"""The deployment's steering settings, shared by every process of a vLLM deployment (API server,
EngineCore, workers): read from the environment, which `modality-steer serve` sets and every process
vLLM spawns inherits.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from ..geometry import ModelGeometry
from ..profile import Profile, ProfileError, load_profile
from ..spec import DEFAULT_MAX_GAIN, effective_gains, parse_spec

PROFILE_ENV = "MODALITY_STEER_PROFILE"
MAX_GAIN_ENV = "MODALITY_STEER_MAX_GAIN"
ALLOW_RAW_HEADS_ENV = "MODALITY_STEER_ALLOW_RAW_HEADS"
DEFAULT_STEER_ENV = "MODALITY_STEER_DEFAULT"
ENFORCE_STEER_ENV = "MODALITY_STEER_ENFORCE"
INJECT_INSTRUCTION_ENV = "MODALITY_STEER_INJECT_INSTRUCTION"
# --canaries on|auto|off (default on): check before serving that steering does what the profile records
# (auto: when the profile has canaries; a profile without is served unverified, and the state says so).
CANARIES_ENV = "MODALITY_STEER_CANARIES"
# --profile-match fingerprint|geometry (default fingerprint): which checkpoints a profile applies to.
PROFILE_MATCH_ENV = "MODALITY_STEER_PROFILE_MATCH"
PROFILE_MATCHES = ("fingerprint", "geometry")
# The deployment's secret that marks its own canary requests (set by the plugin in the first process that
# loads it when not given; every process vLLM spawns inherits it).
CANARY_SECRET_ENV = "MODALITY_STEER_CANARY_SECRET"
# The sentences --inject-instruction adds (default: the paper's wording, data.prompts.INSTRUCTIONS).
INSTRUCTION_ENV = {"image": "MODALITY_STEER_INSTRUCTION_IMAGE", "text": "MODALITY_STEER_INSTRUCTION_TEXT"}
# Where a request's canonical spec travels from the API server to the engine and the workers:
# `SamplingParams.extra_args[EXTRA_ARGS_KEY]` (vLLM fills extra_args from `vllm_xargs`).
EXTRA_ARGS_KEY = "modality_steer"
# Marks the deployment's own canary requests (`steer_server.serving.canary`); no client request may carry it.
CANARY_KEY = "modality_steer_canary"
# The worker method the API server's state endpoint calls through `collective_rpc`.
WORKER_STATE_METHOD = "modality_steer_state"


# The module that runs vLLM's own command line (`python -m <it> serve MODEL ...`), where the `vllm` script
# of the CPU wheel cannot (the launcher and the CLI run it as a process, by name).
VLLM_CLI_MODULE = "steer_server.serving.vllm_adapter.cli"
# The vLLM general plugin's entry point (pyproject.toml); vLLM loads it in every process.
ENTRY_POINT_GROUP = "vllm.general_plugins"
ENTRY_POINT_NAME = "modality_steer"


def entry_point_registered() -> bool:
    """Whether the installed distribution exposes the entry point vLLM looks for."""
    from importlib.metadata import entry_points

    return any(ep.name == ENTRY_POINT_NAME for ep in entry_points(group=ENTRY_POINT_GROUP))


# Every setting above starts with this prefix (vLLM's Ray executor is told to copy them to its workers:
# `vllm_adapter.hooks.forward_to_ray_workers`).
SETTINGS_ENV_PREFIX = "MODALITY_STEER_"


class SteeringConfigError(RuntimeError):
    """The deployment cannot steer as configured; the engine must not start (never serve unsteered)."""


@dataclass(frozen=True)
class PluginSettings:
    """The profile a deployment applies and the limits on requests (`--max-gain`, `--allow-raw-heads`)."""

    profile_path: Path
    profile: Profile
    max_gain: float
    allow_raw_heads: bool
    canaries: bool = True
    profile_match: str = "fingerprint"

    @property
    def geometry(self) -> ModelGeometry:
        """The profiled model's geometry."""
        return self.profile.model

    @property
    def settings_id(self) -> str:
        """Names these settings (profile, `--max-gain`, `--allow-raw-heads`): every process of a deployment
        must report the same one, or a worker could refuse a spec its EngineCore accepted."""
        return (
            f"{self.profile.profile_id}:{self.max_gain!r}:{int(self.allow_raw_heads)}:"
            f"{int(self.canaries)}:{self.profile_match}"
        )

    def is_canary_token(self, value: object) -> bool:
        """Whether `value` is this deployment's canary secret (compared in constant time)."""
        import hmac

        secret = os.environ.get(CANARY_SECRET_ENV, "")
        return (
            bool(secret)
            and isinstance(value, str)
            and hmac.compare_digest(
                value.encode("utf-8", "surrogatepass"), secret.encode("utf-8", "surrogatepass")
            )
        )

    @staticmethod
    def canary_secret_digest() -> str:
        """12 hex digits of SHA-256 of this process's canary secret ("" when none): the handshake compares
        them, so that engines started elsewhere (headless, other nodes) with another secret are named."""
        import hashlib

        secret = os.environ.get(CANARY_SECRET_ENV, "")
        return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()[:12] if secret else ""

    def gains_for(self, spec_text: str | None) -> dict[tuple[int, int], float]:
        """Effective gains of a request's canonical spec (as the EngineCore decided it; None: unsteered).

        Raises:
            steer_server.spec.SpecError: the spec is invalid under these settings.
        """
        if spec_text is None:
            return {}
        spec = parse_spec(
            spec_text, geometry=self.geometry, max_gain=self.max_gain, allow_raw_heads=self.allow_raw_heads
        )
        return effective_gains(spec, self.profile)


@cache
def settings() -> PluginSettings | None:
    """The deployment's settings from the environment, read once per process; None when no profile is
    configured.

    Raises:
        SteeringConfigError: the profile cannot be used, MODALITY_STEER_MAX_GAIN is not a finite number
            >= 0, or it is below the profile's `default_gain`; the profile has no canaries while the
            canary check is on; a bad --canaries or --profile-match.
    """
    path = os.environ.get(PROFILE_ENV)
    if not path:
        return None
    try:
        profile = load_profile(path)
    except ProfileError as exc:
        raise SteeringConfigError(f"modality-steer: cannot use the profile: {exc}") from exc
    try:
        max_gain = float(os.environ.get(MAX_GAIN_ENV, DEFAULT_MAX_GAIN))
    except ValueError as exc:
        raise SteeringConfigError(f"{MAX_GAIN_ENV} must be a number") from exc
    if not 0 <= max_gain < math.inf:
        raise SteeringConfigError(f"{MAX_GAIN_ENV} must be a finite number >= 0, got {max_gain}")
    if profile.default_gain > max_gain:
        # A bare "image" / "text" request runs at the profile's default gain; a server whose limit is
        # below it would either break its own limit or refuse its simplest requests.
        raise SteeringConfigError(
            f"modality-steer: --max-gain {max_gain:g} is below the profile's default_gain "
            f"{profile.default_gain:g} ({path}): a bare 'image' or 'text' request would exceed it; raise "
            "--max-gain or use a profile with a smaller default_gain"
        )
    canaries = os.environ.get(CANARIES_ENV, "on")
    match = os.environ.get(PROFILE_MATCH_ENV, "fingerprint")
    if canaries not in ("on", "auto", "off"):
        raise SteeringConfigError(
            f"{CANARIES_ENV} (--canaries) must be 'on', 'auto' or 'off', got {canaries!r}"
        )
    if match not in PROFILE_MATCHES:
        raise SteeringConfigError(
            f"{PROFILE_MATCH_ENV} (--profile-match) must be one of {', '.join(PROFILE_MATCHES)}, got {match!r}"
        )
    if canaries == "on" and profile.canaries is None:
        why = (profile.model_extra or {}).get("provenance", {}).get("canaries")
        raise SteeringConfigError(
            f"modality-steer: the profile {path} carries no canaries"
            + (f" (the analysis: {why})" if why else "")
            + ", so this deployment cannot check that its steering does what the profile records; re-run "
            "`modality-steer analyze` (it writes them where the profile's gains have a measurable effect), or "
            "serve it unverified with --canaries off"
        )
    checked = canaries == "on" or (canaries == "auto" and profile.canaries is not None)
    if match == "geometry" and not checked:
        raise SteeringConfigError(
            "modality-steer: --profile-match geometry applies a profile to another checkpoint only when its "
            "canaries pass there; it needs --canaries on and a profile with canaries"
        )
    return PluginSettings(
        profile_path=Path(path),
        profile=profile,
        max_gain=max_gain,
        allow_raw_heads=os.environ.get(ALLOW_RAW_HEADS_ENV, "0") == "1",
        canaries=checked,
        profile_match=match,
    )
