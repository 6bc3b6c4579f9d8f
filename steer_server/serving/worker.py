"""What runs in each vLLM worker: per-request head gains applied right after the attention backend.

After the model loads, each steered decoder layer's attention backend is wrapped so that right after it
writes its output ([tokens, local_heads, head_dim], before `o_proj`) the head-scaling kernel multiplies
the heads by ``table[slot[token], head]``; before each forward, the token → slot map is filled from the
batch's requests (`vllm/v1/worker/gpu_model_runner.py`, `_prepare_inputs`). Tables and the slot map are
persistent buffers (CUDA graphs replay them). Slots are reference-counted by gains digest and freed when
requests leave the runner (`_update_states`).
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


class WorkerSteering:
    """Per-worker steering state: persistent buffers, slots, and the per-step slot map."""

    def __init__(self, runner: Any, plugin: PluginSettings) -> None:
        import torch
        from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

        self.plugin = plugin
        self.device = runner.device
        self.max_slots = int(runner.max_num_reqs) + 1
        self.max_tokens = int(runner.max_num_tokens)
        self.tp_rank = get_tensor_model_parallel_rank()
        self.tp_size = get_tensor_model_parallel_world_size()
        self.layers = _decoder_attention_layers(runner.model)
        self._check_model(runner)
        self.local_heads = int(next(iter(self.layers.values())).num_heads)
        first = self.tp_rank * self.local_heads
        # Global (layer, head) of the profile → this rank's steered layers and local head indices.
        wanted = {lh for mode in ("image", "text") for lh in plugin.profile.heads(mode)}
        self.steered_layers = sorted(
            {layer for layer, _ in wanted} | ({*self.layers} if plugin.allow_raw_heads else set())
        )
        self.first_head = first
        self.tables = {
            layer: torch.ones(self.max_slots, self.local_heads, dtype=torch.float32, device=self.device)
            for layer in self.steered_layers
        }
        self.slot_map = torch.zeros(self.max_tokens, dtype=torch.int32, device=self.device)
        self._slot_map_cpu = torch.zeros(self.max_tokens, dtype=torch.int32)
        self._dirty = 0  # slot-map entries that may be non-zero since the last reset
        self.active = False
        self._slot_of_digest: dict[str, int] = {}
        self._refs: dict[int, set[str]] = {}
        self._slot_of_request: dict[str, int] = {}
        for layer in self.steered_layers:
            _wrap_attention(self.layers[layer], self, self.tables[layer])
        logger.info(
            "modality-steer: profile %s on %d decoder layers (%d steerable), TP rank %d/%d, %d slots",
            plugin.profile.profile_id,
            len(self.layers),
            len(self.steered_layers),
            self.tp_rank,
            self.tp_size,
            self.max_slots - 1,
        )

    def _check_model(self, runner: Any) -> None:
        model_info = self.plugin.profile.model
        if not self.layers:
            raise SteeringConfigError(
                "modality-steer: found no decoder attention layers (layers.N.self_attn.attn) to steer"
            )
        sample = next(iter(self.layers.values()))
        served = (len(self.layers), int(sample.num_heads) * self.tp_size, int(sample.head_size))
        profiled = (model_info.num_layers, model_info.num_heads, model_info.head_dim)
        if served != profiled:
            raise SteeringConfigError(
                f"modality-steer: the profile {self.plugin.profile_path} is for a model with {profiled[0]} layers x "
                f"{profiled[1]} heads x head_dim {profiled[2]}, but the served model has {served[0]} layers x "
                f"{served[1]} heads x head_dim {served[2]}"
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
        config = runner.vllm_config
        refusals = []
        if config.speculative_config is not None:
            refusals.append("speculative decoding")
        if getattr(config.parallel_config, "enable_dbo", False):
            refusals.append("dual-batch overlap")
        if getattr(config.model_config, "use_mla", False):
            refusals.append("MLA attention")
        pass_config = getattr(config.compilation_config, "pass_config", None)
        if pass_config is not None and (
            getattr(pass_config, "fuse_attn_quant", False)
            or getattr(pass_config, "enable_attn_fusion", False)
        ):
            refusals.append("attention with fused FP8 output quantisation")
        if refusals:
            raise SteeringConfigError(
                f"modality-steer does not support {', '.join(refusals)}; refusing to start"
            )

    # ---- slots -------------------------------------------------------------------------------

    def _slot_for(self, request_id: str, sampling_params: Any) -> int:
        known = self._slot_of_request.get(request_id)
        if known is not None:
            return known
        extra = getattr(sampling_params, "extra_args", None) or {}
        try:
            gains = self.plugin.gains_for(extra.get(EXTRA_ARGS_KEY))
        except SpecError as exc:
            raise SteeringConfigError(
                f"modality-steer: request {request_id} carries an invalid spec: {exc}"
            ) from exc
        slot = 0
        if gains:
            digest = gains_digest(gains)
            slot = self._slot_of_digest.get(digest, 0)
            if slot == 0:
                slot = self._allocate(digest, gains)
            self._refs[slot].add(request_id)
        self._slot_of_request[request_id] = slot
        return slot

    def _allocate(self, digest: str, gains: dict[tuple[int, int], float]) -> int:
        free = next((s for s in range(1, self.max_slots) if s not in self._refs), None)
        if free is None:
            raise SteeringConfigError(
                "modality-steer: no free steering slot (more configurations than max_num_seqs)"
            )
        for (layer, head), gain in gains.items():
            local = head - self.first_head
            if 0 <= local < self.local_heads:
                self.tables[layer][free, local] = gain
        self._slot_of_digest[digest] = free
        self._refs[free] = set()
        return free

    def release(self, live_requests: Any) -> None:
        """Free the slots of requests that finished or were aborted (they left the runner's requests)."""
        for request_id in [r for r in self._slot_of_request if r not in live_requests]:
            slot = self._slot_of_request.pop(request_id)
            if slot == 0:
                continue
            holders = self._refs[slot]
            holders.discard(request_id)
            if not holders:
                del self._refs[slot]
                self._slot_of_digest = {d: s for d, s in self._slot_of_digest.items() if s != slot}
                for table in self.tables.values():
                    table[slot].fill_(1.0)

    @property
    def slots_in_use(self) -> int:
        """Slots currently holding a configuration (row 0, unsteered, is not counted)."""
        return len(self._refs)

    def state(self) -> dict[str, Any]:
        """What a debug endpoint shows: slots held (by how many requests) and requests tracked."""
        return {
            "tp_rank": self.tp_rank,
            "slots_in_use": self.slots_in_use,
            "max_slots": self.max_slots - 1,
            "requests_tracked": len(self._slot_of_request),
            "requests_steered": sum(len(holders) for holders in self._refs.values()),
        }

    # ---- per step ----------------------------------------------------------------------------

    def begin_step(self, runner: Any, num_scheduled_tokens: Any) -> None:
        """Fill the token → slot map for the step the runner has just prepared (called after
        `_prepare_inputs`; tokens laid out in batch order, `num_scheduled_tokens[i]` for request i).

        Raises:
            SteeringConfigError: more tokens than the slot map holds, no free slot, or an invalid spec.
        """
        import numpy as np

        num_reqs = runner.input_batch.num_reqs
        request_ids = runner.input_batch.req_ids[:num_reqs]
        slots = np.array(
            [self._slot_for(r, runner.requests[r].sampling_params) for r in request_ids], dtype=np.int32
        )
        counts = np.asarray(num_scheduled_tokens[:num_reqs])
        total = int(counts.sum())
        if total > self.max_tokens:
            raise SteeringConfigError(
                f"modality-steer: {total} tokens in a step, the slot map holds {self.max_tokens}"
            )
        if not slots.any():
            if self._dirty:  # a captured full CUDA graph reads this buffer: leave it all zeros
                self.slot_map[: self._dirty].zero_()
                self._dirty = 0
            self.active = False
            return
        per_token = np.repeat(slots, counts)
        view = self._slot_map_cpu.numpy()
        view[:total] = per_token
        view[total : max(total, self._dirty)] = 0
        extent = max(total, self._dirty)
        self.slot_map[:extent].copy_(self._slot_map_cpu[:extent], non_blocking=True)
        self._dirty = total
        self.active = True


def _decoder_attention_layers(model: Any) -> dict[int, Any]:
    from vllm.model_executor.layers.attention import Attention

    layers: dict[int, Any] = {}
    for name, module in model.named_modules():
        match = DECODER_ATTENTION.search(name)
        if match and isinstance(module, Attention):
            layers[int(match.group(1))] = module
    return dict(sorted(layers.items()))


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
        capturing = output is not None and output.is_cuda and torch.cuda.is_current_stream_capturing()
        if output is not None and (state.active or capturing):
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
    from vllm.v1.worker.worker_base import WorkerBase

    setattr(WorkerBase, WORKER_STATE_METHOD, _worker_state)


def _worker_state(worker: Any) -> dict[str, Any]:
    """Run in a worker by `collective_rpc` (the API server's state endpoint)."""
    state: WorkerSteering | None = getattr(worker.model_runner, "_modality_steer", None)
    if state is None:
        raise SteeringConfigError("modality-steer: this worker's model runner was not set up")
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
