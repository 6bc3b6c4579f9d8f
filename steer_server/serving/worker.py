"""What runs in each vLLM worker: per-request head gains applied right after the attention backend.

After the model loads, each steered decoder layer's attention backend is wrapped so that right after it
writes its output ([tokens, local_heads, head_dim], before `o_proj`) the head-scaling kernel multiplies
the heads by ``table[slot[token], head]``; before each forward, the token → slot map is filled from the
batch's requests (`vllm/v1/worker/gpu_model_runner.py`, `_prepare_inputs`). Tables and the slot map are
persistent buffers (CUDA graphs replay them). Slots (table rows) are assigned per step to the scheduled
configurations (gains digests) and freed when no live request has their configuration
(`_update_states`).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

from ..profile import model_fingerprint
from ..spec import SpecError, gains_digest
from .settings import EXTRA_ARGS_KEY, WORKER_STATE_METHOD, PluginSettings, SteeringConfigError, settings

# Decoder self-attention layers of the language model; vision towers use other module classes/names.
DECODER_ATTENTION = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn\.attn$")

logger = logging.getLogger("modality_steer")


def select_v1_runner() -> None:
    """Select vLLM's V1 model runner (the one whose hooks this module wraps), or refuse a V2 request.

    Raises:
        SteeringConfigError: VLLM_USE_V2_MODEL_RUNNER asks for V2.
    """
    # The GPU V2 runner keeps no sampling params per request and may replay a full CUDA graph with no
    # Python in the forward; this plugin steers through the V1 runner, so it selects it, loudly.
    value = os.environ.get("VLLM_USE_V2_MODEL_RUNNER")
    if value not in (None, "", "0"):
        raise SteeringConfigError(
            "VLLM_USE_V2_MODEL_RUNNER is set, but modality-steer supports only the V1 model runner; "
            "unset it (the plugin then selects V1) or run without a profile"
        )
    if value is None:
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
        logger.warning("modality-steer: selected vLLM's V1 model runner (VLLM_USE_V2_MODEL_RUNNER=0)")


def engine_refusals(config: Any, local_heads: int, max_tokens: int) -> list[str]:
    """Engine configurations under which the plugin's hooks would not run or would mis-map tokens,
    named (empty: none). Read from a `VllmConfig`.

    - MLA attention, attention that fuses FP8 output quantisation;
    - micro-batching (`--enable-dbo`, `--ubatch-size` > 1): attention runs once per micro-batch, with
      token offsets the per-step slot map does not follow (`vllm/v1/worker/ubatching.py`);
    - vLLM's V2 model runner (`VllmConfig.use_v2_model_runner`; watermarking forces it even with
      `VLLM_USE_V2_MODEL_RUNNER=0`): it keeps no sampling parameters per request;
    - vLLM's Rust front-end (`VLLM_USE_RUST_FRONTEND`, `vllm/entrypoints/cli/serve.py`): it serves HTTP
      without the API server's app and request builders, where `modality_steer` is read;
    - limits of the kernel: local heads per rank and tokens per step
      (`steer_server.kernels.head_scale.MAX_HEADS`, `MAX_TOKENS`).
    """
    from ..kernels.head_scale import MAX_HEADS, MAX_TOKENS

    refusals = []
    parallel = config.parallel_config
    if getattr(parallel, "enable_dbo", False) or int(getattr(parallel, "ubatch_size", 0) or 0) > 1:
        refusals.append("micro-batching (--enable-dbo, --ubatch-size)")
    if getattr(config.model_config, "use_mla", False):
        refusals.append("MLA attention")
    pass_config = getattr(config.compilation_config, "pass_config", None)
    if pass_config is not None and (
        getattr(pass_config, "fuse_attn_quant", False) or getattr(pass_config, "enable_attn_fusion", False)
    ):
        refusals.append("attention with fused FP8 output quantisation")
    if os.environ.get("VLLM_USE_RUST_FRONTEND", "0").lower() not in ("", "0", "false"):
        refusals.append("vLLM's Rust front-end (VLLM_USE_RUST_FRONTEND): it bypasses the request hooks")
    if getattr(config, "use_v2_model_runner", False):
        refusals.append("vLLM's V2 model runner (set VLLM_USE_V2_MODEL_RUNNER=0, and no watermarking)")
    if local_heads > MAX_HEADS:
        refusals.append(f"{local_heads} attention heads per rank (the kernel takes {MAX_HEADS})")
    if max_tokens > MAX_TOKENS:
        refusals.append(
            f"{max_tokens} tokens per step (the kernel takes {MAX_TOKENS}; lower --max-num-batched-tokens)"
        )
    return refusals


class WorkerSteering:
    """Per-worker steering state: persistent buffers, slots, and the per-step slot map.

    Slots are rows of the per-layer gain tables, one per distinct configuration (gains digest); row 0 is
    all ones (unsteered tokens and padding). Rows are assigned per step from the scheduled batch, which
    holds at most `max_num_reqs` requests, so a step always finds rows for its configurations, however
    many configurations wait in the queue or sit preempted; a row is reused while its configuration is
    scheduled and freed when no live request has it.
    """

    def __init__(self, runner: Any, plugin: PluginSettings) -> None:
        import torch
        from vllm.distributed import (
            get_pp_group,
            get_tensor_model_parallel_rank,
            get_tensor_model_parallel_world_size,
        )

        from ..kernels.head_scale import SlotMapStaging

        self.plugin = plugin
        self.device = runner.device
        self.max_slots = int(runner.max_num_reqs) + 1
        self.max_tokens = int(runner.max_num_tokens)
        self.tp_rank = get_tensor_model_parallel_rank()
        self.tp_size = get_tensor_model_parallel_world_size()
        parallel = runner.parallel_config
        self.pp_rank = int(get_pp_group().rank_in_group)
        # Dense models run each DP rank as an independent DP=1 engine; `data_parallel_index` keeps the
        # rank (`vllm/v1/engine/core.py`, `reconfigure_for_independent_dp_rank`).
        self.dp_rank = int(getattr(parallel, "data_parallel_index", parallel.data_parallel_rank))
        # Pipeline parallel: this stage holds layers [first, end) of the model; module names keep global
        # layer indices (`vllm/model_executor/models/utils.py`, `make_layers`), and so do profiles.
        self.stage_layers = tuple(runner.model_config.get_layers_start_end_indices(parallel))
        self.total_layers = int(runner.model_config.get_total_num_hidden_layers())
        self.layers = _decoder_attention_layers(runner.model)
        self._check_model(runner)
        _check_drafter(runner, self.layers)
        # A pipeline stage of a hybrid model may hold no attention layer (nothing to steer there).
        self.local_heads = plugin.profile.model.num_heads // self.tp_size
        if self.layers:
            self.local_heads = int(next(iter(self.layers.values())).num_heads)
        refusals = engine_refusals(runner.vllm_config, self.local_heads, self.max_tokens)
        if refusals:
            raise SteeringConfigError(
                f"modality-steer does not support {', '.join(refusals)}; refusing to start"
            )
        first = self.tp_rank * self.local_heads
        # Global (layer, head) of the profile → this rank's steered layers and local head indices.
        wanted = {layer for mode in ("image", "text") for layer, _ in plugin.profile.heads(mode)}
        self.steered_layers = sorted(
            (set(self.layers) & wanted) | (set(self.layers) if plugin.allow_raw_heads else set())
        )
        self.first_head = first
        self.tables = {
            layer: torch.ones(self.max_slots, self.local_heads, dtype=torch.float32, device=self.device)
            for layer in self.steered_layers
        }
        # The token → slot map ([max_tokens] int32 on the device) and its host staging (pinned and double
        # buffered on CUDA).
        self._staging = SlotMapStaging(self.max_tokens, self.device)
        self.slot_map = self._staging.slot_map
        self.active = False
        self._digest_of_request: dict[str, str | None] = {}  # None: unsteered
        self._gains_of_digest: dict[str, dict[tuple[int, int], float]] = {}
        self._slot_of_digest: dict[str, int] = {}
        self._digest_of_slot: dict[int, str] = {}
        self._last_step_of_digest: dict[str, int] = {}
        self._step = 0
        self._peak_tracked = 0  # most requests tracked at once (running and preempted), since start
        for layer in self.steered_layers:
            _wrap_attention(self.layers[layer], self, self.tables[layer])
        # Load time (`load_model`) comes before vLLM's warm-up and CUDA-graph capture.
        self.kernel_variants = _warm_up_kernel(
            self.device,
            runner.model_config.dtype,
            [self.layers[n] for n in self.steered_layers],
            self.max_tokens,
        )
        logger.warning(
            "modality-steer: profile %s; DP rank %d, PP stage %d (layers %d-%d of %d), TP rank %d/%d; "
            "steered layers %s; %d slots",
            plugin.profile.profile_id,
            self.dp_rank,
            self.pp_rank,
            self.stage_layers[0],
            self.stage_layers[1] - 1,
            self.total_layers,
            self.tp_rank,
            self.tp_size,
            self.steered_layers,
            self.max_slots - 1,
        )

    def _check_model(self, runner: Any) -> None:
        model_info = self.plugin.profile.model
        first, end = self.stage_layers
        # Hybrid models have attention on some layers only; this stage must hold exactly the profile's
        # attention layers in its range.
        profiled_here = [layer for layer in model_info.layers if first <= layer < end]
        if not self.layers:
            if profiled_here or (first, end) == (0, self.total_layers):
                raise SteeringConfigError(
                    "modality-steer: found no decoder attention layers (layers.N.self_attn.attn) to steer"
                )
            return
        sample = next(iter(self.layers.values()))
        served = (self.total_layers, int(sample.num_heads) * self.tp_size, int(sample.head_size))
        if (
            served != (model_info.num_layers, model_info.num_heads, model_info.head_dim)
            or list(self.layers) != profiled_here
        ):
            raise SteeringConfigError(
                f"modality-steer: the profile {self.plugin.profile_path} is for a model with "
                f"{model_info.describe()}, but the served model has {served[0]} layers (attention on "
                f"{list(self.layers)} of layers {first}-{end - 1}) x {served[1]} heads x head_dim {served[2]}"
            )
        if model_info.fingerprint:
            model_dir = Path(runner.model_config.model)
            if not (model_dir / "config.json").is_file():
                raise SteeringConfigError(
                    f"modality-steer: the profile carries a model fingerprint, but {model_dir} is not a local "
                    "checkpoint folder to compare it with"
                )
            served_print = model_fingerprint(model_dir)
            if served_print != model_info.fingerprint:
                raise SteeringConfigError(
                    f"modality-steer: the profile {self.plugin.profile_path} was made for model fingerprint "
                    f"{model_info.fingerprint}, but {model_dir} has {served_print}"
                )

    # ---- configurations and slots --------------------------------------------------------------

    def _digest_for(self, request_id: str, sampling_params: Any) -> str | None:
        """The request's configuration (gains digest; None: unsteered), parsed once per request. The
        EngineCore has decided and validated the spec under the same settings."""
        if request_id in self._digest_of_request:
            return self._digest_of_request[request_id]
        extra = getattr(sampling_params, "extra_args", None) or {}
        try:
            gains = self.plugin.gains_for(extra.get(EXTRA_ARGS_KEY))
        except SpecError as exc:  # only if the processes disagree on their settings
            raise SteeringConfigError(
                f"modality-steer: request {request_id} reached a worker with a spec its settings refuse: {exc}"
            ) from exc
        digest = gains_digest(gains) if gains else None
        if digest is not None:
            self._gains_of_digest[digest] = gains
        self._digest_of_request[request_id] = digest
        return digest

    def _place(self, digest: str, needed: set[str]) -> None:
        """Give `digest` a row: its own if it has one, else a free row, else the least recently used row
        of a configuration this step does not need."""
        self._last_step_of_digest[digest] = self._step
        if digest in self._slot_of_digest:
            return
        free = next((s for s in range(1, self.max_slots) if s not in self._digest_of_slot), None)
        if free is None:
            idle = [s for s, d in self._digest_of_slot.items() if d not in needed]
            # At most max_num_reqs configurations are scheduled in a step, and there are as many rows.
            assert idle, "more configurations in one step than slots"
            free = min(idle, key=lambda s: self._last_step_of_digest.get(self._digest_of_slot[s], -1))
            self._clear(free)
        gains = self._gains_of_digest[digest]
        for table in self.tables.values():
            table[free].fill_(1.0)
        first, end = self.stage_layers
        for (layer, head), gain in gains.items():
            local = head - self.first_head
            if first <= layer < end and 0 <= local < self.local_heads:  # this stage's layers, rank's heads
                self.tables[layer][free, local] = gain  # KeyError: a steered layer without a table
        self._slot_of_digest[digest] = free
        self._digest_of_slot[free] = digest

    def _clear(self, slot: int) -> None:
        digest = self._digest_of_slot.pop(slot)
        del self._slot_of_digest[digest]
        for table in self.tables.values():
            table[slot].fill_(1.0)

    def release(self, live_requests: Any) -> None:
        """Forget requests that finished or were aborted (they left the runner's requests); free the rows
        of configurations no live request has."""
        for request_id in [r for r in self._digest_of_request if r not in live_requests]:
            del self._digest_of_request[request_id]
        live = set(self._digest_of_request.values())
        for slot in [s for s, d in self._digest_of_slot.items() if d not in live]:
            self._clear(slot)
        for digest in [d for d in self._gains_of_digest if d not in live]:
            del self._gains_of_digest[digest]
            self._last_step_of_digest.pop(digest, None)

    @property
    def slots_in_use(self) -> int:
        """Slots currently holding a configuration (row 0, unsteered, is not counted)."""
        return len(self._digest_of_slot)

    def state(self) -> dict[str, Any]:
        """What the state endpoint and the start-up handshake read: armed, with which profile, on which
        layers, slots held, requests tracked (and of them steered)."""
        return {
            "armed": True,
            "profile_id": self.plugin.profile.profile_id,
            "settings_id": self.plugin.settings_id,
            "dp_rank": self.dp_rank,
            "pp_rank": self.pp_rank,
            "tp_rank": self.tp_rank,
            "layers": list(self.stage_layers),
            "steered_layers": self.steered_layers,
            "slots_in_use": self.slots_in_use,
            "max_slots": self.max_slots - 1,
            "requests_tracked": len(self._digest_of_request),
            "requests_tracked_peak": self._peak_tracked,
            "requests_steered": sum(d is not None for d in self._digest_of_request.values()),
        }

    # ---- per step ----------------------------------------------------------------------------

    def deactivate(self) -> None:
        """Scale nothing until the next `begin_step`: zero the slot map's used extent (a captured full
        CUDA graph reads the buffer) and stop the eager path. Called before dummy and profiling runs
        (idle data-parallel ranks, warm-up, graph capture), whose tokens belong to no request."""
        self._staging.clear()
        self.active = False

    def begin_step(self, runner: Any, num_scheduled_tokens: Any) -> None:
        """Fill the token → slot map for the step the runner has just prepared (called after
        `_prepare_inputs`; tokens laid out in batch order, `num_scheduled_tokens[i]` for request i).

        Raises:
            SteeringConfigError: more tokens than the slot map holds (refused at start-up, so only on a
                broken invariant), or a spec the worker's settings refuse.
        """
        import numpy as np
        import torch

        self._step += 1
        num_reqs = runner.input_batch.num_reqs
        request_ids = runner.input_batch.req_ids[:num_reqs]
        digests = [self._digest_for(r, runner.requests[r].sampling_params) for r in request_ids]
        self._peak_tracked = max(self._peak_tracked, len(self._digest_of_request))
        needed = {d for d in digests if d is not None}
        for digest in needed:
            self._place(digest, needed)
        slots = np.array([0 if d is None else self._slot_of_digest[d] for d in digests], dtype=np.int32)
        counts = np.asarray(num_scheduled_tokens[:num_reqs])
        total = int(counts.sum())
        if total > self.max_tokens:
            raise SteeringConfigError(
                f"modality-steer: {total} tokens in a step, the slot map holds {self.max_tokens}"
            )
        if not slots.any():
            self.deactivate()
            return
        self._staging.stage(torch.from_numpy(np.repeat(slots, counts)))
        self.active = True


def _decoder_attention_layers(model: Any) -> dict[int, Any]:
    from vllm.model_executor.layers.attention import Attention

    layers: dict[int, Any] = {}
    for name, module in model.named_modules():
        match = DECODER_ATTENTION.search(name)
        if match and isinstance(module, Attention):
            layers[int(match.group(1))] = module
    return dict(sorted(layers.items()))


def _check_drafter(runner: Any, layers: dict[int, Any]) -> None:
    """Speculative decoding: the target model is steered on every token it verifies; a drafter (EAGLE,
    MTP, draft model) runs unsteered, which can only lower the acceptance rate. A drafter that runs the
    target's own attention layers would be steered with a slot map laid out for the target's batch.

    Raises:
        SteeringConfigError: the drafter shares attention layers with the target model.
    """
    drafter_model = getattr(getattr(runner, "drafter", None), "model", None)
    if drafter_model is None:
        return
    targets = {id(layer) for layer in layers.values()}
    shared = [name for name, module in drafter_model.named_modules() if id(module) in targets]
    if shared:
        method = getattr(runner.vllm_config.speculative_config, "method", "?")
        raise SteeringConfigError(
            f"modality-steer does not support speculative decoding method {method!r}: its drafter runs the "
            f"target model's attention layers ({', '.join(shared[:3])}); refusing to start"
        )


def _warm_up_kernel(device: Any, dtype: Any, layers: list[Any], max_tokens: int) -> int:
    """Compile and launch every variant of the CUDA head-scaling kernel that `layers` (vLLM `Attention`
    modules to be steered) can hit in a step of up to `max_tokens` tokens of `dtype`; return the number of
    launches (0 off CUDA, where serving runs the torch path, or with no layer to steer).

    Called at load: vLLM's warm-up runs (`vllm/v1/worker/gpu_model_runner.py`, `_warmup_and_capture`)
    scale nothing (the slot map is cleared, see `WorkerSteering.deactivate`), so without this the first
    call of each variant would be the one inside CUDA-graph capture, where compiling and loading a module
    is not allowed. The kernel sees the attention output as ``[tokens, num_heads, head_size_v]``.
    """
    import torch

    if torch.device(device).type != "cuda":
        return 0
    from ..kernels.head_scale import warm_up

    shapes = {(int(layer.num_heads), int(getattr(layer, "head_size_v", layer.head_size))) for layer in layers}
    return sum(warm_up(heads, head_dim, dtype, device, max_tokens) for heads, head_dim in sorted(shapes))


def _wrap_attention(layer: Any, state: WorkerSteering, table: Any) -> None:
    """Scale this layer's heads right after its attention backend writes `output`."""
    import torch

    from ..kernels.head_scale import head_scale_

    impl = layer.impl
    original = impl.forward

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
        result = original(attn_layer, query, key, value, kv_cache, attn_metadata, output=output, **kwargs)
        if output is None:
            # vLLM 0.32's Attention always passes its output buffer; a backend called without one could
            # not be scaled in place, and must not serve a steered step unsteered.
            if state.active:
                raise SteeringConfigError("modality-steer: an attention backend ran without an output buffer")
            return result
        # Capture-safe: nothing below reads device memory back to the host (shapes, views and flags only;
        # `check_arguments` skips its debug read-back while capturing), and every kernel variant was
        # compiled at load (`_warm_up_kernel`). A FULL graph captures the launch with the slot map
        # buffer, so it is captured even when no request of the capturing (dummy) step is steered.
        capturing = output.is_cuda and torch.cuda.is_current_stream_capturing()
        if state.active or capturing:
            tokens = output.shape[0]
            head_scale_(output.view(tokens, state.local_heads, -1), state.slot_map[:tokens], table)
        return result

    impl.forward = forward


def patch_model_runner() -> None:
    """Wrap the model runners' `load_model`, `_prepare_inputs` and `_update_states`, and add the state
    method to the workers (idempotent)."""
    from vllm.v1.worker import gpu_model_runner

    runner_classes: list[Any] = [gpu_model_runner.GPUModelRunner]
    try:
        from vllm.v1.worker import cpu_model_runner

        runner_classes.append(cpu_model_runner.CPUModelRunner)
    except ImportError:  # a CUDA build of vLLM has no CPU runner
        pass
    for cls in runner_classes:
        if "load_model" in vars(cls) and not getattr(cls.load_model, "_modality_steer", False):
            cls.load_model = _after_load(cls.load_model)
    base = gpu_model_runner.GPUModelRunner
    if not getattr(base._prepare_inputs, "_modality_steer", False):
        base._prepare_inputs = _before_forward(base._prepare_inputs)  # type: ignore[method-assign]
    if not getattr(base._update_states, "_modality_steer", False):
        base._update_states = _after_update_states(base._update_states)  # type: ignore[method-assign]
    if not getattr(base._dummy_run, "_modality_steer", False):
        base._dummy_run = _deactivated_for(base._dummy_run)  # type: ignore[method-assign]
    from vllm.v1.worker.worker_base import WorkerBase

    setattr(WorkerBase, WORKER_STATE_METHOD, report_worker_state)


def report_worker_state(worker: Any) -> dict[str, Any]:
    """Run in a worker by `collective_rpc` (the state endpoint and the start-up handshake).

    Raises:
        SteeringConfigError: the worker's model runner was not set up for steering (named: the V2 runner,
            or an unknown runner class).
    """
    runner = worker.model_runner
    state: WorkerSteering | None = getattr(runner, "_modality_steer", None)
    if state is None:
        refusals = engine_refusals(worker.vllm_config, 0, 0)
        raise SteeringConfigError(
            f"modality-steer: this worker's model runner ({type(runner).__module__}.{type(runner).__name__}) "
            f"was not set up for steering{': ' + ', '.join(refusals) if refusals else ''}"
        )
    return state.state()


def _after_update_states(original: Any) -> Any:
    def update_states(self: Any, scheduler_output: Any) -> Any:
        result = original(self, scheduler_output)
        state: WorkerSteering | None = getattr(self, "_modality_steer", None)
        if state is not None:
            # Finished and aborted requests have just left `self.requests`, also on a step that
            # schedules no tokens (the step that only reports them finished): free their slots now.
            state.release(self.requests)
        return result

    update_states._modality_steer = True  # type: ignore[attr-defined]
    return update_states


def _deactivated_for(original: Any) -> Any:
    def dummy_run(self: Any, *args: Any, **kwargs: Any) -> Any:
        state: WorkerSteering | None = getattr(self, "_modality_steer", None)
        if state is not None:
            state.deactivate()
        return original(self, *args, **kwargs)

    dummy_run._modality_steer = True  # type: ignore[attr-defined]
    return dummy_run


def _after_load(original: Any) -> Any:
    def load_model(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        plugin = settings()
        if plugin is not None and getattr(self, "_modality_steer", None) is None:
            self._modality_steer = WorkerSteering(self, plugin)
        return result

    load_model._modality_steer = True  # type: ignore[attr-defined]
    return load_model


def _before_forward(original: Any) -> Any:
    def prepare_inputs(self: Any, scheduler_output: Any, num_scheduled_tokens: Any) -> Any:
        result = original(self, scheduler_output, num_scheduled_tokens)
        state: WorkerSteering | None = getattr(self, "_modality_steer", None)
        if state is None and settings() is not None:
            raise SteeringConfigError(
                "modality-steer: a profile is configured but the model runner was not set up"
            )
        if state is not None:
            state.begin_step(self, num_scheduled_tokens)
        return result

    prepare_inputs._modality_steer = True  # type: ignore[attr-defined]
    return prepare_inputs
