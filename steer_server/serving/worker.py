"""What runs in each vLLM worker, as plain code: per-request head gains, the slots (rows of the per-layer
gain tables) they occupy, and the token → slot map of each step.

Nothing here imports vLLM: :mod:`.vllm_adapter` reads what vLLM built (the runner, its batch, its attention
layers) and calls in with plain values, for whichever model runner runs (V1 or V2). Each steered decoder
layer's attention backend is wrapped there so that right after it writes its output
([tokens, local_heads, head_dim], before `o_proj`) :meth:`WorkerSteering.scale` multiplies the heads by
``table[slot[token], head]``. Tables and the slot map are persistent buffers (CUDA graphs replay them).
Slots are assigned per step to the scheduled configurations (gains digests) and freed when no tracked
request has their configuration.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..profile import model_fingerprint
from ..spec import SpecError, gains_digest
from .kv_transfer import KVFacts, kv_refusals
from .settings import EXTRA_ARGS_KEY, PluginSettings, SteeringConfigError

logger = logging.getLogger("modality_steer")


@dataclass(frozen=True)
class EngineFacts:
    """What the plugin must know of an engine's configuration to decide whether it can steer it, read from
    vLLM's `VllmConfig` and the built model runner by :mod:`.vllm_adapter` (one row each there)."""

    runner: str  # "V1" or "V2": the model runner class found when the model loaded
    runner_class: str  # its qualified name
    micro_batching: bool  # --enable-dbo or --ubatch-size > 1
    mla: bool
    fused_attention_quant: bool  # attention fusing FP8 output quantisation
    rust_frontend: bool  # VLLM_USE_RUST_FRONTEND
    adaptive_verification: bool  # speculative_config.enable_adaptive_verification
    prefill_context_parallel: int  # parallel_config.prefill_context_parallel_size
    overridden_hooks: tuple[str, ...] = ()  # runner methods a subclass overrides past the plugin's hooks
    kv: KVFacts = field(default_factory=KVFacts)  # KV connectors, offloading and encoder-cache connectors


def engine_refusals(facts: EngineFacts, local_heads: int, max_tokens: int) -> list[str]:
    """Engine configurations under which the plugin's hooks would not run or would mis-map tokens,
    named (empty: none).

    - MLA attention, attention that fuses FP8 output quantisation;
    - micro-batching (`--enable-dbo`, `--ubatch-size` > 1): attention runs once per micro-batch, with
      token offsets the per-step slot map does not follow (`vllm/v1/worker/ubatching.py`);
    - on the V2 runner, adaptive draft verification and prefill context parallel: the batch's token spans
      are then decided on the GPU (`adaptive_verification.reallocate_drafts`) or per rank
      (`pcp_manager.partition_batch`), not by the host-side `InputBatch` the map is built from
      (`vllm/v1/worker/gpu/model_runner.py`, `prepare_inputs`);
    - a runner subclass that overrides a hooked method (its steps would bypass the map);
    - vLLM's Rust front-end (`VLLM_USE_RUST_FRONTEND`, `vllm/entrypoints/cli/serve.py`): it serves HTTP
      without the API server's app and request builders, where `modality_steer` is read;
    - limits of the kernel: local heads per rank and tokens per step
      (`steer_server.kernels.head_scale.MAX_HEADS`, `MAX_TOKENS`);
    - KV connectors and offloading backends whose stored KV is not keyed by the steering
      (:func:`~steer_server.serving.kv_transfer.kv_refusals`).
    """
    from ..kernels.head_scale import MAX_HEADS, MAX_TOKENS

    refusals = []
    if facts.micro_batching:
        refusals.append("micro-batching (--enable-dbo, --ubatch-size)")
    if facts.mla:
        refusals.append("MLA attention")
    if facts.fused_attention_quant:
        refusals.append("attention with fused FP8 output quantisation")
    if facts.rust_frontend:
        refusals.append("vLLM's Rust front-end (VLLM_USE_RUST_FRONTEND): it bypasses the request hooks")
    if facts.adaptive_verification:
        refusals.append(
            "adaptive draft verification (--speculative-config enable_adaptive_verification): token spans "
            "are reallocated on the GPU"
        )
    if facts.prefill_context_parallel > 1:
        refusals.append("prefill context parallel (--prefill-context-parallel-size > 1)")
    if facts.overridden_hooks:
        refusals.append(
            f"the model runner {facts.runner_class}, which overrides {', '.join(facts.overridden_hooks)}"
        )
    if local_heads > MAX_HEADS:
        refusals.append(f"{local_heads} attention heads per rank (the kernel takes {MAX_HEADS})")
    if max_tokens > MAX_TOKENS:
        refusals.append(
            f"{max_tokens} tokens per step (the kernel takes {MAX_TOKENS}; lower --max-num-batched-tokens)"
        )
    refusals.extend(kv_refusals(facts.kv))
    return refusals


@dataclass(frozen=True)
class WorkerPlace:
    """Where a worker sits and what its runner holds, read from vLLM by :mod:`.vllm_adapter`."""

    device: Any  # torch.device
    dtype: Any  # torch.dtype of the model
    max_num_reqs: int
    max_num_tokens: int
    tp_rank: int
    tp_size: int
    pp_rank: int
    dp_rank: int
    stage_layers: tuple[int, int]  # this pipeline stage holds layers [first, end)
    total_layers: int
    model_path: str  # the served checkpoint (a local folder, or a hub name)


def check_drafter(drafter_model: Any, layers: Mapping[int, Any], method: str) -> None:
    """Speculative decoding: the target model is steered on every token it verifies; a drafter (EAGLE,
    MTP, draft model) runs unsteered, which can only lower the acceptance rate. A drafter that runs the
    target's own attention layers would be steered with a slot map laid out for the target's batch.

    Args:
        drafter_model: the drafter's `nn.Module` (V1 `runner.drafter.model`, V2 `runner.speculator.model`),
            or None (no drafter, or one without a model, such as n-gram).

    Raises:
        SteeringConfigError: the drafter shares attention layers with the target model.
    """
    if drafter_model is None or not hasattr(drafter_model, "named_modules"):
        return
    targets = {id(layer) for layer in layers.values()}
    shared = [name for name, module in drafter_model.named_modules() if id(module) in targets]
    if shared:
        raise SteeringConfigError(
            f"modality-steer does not support speculative decoding method {method!r}: its drafter runs the "
            f"target model's attention layers ({', '.join(shared[:3])}); refusing to start"
        )


class WorkerSteering:
    """Per-worker steering state: persistent buffers, slots, tracked requests and the per-step slot map.

    Slots are rows of the per-layer gain tables, one per distinct configuration (gains digest); row 0 is
    all ones (unsteered tokens and padding). Rows are assigned per step from the scheduled batch, which
    holds at most `max_num_reqs` requests, so a step always finds rows for its configurations, however
    many configurations wait in the queue or sit preempted; a row is reused while its configuration is
    scheduled and freed when no tracked request has it.

    The runner adapters call :meth:`track` where the runner sees a request's sampling parameters,
    :meth:`forget` / :meth:`keep_only` where it drops requests, :meth:`set_step` with the batch it runs
    and :meth:`deactivate` before dummy runs, profiling and graph capture.
    """

    def __init__(
        self,
        place: WorkerPlace,
        plugin: PluginSettings,
        layers: Mapping[int, Any],
        facts: EngineFacts,
    ) -> None:
        """
        Args:
            place: the worker's ranks and sizes.
            plugin: the deployment's settings.
            layers: this stage's decoder attention layers by global layer index (objects with `num_heads`,
                `head_size`, optionally `head_size_v`).
            facts: the engine configuration, checked against :func:`engine_refusals`.

        Raises:
            SteeringConfigError: the served model is not the profiled one, or the engine is refused.
        """
        import torch

        from ..kernels.head_scale import SlotMapStaging

        self.plugin = plugin
        self.place = place
        self.facts = facts
        self.device = place.device
        self.max_slots = place.max_num_reqs + 1
        self.max_tokens = place.max_num_tokens
        self.tp_rank, self.tp_size = place.tp_rank, place.tp_size
        self.pp_rank, self.dp_rank = place.pp_rank, place.dp_rank
        # Pipeline parallel: module names keep global layer indices (`vllm/model_executor/models/utils.py`,
        # `make_layers`), and so do profiles.
        self.stage_layers = place.stage_layers
        self.total_layers = place.total_layers
        self.layers = dict(layers)
        self._check_model()
        # A pipeline stage of a hybrid model may hold no attention layer (nothing to steer there).
        self.local_heads = plugin.profile.model.num_heads // self.tp_size
        if self.layers:
            self.local_heads = int(next(iter(self.layers.values())).num_heads)
        refusals = engine_refusals(facts, self.local_heads, self.max_tokens)
        if refusals:
            raise SteeringConfigError(
                f"modality-steer does not support {', '.join(refusals)}; refusing to start"
            )
        self.first_head = self.tp_rank * self.local_heads
        wanted = {layer for mode in ("image", "text") for layer, _ in plugin.profile.heads(mode)}
        self.steered_layers = sorted(
            (set(self.layers) & wanted) | (set(self.layers) if plugin.allow_raw_heads else set())
        )
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
        self.kernel_variants = warm_up_kernel(
            self.device, place.dtype, [self.layers[n] for n in self.steered_layers], self.max_tokens
        )
        logger.warning(
            "modality-steer: profile %s; %s runner (%s); DP rank %d, PP stage %d (layers %d-%d of %d), "
            "TP rank %d/%d; steered layers %s; %d slots",
            plugin.profile.profile_id,
            facts.runner,
            facts.runner_class,
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

    def _check_model(self) -> None:
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
        if model_info.fingerprint and self.plugin.profile_match == "fingerprint":
            # Under --profile-match geometry the canaries, run before serving, decide instead.
            model_dir = Path(self.place.model_path)
            if not (model_dir / "config.json").is_file():
                raise SteeringConfigError(
                    f"modality-steer: the profile carries a model fingerprint, but {model_dir} is not a local "
                    "checkpoint folder to compare it with"
                )
            served_print = model_fingerprint(model_dir)
            if served_print != model_info.fingerprint:
                raise SteeringConfigError(
                    f"modality-steer: the profile {self.plugin.profile_path} was made for model fingerprint "
                    f"{model_info.fingerprint}, but {model_dir} has {served_print} (a quantized or fine-tuned "
                    "variant of the analysed model: --profile-match geometry, checked by the canaries)"
                )

    # ---- requests ------------------------------------------------------------------------------

    def track(self, request_id: str, extra_args: Mapping[str, Any] | None, *, replace: bool = False) -> None:
        """Record a request's configuration (gains digest; unsteered when `extra_args` carries no spec),
        parsed once per request. The EngineCore has decided and validated the spec under the same settings.

        Args:
            request_id: vLLM's request id.
            extra_args: the request's `SamplingParams.extra_args` (None: no sampling parameters, e.g. a
                pooling request, or none given).
            replace: parse again even if the request is tracked (a request re-added with new parameters).

        Raises:
            SteeringConfigError: the spec is one this worker's settings refuse (the processes disagree).
        """
        if request_id in self._digest_of_request and not replace:
            return
        try:
            gains = self.plugin.gains_for((extra_args or {}).get(EXTRA_ARGS_KEY))
        except SpecError as exc:  # only if the processes disagree on their settings
            raise SteeringConfigError(
                f"modality-steer: request {request_id} reached a worker with a spec its settings refuse: {exc}"
            ) from exc
        digest = gains_digest(gains) if gains else None
        if digest is not None:
            self._gains_of_digest[digest] = gains
        self._digest_of_request[request_id] = digest
        self._peak_tracked = max(self._peak_tracked, len(self._digest_of_request))

    def is_tracked(self, request_id: str) -> bool:
        """Whether the request's configuration is known."""
        return request_id in self._digest_of_request

    def forget(self, request_ids: Iterable[str]) -> None:
        """Drop requests the runner removed (finished, aborted or preempted); free the rows of
        configurations no tracked request has."""
        for request_id in request_ids:
            self._digest_of_request.pop(request_id, None)
        live = set(self._digest_of_request.values())
        for slot in [s for s, d in self._digest_of_slot.items() if d not in live]:
            self._clear(slot)
        for digest in [d for d in self._gains_of_digest if d not in live]:
            del self._gains_of_digest[digest]
            self._last_step_of_digest.pop(digest, None)

    def keep_only(self, live_requests: Iterable[str]) -> None:
        """Forget every tracked request not in `live_requests` (the runner's requests after an update)."""
        live = set(live_requests)
        self.forget([r for r in self._digest_of_request if r not in live])

    # ---- slots -----------------------------------------------------------------------------------

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

    @property
    def slots_in_use(self) -> int:
        """Slots currently holding a configuration (row 0, unsteered, is not counted)."""
        return len(self._digest_of_slot)

    def slot_of(self, request_id: str) -> int:
        """The row a tracked request's tokens read (0: unsteered, or its configuration holds no row)."""
        digest = self._digest_of_request.get(request_id)
        return 0 if digest is None else self._slot_of_digest.get(digest, 0)

    def state(self) -> dict[str, Any]:
        """What the state endpoint and the start-up handshake read: armed, with which profile and runner,
        on which layers, slots held, requests tracked (and of them steered)."""
        return {
            "armed": True,
            "profile_id": self.plugin.profile.profile_id,
            "settings_id": self.plugin.settings_id,
            "canary_secret": self.plugin.canary_secret_digest(),
            "runner": self.facts.runner,
            "runner_class": self.facts.runner_class,
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

    # ---- per step --------------------------------------------------------------------------------

    def deactivate(self) -> None:
        """Scale nothing until the next :meth:`set_step`: zero the slot map's used extent (a captured full
        CUDA graph reads the buffer) and stop the eager path. Called before dummy and profiling runs
        (idle data-parallel ranks, warm-up, graph capture), whose tokens belong to no request."""
        self._staging.clear()
        self.active = False

    def set_step(self, request_ids: Sequence[str], counts: Sequence[int] | Any) -> None:
        """Fill the token → slot map for the step the runner is about to run: the batch's tokens are laid
        out request after request in the order of `request_ids`, ``counts[i]`` tokens for request i;
        every entry after them (padding up to the padded token count) reads row 0 (gain 1).

        Raises:
            SteeringConfigError: a request the worker never saw (its sampling parameters passed no hook),
                more tokens than the slot map holds (refused at start-up, so only on a broken invariant).
        """
        import numpy as np
        import torch

        self._step += 1
        unknown = [r for r in request_ids if r not in self._digest_of_request]
        if unknown:
            raise SteeringConfigError(
                f"modality-steer: the runner scheduled requests whose steering no hook saw: {unknown[:3]}"
            )
        digests = [self._digest_of_request[r] for r in request_ids]
        needed = {d for d in digests if d is not None}
        for digest in needed:
            self._place(digest, needed)
        slots = np.array([0 if d is None else self._slot_of_digest[d] for d in digests], dtype=np.int32)
        counts = np.asarray(counts, dtype=np.int64)[: len(request_ids)]
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

    def scale(self, layer: int, output: Any) -> None:
        """Scale the heads of `layer`'s attention output in place (``[tokens(+padding), local_heads *
        head_dim]`` or ``[tokens, local_heads, head_dim]``), by the current step's slot map.

        Capture-safe: nothing here reads device memory back to the host (shapes, views and flags only;
        `check_arguments` skips its debug read-back while capturing), and every kernel variant was
        compiled at load (:func:`warm_up_kernel`). A FULL CUDA graph captures the launch with the slot map
        buffer, so it is captured even when no request of the capturing (dummy) step is steered.
        """
        import torch

        from ..kernels.head_scale import head_scale_

        table = self.tables.get(layer)
        if table is None:
            return
        capturing = output.is_cuda and torch.cuda.is_current_stream_capturing()
        if self.active or capturing:
            tokens = output.shape[0]
            head_scale_(output.view(tokens, self.local_heads, -1), self.slot_map[:tokens], table)


def warm_up_kernel(device: Any, dtype: Any, layers: list[Any], max_tokens: int) -> int:
    """Compile and launch every variant of the CUDA head-scaling kernel that `layers` (attention layers to
    be steered, with `num_heads`, `head_size`, optionally `head_size_v`) can hit in a step of up to
    `max_tokens` tokens of `dtype`; return the number of launches (0 off CUDA, where serving runs the
    torch path, or with no layer to steer).

    Called at load: vLLM's warm-up runs and CUDA-graph capture scale nothing (the slot map is cleared,
    :meth:`WorkerSteering.deactivate`), so without this the first call of each variant would be the one
    inside CUDA-graph capture, where compiling and loading a module is not allowed. The kernel sees the
    attention output as ``[tokens, num_heads, head_size_v]``.
    """
    import torch

    if torch.device(device).type != "cuda":
        return 0
    from ..kernels.head_scale import warm_up

    shapes = {(int(layer.num_heads), int(getattr(layer, "head_size_v", layer.head_size))) for layer in layers}
    return sum(warm_up(heads, head_dim, dtype, device, max_tokens) for heads, head_dim in sorted(shapes))


def not_armed_message(runner_class: str, facts: EngineFacts | None) -> str:
    """Why a worker whose runner was not set up for steering cannot serve (the handshake's answer)."""
    refusals = engine_refusals(facts, 0, 0) if facts is not None else []
    return (
        f"modality-steer: this worker's model runner ({runner_class}) was not set up for steering"
        f"{': ' + ', '.join(refusals) if refusals else ''}"
    )
