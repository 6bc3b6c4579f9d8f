"""The plugin's hooks in vLLM, one per row of :mod:`.table`: each reads what vLLM built and calls the plain
serving code (:mod:`..worker`, :mod:`..engine_core`, :mod:`..frontend`, :mod:`..api`) with plain values.

Model runners: V1 (`vllm/v1/worker/gpu_model_runner.py`, vLLM 0.32 and 0.33; the only runner of the CPU
wheel) and V2 (`vllm/v1/worker/gpu/model_runner.py`, the GPU default since 0.29 and the only runner from
0.34). The plugin never chooses between them: where vLLM offers both, the user's choice stands.

- V1 reads each request's sampling parameters from `runner.requests` when a step is prepared
  (`_prepare_inputs`, whose `input_batch` is in scheduler order) and forgets requests that left
  `runner.requests` (`_update_states`).
- V2 sees sampling parameters only in `add_requests` (new requests, requests resumed after preemption and
  streaming re-adds all come through it), removes requests through `_remove_request` (finished,
  preempted, re-added), and runs the `InputBatch` that `prepare_inputs` returns, ordered decode-first
  (`sort_batch_req_ids`), not in scheduler order: the map follows its `req_ids` and `query_start_loc_np`.
- Both deactivate before dummy runs, profiling and (V2) CUDA-graph capture, which does not go through
  `_dummy_run` in V2.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import secrets
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from http import HTTPStatus
from typing import Any

from ..api import ModalitySteerMiddleware, document_parameter, require_armed_workers
from ..canary import INTERNAL_RUN, CanaryReport, judge, record, served_metric
from ..engine_core import steer_engine_request, steering_salt
from ..frontend import absorb_top_level, check_beam_search, decided_extra_args
from ..kv_transfer import (
    ATTESTATION_KEY,
    DEFAULT_OFFLOADING_SPEC,
    KV_PARAMS_ARG,
    MULTI_CONNECTOR_CHILDREN,
    KVFacts,
    attestation,
    check_kv_origin,
    should_attest,
)
from ..policy import PolicyError, policy
from ..settings import (
    CANARY_KEY,
    CANARY_SECRET_ENV,
    EXTRA_ARGS_KEY,
    SETTINGS_ENV_PREFIX,
    WORKER_STATE_METHOD,
    SteeringConfigError,
    settings,
)
from ..worker import (
    EngineFacts,
    WorkerPlace,
    WorkerSteering,
    check_drafter,
    not_armed_message,
)
from . import table
from .table import ROW_BY_KEY, ROWS, SUPPORTED_VLLM, AdapterError, Row, original

logger = logging.getLogger("modality_steer")
# In the API server only vLLM's own loggers reach the log (its logging configuration); a child of "vllm"
# inherits its handler.
server_log = logging.getLogger("vllm.modality_steer")

# Decoder self-attention layers of the language model; vision towers use other module classes/names.
DECODER_ATTENTION = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn\.attn$")
# Where a runner keeps its steering state, and an API server's `InputProcessor` its KV facts.
STATE_ATTRIBUTE = "_modality_steer"
KV_FACTS_ATTRIBUTE = "_modality_steer_kv"
MIDDLEWARE_PATH = f"{ModalitySteerMiddleware.__module__}.{ModalitySteerMiddleware.__name__}"


# --------------------------------------------------------------------------------------------------
# Version gate and installation.
# --------------------------------------------------------------------------------------------------


def installed_vllm_version() -> str:
    """`vllm.__version__` (row ``vllm.version``)."""
    import vllm

    return str(getattr(vllm, "__version__", "unknown"))


def check_version(version: str | None = None) -> str:
    """Refuse a vLLM release outside :data:`~.table.SUPPORTED_VLLM`, by name; return the version.

    Raises:
        SteeringConfigError: the installed (or given) vLLM version is unsupported or unparsable.
    """
    version = installed_vllm_version() if version is None else version
    if not table.version_supported(version):
        raise SteeringConfigError(
            f"modality-steer supports vLLM {SUPPORTED_VLLM} (0.32, 0.33, 0.34), but the installed vLLM is "
            f"{version}; install a supported release, or run without a profile"
        )
    return version


def rows_for(version: str, runner: str | None = None) -> list[Row]:
    """The rows that apply to vLLM `version` (of one runner, when given)."""
    return [r for r in ROWS if r.applies_to(version) and (runner is None or r.runner == runner)]


def install(version: str | None = None) -> None:
    """Install every hook that applies to the installed vLLM (idempotent).

    Raises:
        SteeringConfigError: the vLLM version is unsupported, or a symbol a row needs is missing (named).
    """
    version = check_version(version)
    forward_to_ray_workers()
    # The deployment's canary secret: processes spawned from here on (EngineCores, API servers) inherit it.
    os.environ.setdefault(CANARY_SECRET_ENV, secrets.token_hex(16))
    factories = {
        "engine.from_engine_core_request": _from_engine_core_request,
        "frontend.process_inputs": _process_inputs,
        "kv.scheduler_init": _scheduler_init,
        "kv.connector_finished": _connector_finished,
        "kv.example.get_num_new_matched_tokens": _example_get_num_new_matched_tokens,
        "kv.example.build_connector_meta": _example_build_connector_meta,
        "api.init_entrypoints_middleware": _init_entrypoints_middleware,
        "api.launcher_init_entrypoints_middleware": _init_entrypoints_middleware,
        "api.init_endpoint_plugins_state": _init_endpoint_plugins_state,
        **{f"{prefix}.load_model": _load_model for prefix in ("v1", "v2", "v1.cpu")},
        "v1._prepare_inputs": _v1_prepare_inputs,
        "v1._update_states": _v1_update_states,
        "v1._dummy_run": _deactivate_first,
        "v2.add_requests": _v2_add_requests,
        "v2._remove_request": _v2_remove_request,
        "v2.prepare_inputs": _v2_prepare_inputs,
        "v2.execute_model": _v2_execute_model,
        "v2._dummy_run": _deactivate_first,
        "v2.capture_model": _deactivate_first,
    }
    try:
        for key, factory in factories.items():
            if ROW_BY_KEY[key].applies_to(version):
                table.install(key, factory)
        table.add_attribute("worker.state_method", WORKER_STATE_METHOD, report_worker_state)
    except AdapterError as exc:
        raise SteeringConfigError(
            f"modality-steer: vLLM {version} does not have what the plugin hooks: {exc}"
        ) from exc
    install_request_builders()


def install_request_builders() -> None:
    """Wrap the parameter builders of the request models whose modules this process has imported
    (idempotent; call again once more are imported)."""
    for row in ROWS:
        builder = row.key.startswith("frontend.") and row.name.endswith(
            ("to_sampling_params", "to_beam_search_params")
        )
        if builder and row.module in sys.modules:
            table.install(
                row.key,
                _to_beam_search_params if row.name.endswith("beam_search_params") else _to_sampling_params,
            )


def forward_to_ray_workers() -> None:
    """Have vLLM's Ray executor copy the deployment's settings (every ``MODALITY_STEER_*`` variable) to
    the workers it starts, also on other nodes, by adding the prefix to its list in this process (row
    ``env.ray_prefixes``; the EngineCore loads plugins before it creates its executor). A worker that
    still lacks them cannot report steering armed, and the server refuses to start."""
    variable = ROW_BY_KEY["env.ray_prefixes"].name
    listed = [p.strip() for p in os.environ.get(variable, "").split(",") if p.strip()]
    if SETTINGS_ENV_PREFIX not in listed:
        os.environ[variable] = ",".join([*listed, SETTINGS_ENV_PREFIX])


# --------------------------------------------------------------------------------------------------
# EngineCore and request builders.
# --------------------------------------------------------------------------------------------------


def _from_engine_core_request(key: str) -> Any:
    def from_engine_core_request(cls: Any, request: Any, block_hasher: Any, *args: Any, **kwargs: Any) -> Any:
        contract = policy()
        if contract is not None:
            try:
                steer_engine_request(request, contract, _ENGINE_KV or UNKNOWN_KV)
            except PolicyError as exc:
                logger.warning("modality-steer: refused request %s: %s", request.request_id, exc)
                raise
            # vLLM 0.34: prompt block hashes computed before the EngineCore fold in the client's salt, not
            # the steering-derived one; dropped, the engine hashes the blocks again with the request's salt.
            if args:
                args = (None, *args[1:])
            if "block_hashes" in kwargs:
                kwargs["block_hashes"] = None
            if getattr(request, "block_hashes", None) is not None:
                request.block_hashes = None
        return original(key)(cls, request, block_hasher, *args, **kwargs)

    return from_engine_core_request


def as_vllm_error(exc: PolicyError) -> Exception:
    """The vLLM exception that its servers answer with the refusal's status (`create_error_response` in
    `vllm/entrypoints/serve/exception_handling/error_response.py`): 400 with `param: modality_steer`,
    or 403."""
    from vllm.exceptions import GracefulHTTPError, VLLMValidationError

    if exc.status == 400:
        return VLLMValidationError(f"modality_steer: {exc}", parameter=EXTRA_ARGS_KEY)
    return GracefulHTTPError(f"modality_steer: {exc}", HTTPStatus(exc.status))


def _to_sampling_params(key: str) -> Any:
    def to_sampling_params(self: Any, *args: Any, **kwargs: Any) -> Any:
        if policy() is not None:
            try:
                absorb_top_level(self)
            except PolicyError as exc:
                raise as_vllm_error(exc) from exc
        return original(key)(self, *args, **kwargs)

    return to_sampling_params


def _to_beam_search_params(key: str) -> Any:
    def to_beam_search_params(self: Any, *args: Any, **kwargs: Any) -> Any:
        contract = policy()
        if contract is not None:
            try:
                check_beam_search(self, contract)
            except PolicyError as exc:
                raise as_vllm_error(exc) from exc
        return original(key)(self, *args, **kwargs)

    return to_beam_search_params


def _process_inputs(key: str) -> Any:
    def process_inputs(
        self: Any, request_id: Any, prompt: Any, params: Any, *args: Any, **kwargs: Any
    ) -> Any:
        from vllm.sampling_params import SamplingParams

        contract = policy()
        if contract is None:
            return original(key)(self, request_id, prompt, params, *args, **kwargs)
        sampling = isinstance(params, SamplingParams)
        try:
            extra = decided_extra_args(
                contract, params.extra_args if sampling else None, pooling=not sampling
            )
        except PolicyError as exc:
            raise as_vllm_error(exc) from exc
        request = original(key)(self, request_id, prompt, params, *args, **kwargs)
        if extra is not None and request.sampling_params is not None:
            # A fresh dict: the caller's params (shared by the choices of n > 1) stay as they were.
            request.sampling_params.extra_args = {**(request.sampling_params.extra_args or {}), **extra}
            _check_kv_origin_early(self, request, contract)
        return request

    return process_inputs


# --------------------------------------------------------------------------------------------------
# KV beyond the prefix cache: connectors, offloading, disaggregated prefill (..kv_transfer).
# --------------------------------------------------------------------------------------------------

# This EngineCore's KV transfer configuration, recorded when its scheduler is built (rows ``kv.*``); the
# request hook reads it in the EngineCore's input thread.
_ENGINE_KV: KVFacts | None = None
# What the request hook assumes when no scheduler recorded the facts (a `--scheduler-cls` outside vLLM's
# `Scheduler`): a connector of unknown role, so that a request naming remote KV needs an attestation.
UNKNOWN_KV = KVFacts(connector="unknown")


def kv_facts(config: Any) -> KVFacts:
    """The KV and encoder-cache connectors of a `VllmConfig` (rows ``config.kv_transfer.*``,
    ``config.ec_transfer.*``); `--kv-offloading-size` has become a connector there already."""
    ec = getattr(config, "ec_transfer_config", None)
    ec_connector = getattr(ec, "ec_connector", None) if ec is not None else None
    return _kv_connector_facts(getattr(config, "kv_transfer_config", None), ec_connector)


def _kv_connector_facts(kv: Any, ec_connector: str | None = None) -> KVFacts:
    """A `KVTransferConfig` (or one of `MultiConnector`'s child dicts) as :class:`KVFacts`."""

    def get(name: str) -> Any:
        return kv.get(name) if isinstance(kv, dict) else getattr(kv, name, None)

    connector = get("kv_connector") if kv is not None else None
    if connector is None:
        return KVFacts(ec_connector=ec_connector)
    extra = get("kv_connector_extra_config") or {}
    children = extra.get(MULTI_CONNECTOR_CHILDREN, []) if connector == "MultiConnector" else []
    own = {k: v for k, v in extra.items() if k != MULTI_CONNECTOR_CHILDREN} if children else extra
    offloading: list[str] = []
    if connector == "OffloadingConnector":
        tiers = extra.get("secondary_tiers") or []
        offloading = [str(extra.get("spec_name", DEFAULT_OFFLOADING_SPEC))]
        offloading += [str(tier.get("type")) for tier in tiers if isinstance(tier, dict)]
    return KVFacts(
        connector=str(connector),
        role=get("kv_role"),
        module_path=get("kv_connector_module_path"),
        extra_module_paths=tuple(_module_paths(own)),
        children=tuple(_kv_connector_facts(child) for child in children),
        ec_connector=ec_connector,
        offloading=tuple(offloading),
    )


def _module_paths(value: Any) -> list[str]:
    """Every value of a key ending in ``module_path`` in a connector's extra config, nested included
    (`vllm/v1/kv_offload/factory.py`: `spec_module_path`; `vllm/v1/kv_offload/tiering/factory.py`:
    `module_path`)."""
    found: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            if str(key).endswith("module_path") and item:
                found.append(str(item))
            else:
                found += _module_paths(item)
    elif isinstance(value, list | tuple):
        for item in value:
            found += _module_paths(item)
    return found


def connector_registry() -> dict[str, list[str]]:
    """The names every factory of the installed vLLM registers: KV connectors, encoder-cache connectors,
    offloading specs and secondary tiers (rows ``*.factory.registry``)."""
    return {
        key: sorted(table.resolve(ROW_BY_KEY[f"{key}.factory.registry"])[0]._registry)
        for key in ("kv", "ec", "offloading", "tier")
    }


def _scheduler_init(key: str) -> Any:
    def init(self: Any, vllm_config: Any, *args: Any, **kwargs: Any) -> Any:
        global _ENGINE_KV
        _ENGINE_KV = kv_facts(vllm_config)
        return original(key)(self, vllm_config, *args, **kwargs)

    return init


def _connector_finished(key: str) -> Any:
    def connector_finished(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        delay_free, params = original(key)(self, request, *args, **kwargs)
        contract = policy()
        if contract is None or self.connector is None:
            return delay_free, params
        try:
            if should_attest(params, request.kv_transfer_params, _ENGINE_KV or kv_facts(self.vllm_config)):
                params = {**(params or {}), ATTESTATION_KEY: attestation(contract, request.cache_salt)}
        except Exception:  # never in the engine loop: unattested KV is refused by any consumer
            logger.exception("modality-steer: no KV attestation for request %s", request.request_id)
        return delay_free, params

    return connector_finished


class _SteeringFeature:
    """Stands in, at the end of a request's `mm_features`, for one more multimodal identifier: the
    steering key, which `ExampleConnector` then folds into the name of the KV it stores and loads."""

    __slots__ = ("identifier",)

    def __init__(self, identifier: str) -> None:
        self.identifier = identifier


def steering_key(request: Any) -> str:
    """The key a token-keyed connector stores a request's KV under besides its tokens: the steering salt
    of its decided spec without the client's part, ``modality_steer:ms<gains digest>``. Never raises:
    a request whose steering cannot be read gets a key of its own (its KV is then never shared)."""
    try:
        params = request.sampling_params
        spec = (params.extra_args or {}).get(EXTRA_ARGS_KEY) if params is not None else None
        plugin = settings()
        gains = plugin.gains_for(spec) if plugin is not None else {}
        return f"{ATTESTATION_KEY}:{steering_salt(None, gains)}"
    except Exception:
        logger.exception("modality-steer: request %s: unreadable steering", getattr(request, "req_id", "?"))
        return f"{ATTESTATION_KEY}:unshared:{uuid.uuid4().hex}"


@contextmanager
def keyed_by_steering(requests: Iterable[Any]) -> Iterator[None]:
    """While a token-keyed connector's scheduler side reads `mm_features` (rows ``kv.request.mm_features``,
    ``kv.new_req.mm_features``), each request's list ends with its :func:`steering_key`; restored after,
    so that nothing else (the workers' encoder inputs, the prefix cache) sees it."""
    saved: list[tuple[Any, Any]] = []
    try:
        for request in requests:
            features = request.mm_features
            saved.append((request, features))
            request.mm_features = [*(features or ()), _SteeringFeature(steering_key(request))]
        yield
    finally:
        for request, features in saved:
            request.mm_features = features


def _example_get_num_new_matched_tokens(key: str) -> Any:
    def get_num_new_matched_tokens(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        with keyed_by_steering([request]):
            return original(key)(self, request, *args, **kwargs)

    return get_num_new_matched_tokens


def _example_build_connector_meta(key: str) -> Any:
    def build_connector_meta(self: Any, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        pending = self._requests_need_load.values()  # row kv.example.requests_need_load
        with keyed_by_steering([*scheduler_output.scheduled_new_reqs, *pending]):
            return original(key)(self, scheduler_output, *args, **kwargs)

    return build_connector_meta


def _frontend_kv_facts(processor: Any) -> KVFacts:
    """The API server's KV facts, read from the `InputProcessor`'s config once and kept on it (as the
    runner keeps its steering state), not per request."""
    facts: KVFacts | None = getattr(processor, KV_FACTS_ATTRIBUTE, None)
    if facts is None:
        facts = kv_facts(processor.vllm_config)
        setattr(processor, KV_FACTS_ATTRIBUTE, facts)
    return facts


def _check_kv_origin_early(processor: Any, request: Any, contract: Any) -> None:
    """The EngineCore's KV origin check, made where a refusal still becomes an HTTP status (the
    EngineCore fails a refused request as an internal error): the same steering salt the EngineCore will
    derive (rows ``frontend.vllm_config``, ``engine.request.cache_salt``).

    Raises:
        vllm.exceptions.VLLMValidationError / GracefulHTTPError: 400 or 409, see
            :func:`~steer_server.serving.kv_transfer.check_kv_origin`.
    """
    kv = _frontend_kv_facts(processor)
    extra = request.sampling_params.extra_args or {}
    if kv.connector is None or CANARY_KEY in extra:
        return
    try:
        plugin = contract.plugin
        salt = steering_salt(request.cache_salt, plugin.gains_for(extra.get(EXTRA_ARGS_KEY)))
        check_kv_origin(extra.get(KV_PARAMS_ARG), kv, contract, salt)
    except PolicyError as exc:
        raise as_vllm_error(exc) from exc


# --------------------------------------------------------------------------------------------------
# API server.
# --------------------------------------------------------------------------------------------------


async def worker_states(engine_client: Any) -> list[dict[str, Any]]:
    """Every worker's steering state, of every engine (`call_utility_all_async` reaches each engine of a
    data-parallel deployment; `collective_rpc` only the first, `vllm/v1/engine/core_client.py`)."""
    core = getattr(engine_client, "engine_core", None)
    if core is not None and hasattr(core, "call_utility_all_async"):
        per_engine = await core.call_utility_all_async("collective_rpc", WORKER_STATE_METHOD, None, (), None)
        return [state for engine in per_engine for state in engine]
    return list(await engine_client.collective_rpc(WORKER_STATE_METHOD))


def _init_entrypoints_middleware(key: str) -> Any:
    """vLLM adds `--middleware` entries last, which makes them the outermost: they would run before
    `--api-key` authentication. This installs the middleware first instead (innermost), so an
    unauthenticated request is refused by vLLM before anything here reads it."""

    def init_entrypoints_middleware(args: Any, app: Any, *rest: Any, **kwargs: Any) -> Any:
        args.middleware = [m for m in (getattr(args, "middleware", None) or []) if m != MIDDLEWARE_PATH]
        install_request_builders()
        app.add_middleware(
            ModalitySteerMiddleware,
            worker_states=worker_states,
            authenticate=authenticator(args),
            run_canaries=_rerun_canaries,
        )
        document_parameter(app)
        return original(key)(args, app, *rest, **kwargs)

    return init_entrypoints_middleware


def authenticator(args: Any) -> Any:
    """The server's key check for every route, or None when it runs without keys: the keys vLLM itself
    enforces (`--api-key`, else `VLLM_API_KEY`; `vllm/entrypoints/serve/middleware/register.py`), checked by
    vLLM's own `AuthenticationMiddleware.verify_token` (a Bearer token, compared by SHA-256 digest in
    constant time)."""
    import vllm.envs as envs
    from starlette.datastructures import Headers
    from vllm.entrypoints.serve.middleware.authenticate import AuthenticationMiddleware

    tokens = [
        key
        for key in (getattr(args, "api_key", None) or [getattr(envs, ROW_BY_KEY["env.api_key"].name)])
        if key
    ]
    if not tokens:
        return None
    verifier = AuthenticationMiddleware(app=None, tokens=tokens)  # type: ignore[arg-type]

    def authenticate(scope: Any) -> bool:
        return bool(verifier.verify_token(Headers(scope=scope)))

    return authenticate


async def _rerun_canaries(app_state: Any) -> CanaryReport:
    """`POST /v1/modality_steer/canaries`: the canaries again, through the app's engine."""
    engine_client = getattr(app_state, "engine_client", None)
    if engine_client is None:  # a render-only server: nothing to check
        plugin = settings()
        assert plugin is not None
        return CanaryReport("skipped", plugin.profile_match, reason="no engine on this server")
    return await run_canaries(engine_client, app_state)


def _init_endpoint_plugins_state(key: str) -> Any:
    """The handshake runs where vLLM finishes the app's state, before it serves (`init_app_state` looks
    this name up at call time)."""

    async def init_endpoint_plugins_state(engine_client: Any, *rest: Any, **kwargs: Any) -> Any:
        await require_armed_workers(engine_client, worker_states)
        if engine_client is not None and rest:
            report = await run_canaries(engine_client, rest[0])
            if report.status == "failed":
                raise SteeringConfigError(report.message())
            server_log.warning("%s", report.message())
        return await original(key)(engine_client, *rest, **kwargs)

    return init_endpoint_plugins_state


async def run_canaries(engine_client: Any, app_state: Any) -> CanaryReport:
    """Send every canary of the profile under every setting through every data-parallel engine, as the
    chat route would (vLLM's renderer, then `generate` with one token and the raw logprobs of the answers'
    first tokens), judge the served metrics (:func:`~steer_server.serving.canary.judge`) and keep the
    report for the state endpoint. A request that fails makes the run fail, with its error as the reason.
    """
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.sampling_params import SamplingParams

    from ...profile import CANARY_SETTINGS

    plugin = settings()
    assert plugin is not None
    if not plugin.canaries or plugin.profile.canaries is None:
        reason = (
            "--canaries off" if plugin.profile.canaries is not None else "the profile carries no canaries"
        )
        report = CanaryReport("skipped", plugin.profile_match, reason=reason)
        record(report)
        return report
    canaries = plugin.profile.canaries
    started = time.monotonic()
    parallel = engine_client.vllm_config.parallel_config
    # The engines this API server reaches: with external or hybrid load balancing, its local ones only
    # (`vllm/v1/engine/input_processor.py` refuses other ranks).
    data_parallel = int(
        parallel.data_parallel_size_local
        if getattr(parallel, "local_engines_only", False)
        else parallel.data_parallel_size
    )
    secret = os.environ.get(CANARY_SECRET_ENV, "")
    served: dict[tuple[int, str, str], float] = {}

    async def one(rank: int, canary: Any, engine_input: Any, setting: str, wire: str) -> None:
        params = SamplingParams(
            max_tokens=1,
            temperature=0.0,
            logprob_token_ids=sorted({*canary.instructed_token_ids, *canary.competing_token_ids}),
            extra_args={EXTRA_ARGS_KEY: wire, CANARY_KEY: secret},
        )
        final = None
        async for output in engine_client.generate(
            engine_input,
            params,
            f"modality-steer-canary-{uuid.uuid4().hex}",
            data_parallel_rank=rank if data_parallel > 1 else None,
        ):
            final = output
        assert final is not None and final.outputs[0].logprobs, "no logprobs came back"
        logprobs = {token: entry.logprob for token, entry in final.outputs[0].logprobs[0].items()}
        served[(rank, canary.id, setting)] = served_metric(logprobs, canary)

    token = INTERNAL_RUN.set(True)
    try:
        runs = []
        for canary in canaries.samples:
            rendered = await app_state.online_renderer.render_chat(
                ChatCompletionRequest.model_validate({"messages": canary.messages, "max_tokens": 1})
            )
            if not isinstance(rendered, tuple):
                raise RuntimeError(f"canary {canary.id}: vLLM could not render its messages: {rendered}")
            engine_input = rendered[1][0]
            runs += [
                one(rank, canary, engine_input, setting, wire)
                for rank in range(data_parallel)
                for setting, wire in CANARY_SETTINGS.items()
            ]
        await asyncio.gather(*runs)
        checks = judge(canaries, served, plugin.profile_match)
        report = CanaryReport.of(checks, plugin.profile_match, time.monotonic() - started)
    except Exception as exc:  # a request that failed: the check did not pass
        report = CanaryReport(
            "failed",
            plugin.profile_match,
            seconds=time.monotonic() - started,
            reason=f"a canary request failed: {type(exc).__name__}: {exc}",
        )
    finally:
        INTERNAL_RUN.reset(token)
    record(report)
    return report


# --------------------------------------------------------------------------------------------------
# Workers: arming at load.
# --------------------------------------------------------------------------------------------------


def _class_name(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def runner_kind(runner: Any) -> str | None:
    """ "V1" or "V2" by the classes the runner's type derives from (None: neither)."""
    for kind, module in (("V2", table.V2_RUNNER), ("V1", table.V1_RUNNER)):
        base = getattr(sys.modules.get(module), "GPUModelRunner", None)
        if base is not None and isinstance(runner, base):
            return kind
    return None


def overridden_hooks(runner: Any, kind: str) -> tuple[str, ...]:
    """The hooked methods of runner `kind` that the runner's class overrides past the plugin's wrappers."""
    names = [
        r.name.split(".", 1)[1]
        for r in ROWS
        if r.runner == kind and r.action == "wrap" and r.key.count(".") == 1
    ]
    installed = [n for n in names if table.installed(f"{kind.lower()}.{n}")]
    return tuple(n for n in installed if not getattr(getattr(type(runner), n, None), "_modality_steer", None))


def engine_facts(config: Any, runner: Any | None) -> EngineFacts:
    """What the refusals need, read from vLLM's `VllmConfig` and the runner (rows ``config.*``)."""
    parallel = config.parallel_config
    pass_config = getattr(config.compilation_config, "pass_config", None)
    speculative = getattr(config, "speculative_config", None)
    kind = runner_kind(runner) if runner is not None else None
    return EngineFacts(
        runner=kind or "unknown",
        runner_class=_class_name(runner) if runner is not None else "unknown",
        micro_batching=bool(getattr(parallel, "enable_dbo", False))
        or int(getattr(parallel, "ubatch_size", 0) or 0) > 1,
        mla=bool(getattr(config.model_config, "use_mla", False)),
        fused_attention_quant=bool(getattr(pass_config, "fuse_attn_quant", False)),
        rust_frontend=os.environ.get(ROW_BY_KEY["env.rust_frontend"].name, "0").lower()
        not in ("", "0", "false"),
        adaptive_verification=kind == "V2"
        and bool(getattr(speculative, "enable_adaptive_verification", False)),
        prefill_context_parallel=int(getattr(parallel, "prefill_context_parallel_size", 1) or 1)
        if kind == "V2"
        else 1,
        overridden_hooks=overridden_hooks(runner, kind) if kind is not None else (),
        kv=kv_facts(config),
    )


def decoder_attention_layers(model: Any) -> dict[int, Any]:
    """The language model's decoder attention layers (`Attention` modules named `layers.N.self_attn.attn`)
    by global layer index; vision towers' attention is not an `Attention` (design notes §9)."""
    from vllm.model_executor.layers.attention import Attention

    layers: dict[int, Any] = {}
    for name, module in model.named_modules():
        match = DECODER_ATTENTION.search(name)
        if match and isinstance(module, Attention):
            layers[int(match.group(1))] = module
    return dict(sorted(layers.items()))


def worker_place(runner: Any) -> WorkerPlace:
    """The worker's ranks and sizes (rows ``parallel.*``, ``config.parallel.*``, ``config.model.*``)."""
    from vllm.distributed import (
        get_pp_group,
        get_tensor_model_parallel_rank,
        get_tensor_model_parallel_world_size,
    )

    parallel = runner.parallel_config
    model_config = runner.model_config
    first, end = model_config.get_layers_start_end_indices(parallel)
    return WorkerPlace(
        device=runner.device,
        dtype=model_config.dtype,
        max_num_reqs=int(runner.max_num_reqs),
        max_num_tokens=int(runner.max_num_tokens),
        tp_rank=int(get_tensor_model_parallel_rank()),
        tp_size=int(get_tensor_model_parallel_world_size()),
        pp_rank=int(get_pp_group().rank_in_group),
        # Dense models run each DP rank as an independent DP=1 engine; `data_parallel_index` keeps the
        # rank (`vllm/v1/engine/core.py`, `reconfigure_for_independent_dp_rank`).
        dp_rank=int(getattr(parallel, "data_parallel_index", parallel.data_parallel_rank)),
        stage_layers=(int(first), int(end)),
        total_layers=int(model_config.get_total_num_hidden_layers()),
        model_path=str(model_config.model),
    )


def drafter_model(runner: Any) -> Any:
    """The drafter's model: V1 `runner.drafter.model`, V2 `runner.speculator.model` (None: no drafter)."""
    for attribute in ("speculator", "drafter"):
        model = getattr(getattr(runner, attribute, None), "model", None)
        if model is not None:
            return model
    return None


def arm(runner: Any) -> WorkerSteering | None:
    """Build the worker's steering state after its model loaded (None when no profile is configured).

    Raises:
        SteeringConfigError: an unknown runner class, a refused configuration, a drafter sharing the
            target's attention layers, or a model other than the profiled one.
    """
    plugin = settings()
    if plugin is None:
        return None
    state: WorkerSteering | None = getattr(runner, STATE_ATTRIBUTE, None)
    if state is not None:
        return state
    kind = runner_kind(runner)
    if kind is None:
        raise SteeringConfigError(
            f"modality-steer: the model runner {_class_name(runner)} is neither vLLM's V1 nor V2 runner; "
            "refusing to start"
        )
    facts = engine_facts(runner.vllm_config, runner)
    layers = decoder_attention_layers(runner.model)
    speculative = getattr(runner.vllm_config, "speculative_config", None)
    check_drafter(drafter_model(runner), layers, str(getattr(speculative, "method", "?")))
    state = WorkerSteering(worker_place(runner), plugin, layers, facts)
    for layer in state.steered_layers:
        wrap_attention(layers[layer], layer, state)
    setattr(runner, STATE_ATTRIBUTE, state)
    return state


def steering_of(runner: Any) -> WorkerSteering | None:
    """The runner's steering state; None when no profile is configured.

    Raises:
        SteeringConfigError: a profile is configured but the runner was not armed.
    """
    state: WorkerSteering | None = getattr(runner, STATE_ATTRIBUTE, None)
    if state is None and settings() is not None:
        raise SteeringConfigError(
            f"modality-steer: a profile is configured but the model runner {_class_name(runner)} was not set up"
        )
    return state


def wrap_attention(module: Any, layer: int, state: WorkerSteering) -> None:
    """Scale `layer`'s heads right after its attention backend writes `output` (row
    ``attention.impl.forward``; `unified_attention_with_output` calls `impl.forward(layer, query, key,
    value, kv_cache, attn_metadata, output=...)`). The backend's forward stays reachable as the wrapper's
    `original` attribute, looked up per call."""
    impl = module.impl

    def forward(
        attn_layer: Any,
        query: Any,
        key: Any,
        value: Any,
        kv_cache: Any,
        attn_metadata: Any,
        output: Any = None,
        **kwargs: Any,
    ) -> Any:
        backend = forward.original  # type: ignore[attr-defined]
        result = backend(attn_layer, query, key, value, kv_cache, attn_metadata, output=output, **kwargs)
        if output is None:
            # vLLM's Attention always passes its output buffer; a backend called without one could not be
            # scaled in place, and must not serve a steered step unsteered.
            if state.active:
                raise SteeringConfigError("modality-steer: an attention backend ran without an output buffer")
            return result
        state.scale(layer, output)
        return result

    forward.original = impl.forward  # type: ignore[attr-defined]
    forward._modality_steer = "attention.impl.forward"  # type: ignore[attr-defined]
    impl.forward = forward


def report_worker_state(worker: Any) -> dict[str, Any]:
    """Run in a worker by `collective_rpc` (the state endpoint and the start-up handshake).

    Raises:
        SteeringConfigError: the worker's model runner was not set up for steering (named, with the
            refusals its configuration meets).
    """
    runner = worker.model_runner
    state: WorkerSteering | None = getattr(runner, STATE_ATTRIBUTE, None)
    if state is None:
        config = getattr(worker, "vllm_config", None)
        facts = engine_facts(config, runner) if config is not None else None
        raise SteeringConfigError(not_armed_message(_class_name(runner), facts))
    return state.state()


# --------------------------------------------------------------------------------------------------
# Workers: the runners' hooks.
# --------------------------------------------------------------------------------------------------


def _load_model(key: str) -> Any:
    def load_model(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(key)(self, *args, **kwargs)
        arm(self)
        return result

    return load_model


def _deactivate_first(key: str) -> Any:
    """`_dummy_run` (V1, V2) and `capture_model` (V2): their tokens belong to no request."""

    def deactivated(self: Any, *args: Any, **kwargs: Any) -> Any:
        state: WorkerSteering | None = getattr(self, STATE_ATTRIBUTE, None)
        if state is not None:
            state.deactivate()
        return original(key)(self, *args, **kwargs)

    return deactivated


def _extra_args(sampling_params: Any) -> Any:
    return getattr(sampling_params, "extra_args", None)


def _v1_prepare_inputs(key: str) -> Any:
    def prepare_inputs(
        self: Any, scheduler_output: Any, num_scheduled_tokens: Any, *args: Any, **kwargs: Any
    ) -> Any:
        result = original(key)(self, scheduler_output, num_scheduled_tokens, *args, **kwargs)
        state = steering_of(self)
        if state is not None:
            count = self.input_batch.num_reqs
            request_ids = list(self.input_batch.req_ids[:count])
            for request_id in request_ids:
                state.track(request_id, _extra_args(self.requests[request_id].sampling_params))
            state.set_step(request_ids, num_scheduled_tokens[:count])
        return result

    return prepare_inputs


def _v1_update_states(key: str) -> Any:
    def update_states(self: Any, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(key)(self, scheduler_output, *args, **kwargs)
        state: WorkerSteering | None = getattr(self, STATE_ATTRIBUTE, None)
        if state is not None:
            # Finished and aborted requests have just left `self.requests`, also on a step that schedules
            # no tokens (the step that only reports them finished): free their slots now.
            state.keep_only(self.requests)
        return result

    return update_states


def _v2_add_requests(key: str) -> Any:
    def add_requests(self: Any, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(key)(self, scheduler_output, *args, **kwargs)
        state: WorkerSteering | None = getattr(self, STATE_ATTRIBUTE, None)
        if state is not None:
            for new in scheduler_output.scheduled_new_reqs:
                state.track(new.req_id, _extra_args(new.sampling_params), replace=True)
        return result

    return add_requests


def _v2_remove_request(key: str) -> Any:
    def remove_request(self: Any, req_id: str, *args: Any, **kwargs: Any) -> Any:
        result = original(key)(self, req_id, *args, **kwargs)
        state: WorkerSteering | None = getattr(self, STATE_ATTRIBUTE, None)
        if state is not None:
            state.forget([req_id])
        return result

    return remove_request


def token_spans(input_batch: Any) -> tuple[list[str], Any]:
    """The requests of a V2 `InputBatch` in the order it runs them and each one's token count, from its
    `query_start_loc_np` (`vllm/v1/worker/gpu/model_runner.py`, `prepare_inputs`: entries after the last
    request repeat `num_tokens`; tokens from `num_tokens` to `num_tokens_after_padding` are padding).

    Raises:
        SteeringConfigError: the spans do not cover the batch's tokens exactly (a layout the host-side
            batch does not tell, such as adaptive draft verification).
    """
    import numpy as np

    request_ids = list(input_batch.req_ids)
    starts = np.asarray(input_batch.query_start_loc_np[: len(request_ids) + 1], dtype=np.int64)
    counts = np.diff(starts)
    if (
        len(starts) != len(request_ids) + 1
        or starts[0] != 0
        or starts[-1] != input_batch.num_tokens
        or (counts < 0).any()
    ):
        raise SteeringConfigError(
            f"modality-steer: the V2 batch's token spans {starts.tolist()} do not cover its "
            f"{input_batch.num_tokens} tokens"
        )
    return request_ids, counts


def _v2_prepare_inputs(key: str) -> Any:
    def prepare_inputs(self: Any, *args: Any, **kwargs: Any) -> Any:
        input_batch = original(key)(self, *args, **kwargs)
        state = steering_of(self)
        if state is not None:
            request_ids, counts = token_spans(input_batch)
            state.set_step(request_ids, counts)
        return input_batch

    return prepare_inputs


def _v2_execute_model(key: str) -> Any:
    parameters = ROW_BY_KEY[key].params  # ("self", "scheduler_output", "intermediate_tensors", "dummy_run")
    dummy_position = parameters.index("dummy_run") - 1

    def execute_model(self: Any, *args: Any, **kwargs: Any) -> Any:
        dummy = kwargs.get("dummy_run", args[dummy_position] if len(args) > dummy_position else False)
        if dummy or kwargs.get("is_profile", False):
            state: WorkerSteering | None = getattr(self, STATE_ATTRIBUTE, None)
            if state is not None:
                state.deactivate()
        return original(key)(self, *args, **kwargs)

    return execute_model
