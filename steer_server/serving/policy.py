"""The deployment's steering policy: which spec a request runs with (`--default-steer` when it asks for
none, `--enforce-steer` overriding everything and refusing anything else), and the request body vLLM
receives (the canonical spec in `vllm_xargs`, the instruction sentence injected where the data layout
puts it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache
from typing import Any

from ..data.prompts import INSTRUCTIONS, insert_instruction
from ..spec import OFF, SpecError, SteerSpec, effective_gains, gains_digest, parse_spec
from .settings import (
    CANARY_KEY,
    DEFAULT_STEER_ENV,
    ENFORCE_STEER_ENV,
    EXTRA_ARGS_KEY,
    INJECT_INSTRUCTION_ENV,
    INSTRUCTION_ENV,
    PluginSettings,
    SteeringConfigError,
    settings,
)


class PolicyError(Exception):
    """A request the deployment refuses: status 400 (malformed) or 403 (against policy); `reason` labels
    the refusal in metrics ("invalid", "policy", "route")."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Policy:
    """The deployment's rules, the one steering contract every process applies (the API server's
    middleware and request hooks, the EngineCore, offline and batch entry points): the spec of a request
    without one (`--default-steer`), the spec every request must run with (`--enforce-steer`), and
    whether and which instruction sentences the API server injects."""

    plugin: PluginSettings
    default: SteerSpec
    enforce: SteerSpec | None
    inject_instruction: bool
    instructions: dict[str, str]

    @classmethod
    def from_environment(cls, plugin: PluginSettings) -> Policy:
        """The policy the environment configures (set by `modality-steer serve`). A default must be one a
        request could send on this server (raw heads only with `--allow-raw-heads`, gains within
        `--max-gain`); an enforced spec must be 'image' or 'text', at most `--max-gain`.

        Raises:
            SteeringConfigError: a default or enforced spec that a request could not send.
        """

        def spec(env: str) -> SteerSpec | None:
            raw = os.environ.get(env)
            if not raw:
                return None
            try:
                return parse_spec(
                    raw,
                    geometry=plugin.geometry,
                    max_gain=plugin.max_gain,
                    allow_raw_heads=plugin.allow_raw_heads,
                )
            except SpecError as exc:
                raise SteeringConfigError(
                    f"modality-steer: {env}={raw!r} is not a spec a request could send on this server: {exc}"
                ) from exc

        enforce = spec(ENFORCE_STEER_ENV)
        if enforce is not None and enforce.mode not in ("image", "text"):
            raise SteeringConfigError(f"modality-steer: {ENFORCE_STEER_ENV} must be 'image' or 'text'")
        return cls(
            plugin=plugin,
            default=spec(DEFAULT_STEER_ENV) or OFF,
            enforce=enforce,
            inject_instruction=os.environ.get(INJECT_INSTRUCTION_ENV, "0") == "1",
            instructions={
                mode: os.environ.get(env) or INSTRUCTIONS[mode] for mode, env in INSTRUCTION_ENV.items()
            },
        )

    @property
    def constrains_unmarked_requests(self) -> bool:
        """Whether a request that says nothing about steering is steered (a default or an enforcement)."""
        return self.enforce is not None or self.default.mode != "off"

    def parse(self, value: Any, *, allow_raw_heads: bool | None = None) -> SteerSpec:
        """Parse a request's value under the deployment's limits.

        Raises:
            PolicyError: status 400 with the parser's message.
        """
        allow = self.plugin.allow_raw_heads if allow_raw_heads is None else allow_raw_heads
        try:
            return parse_spec(
                value, geometry=self.plugin.geometry, max_gain=self.plugin.max_gain, allow_raw_heads=allow
            )
        except SpecError as exc:
            raise PolicyError(400, "invalid", str(exc)) from exc

    def same_steering(self, a: SteerSpec, b: SteerSpec) -> bool:
        """Whether two specs scale the same heads by the same gains (`"text"` and
        `{"follow": "text", "gain": <default_gain>}` do): equal computation, whatever the form."""
        profile = self.plugin.profile
        return gains_digest(effective_gains(a, profile)) == gains_digest(effective_gains(b, profile))

    def resolve(self, asked: Any | None) -> SteerSpec:
        """The spec a request runs with, given what it asked for (None: nothing).

        Raises:
            PolicyError: 400 for a malformed value; 403 for a well-formed one that steers otherwise than
                the enforced steering (raw heads included).
        """
        if self.enforce is None:
            return self.parse(asked) if asked is not None else self.default
        if asked is None:
            return self.enforce
        requested = self.parse(asked, allow_raw_heads=True)
        if not self.same_steering(requested, self.enforce):
            raise PolicyError(
                403,
                "policy",
                f"this deployment enforces modality_steer={self.enforce.to_wire()!r}; the request asked for "
                f"{requested.to_wire()!r}",
            )
        return self.enforce

    def refuse_pooling(self) -> None:
        """Pooling requests carry no sampling parameters and cannot be steered.

        Raises:
            PolicyError: 403 while the deployment steers requests that ask for nothing.
        """
        if self.constrains_unmarked_requests:
            raise PolicyError(
                403, "policy", "this deployment steers every request; pooling requests cannot be steered"
            )


def asked_spec(payload: dict[str, Any]) -> Any | None:
    """What a request body asks for: top-level `modality_steer` or `vllm_xargs.modality_steer` (None:
    neither).

    Raises:
        PolicyError: 400 when given twice, when `vllm_xargs` is not an object, when the `vllm_xargs`
            value is not a string, or when the request carries the internal canary key.
    """
    top_level = payload.get(EXTRA_ARGS_KEY)
    xargs = payload.get("vllm_xargs")
    if xargs is not None and not isinstance(xargs, dict):
        raise PolicyError(400, "invalid", "vllm_xargs must be an object")
    if CANARY_KEY in payload or CANARY_KEY in (xargs or {}):
        raise PolicyError(
            400, "invalid", f"{CANARY_KEY} is internal to the deployment; no request may carry it"
        )
    in_xargs = (xargs or {}).get(EXTRA_ARGS_KEY)
    if top_level is not None and in_xargs is not None:
        raise PolicyError(400, "invalid", "give modality_steer once: top level or vllm_xargs, not both")
    if in_xargs is not None and not isinstance(in_xargs, str):
        raise PolicyError(400, "invalid", "vllm_xargs.modality_steer must be a string (JSON for objects)")
    return top_level if top_level is not None else in_xargs


@cache
def policy() -> Policy | None:
    """This process's policy from the environment (read once); None when no profile is configured.

    Raises:
        SteeringConfigError: see :meth:`Policy.from_environment` and
            :func:`~steer_server.serving.settings.settings`.
    """
    plugin = settings()
    return None if plugin is None else Policy.from_environment(plugin)


def rewrite(payload: dict[str, Any], spec: SteerSpec, policy: Policy) -> dict[str, Any]:
    """The body vLLM receives: no top-level field, the canonical spec (also "off": the engine then does
    not apply a default to it) in vllm_xargs, maybe the instruction."""
    body = {k: v for k, v in payload.items() if k != EXTRA_ARGS_KEY}
    xargs = {k: v for k, v in (body.get("vllm_xargs") or {}).items() if k != EXTRA_ARGS_KEY}
    xargs[EXTRA_ARGS_KEY] = spec.to_wire()
    body["vllm_xargs"] = xargs
    if policy.inject_instruction and spec.mode in ("image", "text"):
        _inject(body, policy.instructions[spec.mode])
    return body


def _inject(body: dict[str, Any], sentence: str) -> None:
    """Add the instruction to the last user message (chat) or to each prompt (completions), where the
    data layout puts it (:func:`~steer_server.data.prompts.insert_instruction`): in a message with
    content parts, into its first text part, after the image parts."""
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in reversed(messages):
            if isinstance(message, dict) and message.get("role") == "user":
                content = message.get("content")
                if isinstance(content, str):
                    message["content"] = insert_instruction(content, sentence)
                    return
                if isinstance(content, list):
                    for part in content:
                        if (
                            isinstance(part, dict)
                            and part.get("type") == "text"
                            and isinstance(part.get("text"), str)
                        ):
                            part["text"] = insert_instruction(part["text"], sentence)
                            return
                    content.append({"type": "text", "text": sentence})
                    return
        raise PolicyError(
            400, "invalid", "--inject-instruction needs a user message to add the instruction to"
        )
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        body["prompt"] = insert_instruction(prompt, sentence)
    elif isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
        body["prompt"] = [insert_instruction(p, sentence) for p in prompt]
    else:
        raise PolicyError(400, "invalid", "--inject-instruction works on text prompts only")
