"""The vLLM general plugin (`vllm.general_plugins` → `modality_steer`): the entry point every process of
a deployment runs.

vLLM calls :func:`register` once in every process (API server, EngineCore, each worker;
`vllm/plugins/__init__.py`, `load_general_plugins`). It is idempotent: with no profile configured it
does nothing; with one it checks the deployment's settings and policy and the vLLM version, and installs
the rows of the vLLM adapter (:mod:`.vllm_adapter`) that apply to the installed vLLM: the model runner
(V1 or V2, whichever vLLM runs; :mod:`.worker`), the EngineCore's request construction
(:mod:`.engine_core`), the request builders (:mod:`.frontend`) and the API server (:mod:`.api`).
"""

from __future__ import annotations

from .policy import policy
from .settings import ENTRY_POINT_GROUP, ENTRY_POINT_NAME, entry_point_registered
from .vllm_adapter import hooks

__all__ = ["ENTRY_POINT_GROUP", "ENTRY_POINT_NAME", "entry_point_registered", "register"]

_REGISTERED = False


def register() -> None:
    """vLLM entry point: install the steering hooks when a profile is configured.

    Raises:
        steer_server.serving.settings.SteeringConfigError: the configured profile or policy cannot be used
            (a default a request could not send, `--max-gain` below the profile's default gain), the
            installed vLLM is outside the supported range, or a symbol the adapter hooks is missing; the
            process stops before anything is served.
    """
    global _REGISTERED
    if _REGISTERED or policy() is None:
        return
    hooks.install()
    _REGISTERED = True
