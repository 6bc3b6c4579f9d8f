"""vLLM general-plugin entry point (`vllm.general_plugins` → `modality_steer`).

vLLM calls :func:`register` once per process (API server, EngineCore, every worker); it must be cheap
and idempotent. With no profile configured the plugin does nothing. The per-request head-steering path
is not part of this release yet, so a configured profile stops the process instead of letting vLLM
serve requests unsteered.
"""

from __future__ import annotations

import os

PROFILE_ENV = "MODALITY_STEER_PROFILE"
ENTRY_POINT_GROUP = "vllm.general_plugins"
ENTRY_POINT_NAME = "modality_steer"


class SteeringUnavailableError(RuntimeError):
    """Steering was asked for but cannot be applied: never serve unsteered in its place."""


def register() -> None:
    profile = os.environ.get(PROFILE_ENV)
    if profile:
        raise SteeringUnavailableError(
            f"{PROFILE_ENV}={profile} asks for head steering, but this modality-steer build has no serving "
            "path yet; refusing to start rather than serve unsteered. Unset the variable to run plain vLLM."
        )


def entry_point_registered() -> bool:
    """Whether the installed distribution exposes the entry point vLLM looks for."""
    from importlib.metadata import entry_points

    return any(ep.name == ENTRY_POINT_NAME for ep in entry_points(group=ENTRY_POINT_GROUP))
