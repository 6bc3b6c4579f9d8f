"""What runs in the EngineCore: prefix-cache isolation between differently steered requests.

Steering changes the KV of every later layer, so steered and unsteered requests must never share cached
blocks. The digest of a request's effective gains is folded into its `cache_salt` where the EngineCore
first builds the request (`vllm/v1/request.py`, `Request.from_engine_core_request`): identical steering
still shares blocks, different steering does not.
"""

from __future__ import annotations

from typing import Any

from ..spec import SpecError, gains_digest
from .settings import EXTRA_ARGS_KEY, settings


def steering_salt(existing: str | None, digest: str) -> str:
    """Fold the steering digest into a request's cache salt (<= 128 chars, no '@', '/', '\\' or NUL)."""
    salt = f"{existing}.ms{digest}" if existing else f"ms{digest}"
    if len(salt) > 128:
        raise SpecError("cache_salt is too long to carry the steering digest (128 characters at most)")
    return salt


def patch_engine_core_request() -> None:
    """Wrap `Request.from_engine_core_request` (idempotent)."""
    from vllm.v1.request import Request

    original = Request.from_engine_core_request.__func__  # type: ignore[attr-defined]
    if getattr(original, "_modality_steer", False):
        return

    def from_engine_core_request(cls: Any, request: Any, block_hasher: Any) -> Any:
        plugin = settings()
        params = request.sampling_params
        extra = (getattr(params, "extra_args", None) or {}) if params is not None else {}
        if plugin is not None and EXTRA_ARGS_KEY in extra:
            gains = plugin.gains_for(extra[EXTRA_ARGS_KEY])
            if gains:
                request.cache_salt = steering_salt(request.cache_salt, gains_digest(gains))
        return original(cls, request, block_hasher)

    from_engine_core_request._modality_steer = True  # type: ignore[attr-defined]
    Request.from_engine_core_request = classmethod(from_engine_core_request)  # type: ignore[method-assign,assignment]
