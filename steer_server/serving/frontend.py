"""What runs where vLLM builds requests for the engine: the API server, an offline `vllm.LLM`, and
`vllm run-batch` (each loads general plugins in its own process).

Two hooks (installed by :mod:`.vllm_adapter`, which calls the functions here) apply the steering contract before a request leaves for the EngineCore, so that a refusal is
a 4xx (or an exception for offline callers) rather than the EngineCore's per-request error (a 500):

- the OpenAI protocol models' `to_sampling_params` / `to_beam_search_params` (chat, completions,
  responses, transcription, translation; `vllm/entrypoints/openai/*/protocol.py`): a top-level
  `modality_steer` is moved into `vllm_xargs` (vLLM would drop it silently), and beam search, which
  builds fresh sampling parameters for every step without `extra_args`
  (`vllm/entrypoints/generate/beam_search/online.py`), is refused unless the request runs with exactly
  the steering the deployment gives a request that asks for nothing;
- `InputProcessor.process_inputs` (`vllm/v1/engine/input_processor.py`), which every route and entry
  point calls: the spec is resolved under the policy and written, canonical, into the request it
  returns.

The EngineCore decides again (:mod:`.engine_core`): these hooks give a better answer, not the guarantee.
"""

from __future__ import annotations

from typing import Any

from .canary import INTERNAL_RUN
from .policy import Policy, PolicyError, asked_spec
from .settings import CANARY_KEY, EXTRA_ARGS_KEY


def absorb_top_level(request: Any) -> Any:
    """Move a top-level `modality_steer` of an OpenAI protocol request (an extra field vLLM keeps in
    `model_extra`) into its `vllm_xargs` as a string; return what the request asks for (None: nothing).

    Raises:
        PolicyError: the request carries a malformed value, or one in both places (400).
    """
    import json

    extra = request.model_extra or {}
    asked = asked_spec({EXTRA_ARGS_KEY: extra.get(EXTRA_ARGS_KEY), "vllm_xargs": request.vllm_xargs})
    if EXTRA_ARGS_KEY in extra:
        value = extra.pop(EXTRA_ARGS_KEY)
        if value is not None:
            wire = value if isinstance(value, str) else json.dumps(value)
            request.vllm_xargs = {**(request.vllm_xargs or {}), EXTRA_ARGS_KEY: wire}
    return asked


def check_beam_search(request: Any, contract: Policy) -> None:
    """Beam search builds fresh sampling parameters for every step without `extra_args`
    (`vllm/entrypoints/generate/beam_search/online.py`): it runs only with exactly the steering the
    deployment gives a request that asks for nothing.

    Raises:
        PolicyError: the request asks for other steering (400), or its spec is malformed or refused.
    """
    spec = contract.resolve(absorb_top_level(request))
    if not contract.same_steering(spec, contract.resolve(None)):
        raise PolicyError(
            400,
            "invalid",
            "beam search builds new sampling parameters for every step and cannot carry a "
            f"request's steering; on this server it runs with modality_steer="
            f"{contract.resolve(None).to_wire()!r} only",
        )


def decided_extra_args(contract: Policy, extra_args: Any, *, pooling: bool) -> dict[str, Any] | None:
    """The `extra_args` a request leaves the input processor with: its spec resolved under the policy and
    written canonical (None for a pooling request, which carries no sampling parameters).

    Raises:
        PolicyError: the spec is malformed or refused; a pooling request while the policy steers requests
            that ask for nothing; the internal canary key outside the deployment's canary run.
    """
    if pooling:
        contract.refuse_pooling()
        return None
    extra = dict(extra_args or {})
    if CANARY_KEY in extra:
        # Only the deployment's own canary run (`steer_server.serving.canary`) sends it; the EngineCore
        # checks its secret.
        if not INTERNAL_RUN.get():
            raise PolicyError(
                400, "invalid", f"{CANARY_KEY} is internal to the deployment; no request may carry it"
            )
        return {**extra, EXTRA_ARGS_KEY: contract.parse(extra.get(EXTRA_ARGS_KEY)).to_wire()}
    return {**extra, EXTRA_ARGS_KEY: contract.resolve(extra.get(EXTRA_ARGS_KEY)).to_wire()}
