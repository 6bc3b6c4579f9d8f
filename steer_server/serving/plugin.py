"""The vLLM general plugin (`vllm.general_plugins` → `modality_steer`): the entry point every process of
a deployment runs.

vLLM calls :func:`register` once in every process (API server, EngineCore, each worker;
`vllm/plugins/__init__.py`, `load_general_plugins`). It is idempotent: with no profile configured it
does nothing; with one it checks the deployment's settings and policy, and wraps the model
runner (:mod:`.worker`), the EngineCore's request construction (:mod:`.engine_core`), the request
builders (:mod:`.frontend`) and the API server (:mod:`.api`).
"""

from __future__ import annotations

from .api import patch_api_server
from .engine_core import patch_engine_core_request
from .frontend import patch_request_builders
from .policy import policy
from .settings import forward_to_ray_workers
from .worker import patch_model_runner, select_v1_runner

ENTRY_POINT_GROUP = "vllm.general_plugins"
ENTRY_POINT_NAME = "modality_steer"

_REGISTERED = False


def register() -> None:
    """vLLM entry point: install the steering hooks when a profile is configured.

    Raises:
        steer_server.serving.settings.SteeringConfigError: the configured profile or policy cannot be used
            (a default a request could not send, `--max-gain` below the profile's default gain), or the
            V2 model runner was asked for; the process stops before anything is served.
    """
    global _REGISTERED
    if _REGISTERED or policy() is None:
        return
    select_v1_runner()
    forward_to_ray_workers()
    patch_model_runner()
    patch_engine_core_request()
    patch_request_builders()
    patch_api_server()
    _REGISTERED = True


def entry_point_registered() -> bool:
    """Whether the installed distribution exposes the entry point vLLM looks for."""
    from importlib.metadata import entry_points

    return any(ep.name == ENTRY_POINT_NAME for ep in entry_points(group=ENTRY_POINT_GROUP))
