"""What runs in the EngineCore: the boundary every request crosses, whatever route, frontend or entry
point it came through.

Where the EngineCore first builds a request (`vllm/v1/request.py`, `Request.from_engine_core_request`,
called from `EngineCore.preprocess_add_request` in `vllm/v1/engine/core.py`; wrapped by
:mod:`.vllm_adapter`, which calls :func:`steer_engine_request`), its steering is decided
under the deployment's :class:`~steer_server.serving.policy.Policy` (the same validation as the API,
`--default-steer` when it asks for nothing, `--enforce-steer` overriding, anything else refused) and the
decided spec is written back, canonical, into `SamplingParams.extra_args`, which the workers read. A
refusal raises here, in the EngineCore's input thread, where vLLM fails that one request
(`FinishReason.ERROR`) and keeps serving the others.

Prefix caching: steering changes the KV of every later layer, so the cache salt of every request
(unsteered ones included) is derived from the digest of its effective gains and a hash of the client's
salt: identical steering with an identical client salt shares blocks, anything else cannot, whatever
salt a client sends. Prompt block hashes computed before the EngineCore (vLLM 0.34's
`EngineCoreRequest.block_hashes`, which fold in the client's salt) are never trusted: the adapter drops
them so that the engine hashes the blocks again under the steering-derived salt.
"""

from __future__ import annotations

import hashlib
from typing import Any

from ..spec import effective_gains, gains_digest
from .kv_transfer import KV_PARAMS_ARG, KVFacts, check_kv_origin
from .policy import Policy, PolicyError
from .settings import CANARY_KEY, EXTRA_ARGS_KEY


def steering_salt(client_salt: str | None, gains: dict[tuple[int, int], float]) -> str:
    """The prefix-cache salt of a request: ``ms<gains digest>`` and, when the client sent a salt,
    ``.<32 hex of its SHA-256>``. At most 51 characters of ``[0-9a-z.]``, so always within vLLM's limits
    (128 characters, no '@', '/', '\\' or NUL); a client salt can never equal or extend another
    steering's salt, since it is hashed, not copied."""
    salt = f"ms{gains_digest(gains)}"
    if client_salt:
        salt += "." + hashlib.sha256(client_salt.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return salt


def steer_engine_request(request: Any, contract: Policy, kv: KVFacts | None = None) -> None:
    """Decide an `EngineCoreRequest`'s steering under `contract`: write the canonical spec into its
    sampling params' `extra_args` and derive its cache salt; when the engine has a KV connector (`kv`),
    refuse a request whose KV would come from an instance that did not steer it the same way
    (:func:`~steer_server.serving.kv_transfer.check_kv_origin`).

    Raises:
        PolicyError: the request's spec is malformed (400) or against the policy (403); a pooling request
            when the deployment steers requests that ask for nothing (it cannot be steered); a canary key
            that is not the deployment's secret (400); KV from another deployment or steering (400, 409).
    """
    params = request.sampling_params
    canary = False
    if params is None:
        contract.refuse_pooling()
        gains: dict[tuple[int, int], float] = {}
    else:
        extra = dict(params.extra_args or {})
        canary = CANARY_KEY in extra
        if canary:
            # The deployment's own canary: the spec it names, under the settings' limits, not the policy.
            if not contract.plugin.is_canary_token(extra.pop(CANARY_KEY)):
                raise PolicyError(400, "invalid", f"{CANARY_KEY} is internal to the deployment")
            spec = contract.parse(extra.get(EXTRA_ARGS_KEY))
        else:
            spec = contract.resolve(extra.get(EXTRA_ARGS_KEY))
        extra[EXTRA_ARGS_KEY] = spec.to_wire()
        params.extra_args = extra
        gains = effective_gains(spec, contract.plugin.profile)
    request.cache_salt = steering_salt(request.cache_salt, gains)
    if kv is not None and kv.connector is not None and not canary and not request.abort_immediately:
        # The deployment's own canaries compute their KV here (they never name remote KV); a request to
        # abort at once (vLLM's clean-up after a refused decode request, which frees the prefill side's
        # blocks) computes nothing.
        kv_params = (params.extra_args or {}).get(KV_PARAMS_ARG) if params is not None else None
        check_kv_origin(kv_params, kv, contract, request.cache_salt)
