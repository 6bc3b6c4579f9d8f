"""What runs where vLLM builds requests for the engine: the API server, an offline `vllm.LLM`, and
`vllm run-batch` (each loads general plugins in its own process).

Two hooks apply the steering contract before a request leaves for the EngineCore, so that a refusal is
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

from http import HTTPStatus
from typing import Any

from .policy import PolicyError, asked_spec, policy
from .settings import EXTRA_ARGS_KEY

# vLLM's request models that build sampling parameters (module, class).
REQUEST_MODELS = (
    ("vllm.entrypoints.openai.chat_completion.protocol", "ChatCompletionRequest"),
    ("vllm.entrypoints.openai.completion.protocol", "CompletionRequest"),
    ("vllm.entrypoints.openai.responses.protocol", "ResponsesRequest"),
    ("vllm.entrypoints.speech_to_text.transcription.protocol", "TranscriptionRequest"),
    ("vllm.entrypoints.speech_to_text.translation.protocol", "TranslationRequest"),
)


def as_vllm_error(exc: PolicyError) -> Exception:
    """The vLLM exception that its servers answer with the refusal's status (`create_error_response` in
    `vllm/entrypoints/serve/exception_handling/error_response.py`): 400 with `param: modality_steer`,
    or 403."""
    from vllm.exceptions import GracefulHTTPError, VLLMValidationError

    if exc.status == 400:
        return VLLMValidationError(f"modality_steer: {exc}", parameter=EXTRA_ARGS_KEY)
    return GracefulHTTPError(f"modality_steer: {exc}", HTTPStatus(exc.status))


def _absorb_top_level(request: Any) -> Any:
    """Move a top-level `modality_steer` (an extra field vLLM keeps in `model_extra`) into `vllm_xargs`
    as a string; return what the request asks for (None: nothing)."""
    import json

    extra = request.model_extra or {}
    try:
        asked = asked_spec({EXTRA_ARGS_KEY: extra.get(EXTRA_ARGS_KEY), "vllm_xargs": request.vllm_xargs})
    except PolicyError as exc:
        raise as_vllm_error(exc) from exc
    if EXTRA_ARGS_KEY in extra:
        value = extra.pop(EXTRA_ARGS_KEY)
        if value is not None:
            wire = value if isinstance(value, str) else json.dumps(value)
            request.vllm_xargs = {**(request.vllm_xargs or {}), EXTRA_ARGS_KEY: wire}
    return asked


def _wrap_to_sampling_params(original: Any) -> Any:
    def to_sampling_params(self: Any, *args: Any, **kwargs: Any) -> Any:
        if policy() is not None:
            _absorb_top_level(self)
        return original(self, *args, **kwargs)

    to_sampling_params._modality_steer = True  # type: ignore[attr-defined]
    return to_sampling_params


def _wrap_to_beam_search_params(original: Any) -> Any:
    def to_beam_search_params(self: Any, *args: Any, **kwargs: Any) -> Any:
        contract = policy()
        if contract is not None:
            asked = _absorb_top_level(self)
            try:
                spec = contract.resolve(asked)
            except PolicyError as exc:
                raise as_vllm_error(exc) from exc
            if not contract.same_steering(spec, contract.resolve(None)):
                raise as_vllm_error(
                    PolicyError(
                        400,
                        "invalid",
                        "beam search builds new sampling parameters for every step and cannot carry a "
                        f"request's steering; on this server it runs with modality_steer="
                        f"{contract.resolve(None).to_wire()!r} only",
                    )
                )
        return original(self, *args, **kwargs)

    to_beam_search_params._modality_steer = True  # type: ignore[attr-defined]
    return to_beam_search_params


def _wrap_process_inputs(original: Any) -> Any:
    def process_inputs(
        self: Any, request_id: Any, prompt: Any, params: Any, *args: Any, **kwargs: Any
    ) -> Any:
        from vllm import SamplingParams

        contract = policy()
        if contract is None:
            return original(self, request_id, prompt, params, *args, **kwargs)
        spec = None
        try:
            if isinstance(params, SamplingParams):
                spec = contract.resolve((params.extra_args or {}).get(EXTRA_ARGS_KEY))
            else:
                contract.refuse_pooling()
        except PolicyError as exc:
            raise as_vllm_error(exc) from exc
        request = original(self, request_id, prompt, params, *args, **kwargs)
        if spec is not None and request.sampling_params is not None:
            # A fresh dict: the caller's params (shared by the choices of n > 1) stay as they were.
            request.sampling_params.extra_args = {
                **(request.sampling_params.extra_args or {}),
                EXTRA_ARGS_KEY: spec.to_wire(),
            }
        return request

    process_inputs._modality_steer = True  # type: ignore[attr-defined]
    process_inputs.__wrapped__ = original  # type: ignore[attr-defined]
    return process_inputs


def patch_request_builders() -> None:
    """Wrap `InputProcessor.process_inputs` and the parameter builders of the request models whose
    modules this process has imported (idempotent; call again once more are imported). Runs before any
    `InputProcessor` exists, since each binds `process_inputs` for its async variant."""
    import sys

    from vllm.v1.engine.input_processor import InputProcessor

    if not getattr(InputProcessor.process_inputs, "_modality_steer", False):
        InputProcessor.process_inputs = _wrap_process_inputs(InputProcessor.process_inputs)  # type: ignore[method-assign]
    for module_name, class_name in REQUEST_MODELS:
        if module_name not in sys.modules:
            continue  # not a process that parses such requests (yet)
        cls = getattr(sys.modules[module_name], class_name)
        for name, wrap in (
            ("to_sampling_params", _wrap_to_sampling_params),
            ("to_beam_search_params", _wrap_to_beam_search_params),
        ):
            method = cls.__dict__.get(name)
            if method is not None and not getattr(method, "_modality_steer", False):
                setattr(cls, name, wrap(method))
