"""The vLLM adapter: its rows against the installed vLLM, the version gate, refusals by runner class, the
EngineCore boundary, and the Model Runner V2 hooks driven on vLLM's real V2 objects on CPU.

V2 cannot run as an engine on the CPU wheel (it needs Triton on a GPU), but its host-side objects build
here: the runner class itself (instantiated without `__init__`), `RequestState` (with the CPU `UvaBuffer`),
`SchedulerOutput`, `NewRequestData`, `InputBatch`. Each step runs vLLM's own methods in `execute_model`'s
order (`finish_requests` → `add_requests` → `update_requests` → `gather_batch_req_state`, which orders the
batch decode-first) and then `prepare_inputs`, whose Triton kernels stand in for by host code that lays
the batch out as vLLM's does (`query_start_loc_np` padded with `num_tokens`). The step with zero tokens
runs vLLM's real `execute_model`. Each step's gains are checked by running the attention wrapper on an
output of ones and comparing every token with the gains its request's spec means (`effective_gains`),
found by request id in the scheduler's output: independent of slots, digests and the batch order.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow  # imports vLLM

LAYERS, HEADS, HEAD_DIM = 2, 4, 32
MAX_REQS, MAX_TOKENS = 8, 64
SPECS = {
    "off": None,
    "image": "image",
    "text": "text",
    "block_text": '{"follow":"text","gain":0.0}',
    "raw": '{"heads":[[0,1,5.0],[1,2,0.5]]}',
}


# --------------------------------------------------------------------------------------------------
# The rows against the installed vLLM.
# --------------------------------------------------------------------------------------------------


def test_every_row_matches_the_installed_vllm():
    """Each row that applies to the installed vLLM: symbol present (imported at run time for callables and
    classes, found in the sources for fields and variables), parameters as the plugin expects."""
    import inspect

    from steer_server.serving.vllm_adapter import compat, table
    from steer_server.serving.vllm_adapter.hooks import installed_vllm_version, rows_for

    version = installed_vllm_version()
    results = compat.check_tree(compat.installed_tree())
    broken = [(r.row.key, r.detail) for r in results if r.status == "broken"]
    assert not broken, broken
    applying = rows_for(version)
    assert {r.row.key for r in results if r.status == "ok"} == {r.key for r in applying}
    for row in applying:
        if row.kind not in ("method", "classmethod", "function", "class"):
            continue
        _, _, raw = table.resolve(row)
        function = raw.__func__ if isinstance(raw, classmethod) else raw
        if row.params:
            names = list(
                inspect.signature(function.__init__ if isinstance(function, type) else function).parameters
            )
            assert names[: len(row.params)] == list(row.params), (row.key, names)


def test_the_source_check_sees_a_renamed_parameter_and_a_removed_module():
    """The check used by `make vllm-compat` fails on the kinds of change that broke 0.34: a parameter
    added before the ones the plugin passes, a module deleted, a field gone."""
    from steer_server.serving.vllm_adapter import compat
    from steer_server.serving.vllm_adapter.table import ROW_BY_KEY

    tree = compat.installed_tree()
    prepare = ROW_BY_KEY["v2.prepare_inputs"]
    path = tree.module_path(prepare.module)
    assert path is not None
    changed = dict(tree.files)
    changed[path] = changed[path].replace(
        "scheduler_output: SchedulerOutput,\n        batch_req_state", "batch_req_state"
    )
    assert compat.check_row(compat.SourceTree(changed, tree.version), prepare).status == "broken"
    v1_path = tree.module_path("vllm.v1.worker.gpu_model_runner")
    assert v1_path is not None
    gone = {k: v for k, v in tree.files.items() if k != v1_path}
    result = compat.check_row(compat.SourceTree(gone, tree.version), ROW_BY_KEY["v1._prepare_inputs"])
    assert (result.status, result.detail) == ("broken", "module vllm.v1.worker.gpu_model_runner is gone")
    # On a 0.34 tree the V1 rows do not apply: their module being gone is what the range says.
    result = compat.check_row(compat.SourceTree(gone, "0.34.0"), ROW_BY_KEY["v1._prepare_inputs"])
    assert result.status == "n/a" and "gone" in result.detail
    batch = ROW_BY_KEY["v2.input_batch.query_start_loc_np"]
    batch_path = tree.module_path(batch.module)
    assert batch_path is not None
    no_field = {**tree.files, batch_path: tree.files[batch_path].replace("query_start_loc_np", "qsl_np")}
    assert compat.check_row(compat.SourceTree(no_field, tree.version), batch).status == "broken"


# --------------------------------------------------------------------------------------------------
# Version gate, runners, EngineCore boundary.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "supported"),
    [
        ("0.32.0", True),
        ("0.32.0+cpu", True),
        ("0.33.0", True),
        ("0.34.0", True),
        ("0.34.2", True),
        ("0.31.9", False),
        ("0.35.0", False),
        ("0.35.0rc1", False),
        ("1.0.0", False),
        ("not-a-version", False),
    ],
)
def test_the_version_gate_names_the_installed_version_and_the_range(version, supported):
    from steer_server.serving.settings import SteeringConfigError
    from steer_server.serving.vllm_adapter.hooks import check_version

    if supported:
        assert check_version(version) == version
    else:
        with pytest.raises(
            SteeringConfigError, match=rf"supports vLLM >=0\.32,<0\.35 .*installed vLLM is {version}"
        ):
            check_version(version)


def test_register_refuses_an_unsupported_vllm_before_patching_anything(monkeypatch, tmp_path):
    """`register()` with a profile, under a faked `vllm.__version__`: refused by name, nothing installed."""
    import vllm

    from steer_server.serving import plugin
    from steer_server.serving.policy import policy
    from steer_server.serving.settings import SteeringConfigError, settings
    from steer_server.serving.vllm_adapter import table

    monkeypatch.setenv("MODALITY_STEER_PROFILE", str(_write_profile(tmp_path)))
    monkeypatch.setattr(vllm, "__version__", "0.35.1")
    settings.cache_clear()
    policy.cache_clear()
    try:
        with pytest.raises(SteeringConfigError, match=r"installed vLLM is 0\.35\.1"):
            plugin.register()
        assert not any(table.installed(row.key) for row in table.ROWS)
    finally:
        settings.cache_clear()
        policy.cache_clear()


def test_the_plugin_never_chooses_the_model_runner(v2_installed):
    """The user's choice of runner stands: the plugin neither sets nor reads VLLM_USE_V2_MODEL_RUNNER."""
    import os

    assert "VLLM_USE_V2_MODEL_RUNNER" not in os.environ
    source = "".join(p.read_text() for p in Path(v2_installed.__file__).parent.rglob("*.py"))
    assert "VLLM_USE_V2_MODEL_RUNNER" not in source


def test_unknown_and_overriding_runners_are_refused_by_class(v2_installed, monkeypatch):
    """A runner that is neither V1 nor V2, and a V2 subclass that overrides a hooked method past the
    plugin's wrapper, are refused at load, named."""
    from steer_server.serving.settings import SteeringConfigError

    hooks = v2_installed
    v2 = importlib.import_module("vllm.v1.worker.gpu.model_runner").GPUModelRunner

    class EncoderOnlyRunner:
        pass

    with pytest.raises(SteeringConfigError, match="EncoderOnlyRunner is neither vLLM's V1 nor V2 runner"):
        hooks.arm(EncoderOnlyRunner())

    class Overriding(v2):  # type: ignore[misc, valid-type]
        def prepare_inputs(self, *args: Any, **kwargs: Any) -> Any:
            return None

    runner = _runner(Overriding)
    with pytest.raises(SteeringConfigError, match=r"Overriding, which overrides prepare_inputs"):
        hooks.arm(runner)
    assert hooks.arm(_runner(v2)).facts.runner == "V2"


def test_install_is_idempotent_and_undone(v2_installed):
    from steer_server.serving.vllm_adapter import table

    v2 = importlib.import_module("vllm.v1.worker.gpu.model_runner").GPUModelRunner
    wrapped = {
        k: getattr(v2, k.split(".", 1)[1])
        for k in table.ROW_BY_KEY
        if k.startswith("v2.") and table.installed(k)
    }
    assert set(wrapped) == {
        "v2.load_model",
        "v2.add_requests",
        "v2._remove_request",
        "v2.prepare_inputs",
        "v2.execute_model",
        "v2._dummy_run",
        "v2.capture_model",
    }
    v2_installed.install()
    assert all(getattr(v2, k.split(".", 1)[1]) is f for k, f in wrapped.items())
    for key, function in wrapped.items():
        if key != "v2.prepare_inputs":  # stood in for by the fixture
            assert function.__wrapped__ is table.original(key)
    table.uninstall_all()
    for key, function in wrapped.items():
        assert getattr(v2, key.split(".", 1)[1]) is function.__wrapped__
        assert not getattr(function.__wrapped__, "_modality_steer", False)


def test_the_engine_core_wrapper_takes_0_34s_block_hashes_and_drops_them(v2_installed):
    """vLLM 0.34 calls `Request.from_engine_core_request(request, block_hasher, block_hashes)`; hashes
    computed before the EngineCore fold in the client's salt, so the wrapper passes None and the engine
    hashes the prompt again under the steering-derived salt."""
    from steer_server.serving.engine_core import steering_salt
    from steer_server.serving.vllm_adapter import table

    seen: list[tuple[Any, ...]] = []

    def fake_original(cls: Any, request: Any, block_hasher: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append((request.cache_salt, block_hasher, args, kwargs))
        return "built"

    request_cls = importlib.import_module("vllm.v1.request").Request
    previous = table.stand_in("engine.from_engine_core_request", fake_original)
    try:
        for args, kwargs in ((("frontend-hashes",), {}), ((), {"block_hashes": ["h"]}), ((), {})):
            request = SimpleNamespace(
                request_id="r",
                sampling_params=SimpleNamespace(extra_args={"modality_steer": "text"}),
                cache_salt="client",
                block_hashes=["h"],
                abort_immediately=False,
            )
            assert request_cls.from_engine_core_request(request, "hasher", *args, **kwargs) == "built"
            assert request.block_hashes is None
        salt = steering_salt("client", _gains("text"))
        assert seen == [
            (salt, "hasher", (None,), {}),
            (salt, "hasher", (), {"block_hashes": None}),
            (salt, "hasher", (), {}),
        ]
    finally:
        table.stand_in("engine.from_engine_core_request", previous)


# --------------------------------------------------------------------------------------------------
# Model Runner V2 on its real objects.
# --------------------------------------------------------------------------------------------------


def _write_profile(folder: Path) -> Path:
    path = folder / "profile.json"
    path.write_text(
        json.dumps(
            {
                "format": "modality-steer.profile/v1",
                "model": {
                    "architecture": "LlavaForConditionalGeneration",
                    "num_layers": LAYERS,
                    "num_heads": HEADS,
                    "head_dim": HEAD_DIM,
                },
                "default_gain": 3.0,
                "modes": {
                    "image": {
                        "heads": [
                            {"layer": 0, "head": 0, "score": 0.5},
                            {"layer": 1, "head": 1, "score": 0.4},
                        ]
                    },
                    "text": {"heads": [{"layer": 1, "head": 3, "score": 0.4}]},
                },
            }
        )
    )
    return path


def _gains(spec: str | None) -> dict[tuple[int, int], float]:
    """The reference: what a request's spec means, from the spec module alone."""
    from steer_server.serving.settings import settings

    plugin = settings()
    assert plugin is not None
    return plugin.gains_for(spec)


class _FakeAttention:
    """A decoder attention layer whose backend writes ones into `output`."""

    def __init__(self) -> None:
        self.num_heads, self.head_size = HEADS, HEAD_DIM
        self.impl = SimpleNamespace(forward=self._backend)

    @staticmethod
    def _backend(
        layer: Any,
        query: Any,
        key: Any,
        value: Any,
        kv_cache: Any,
        attn_metadata: Any,
        output: Any = None,
        **_: Any,
    ) -> Any:
        output.fill_(1.0)
        return output


def _runner(cls: type) -> Any:
    """An instance of a (real) V2 runner class, without `__init__`, holding vLLM's real `RequestState` and
    stand-ins for the GPU-side state its host-side methods touch."""
    from vllm.v1.worker.gpu.states import RequestState

    runner = object.__new__(cls)
    noop = lambda *args, **kwargs: None  # noqa: E731
    parallel = SimpleNamespace(
        data_parallel_index=0,
        data_parallel_rank=0,
        enable_dbo=False,
        ubatch_size=0,
        prefill_context_parallel_size=1,
    )
    model_config = SimpleNamespace(
        get_layers_start_end_indices=lambda _: (0, LAYERS),
        get_total_num_hidden_layers=lambda: LAYERS,
        dtype=torch.float32,
        use_mla=False,
        model="unused",
    )
    vars(runner).update(
        device=torch.device("cpu"),
        max_num_reqs=MAX_REQS,
        max_num_tokens=MAX_TOKENS,
        parallel_config=parallel,
        model_config=model_config,
        vllm_config=SimpleNamespace(
            parallel_config=parallel,
            model_config=model_config,
            compilation_config=SimpleNamespace(pass_config=None),
            speculative_config=None,
        ),
        model=SimpleNamespace(),
        speculator=None,
        req_states=RequestState(MAX_REQS, 256, MAX_TOKENS, 2, 100, torch.device("cpu")),
        model_state=SimpleNamespace(remove_request=noop, add_request=noop, apply_staged_writes=noop),
        block_tables=SimpleNamespace(append_block_ids=noop, apply_staged_writes=noop),
        lora_state=SimpleNamespace(remove_request=noop, add_request=noop),
        kv_connector=SimpleNamespace(no_forward=lambda so: "no forward"),
        pooling_runner=None,
        pp_handler=None,
        encoder_cache=None,
        prompt_logprobs_worker=None,
        adaptive_verification=None,
        pcp_manager=None,
        aux_output_connector=None,
        sampler=None,
        is_last_pp_rank=False,
        use_pp=False,
        decode_query_len=1,
    )
    # Triton-backed in vLLM; the host-side state they would copy to the device is what the hooks read.
    runner.req_states.apply_staged_writes = noop
    runner._merge_ec_connector_no_forward = lambda so, output: output
    return runner


def _host_prepare_inputs(
    runner: Any, scheduler_output: Any, batch_req_state: Any, batch_desc: Any, num_active_loras: int
) -> Any:
    """Stand-in for V2's `prepare_inputs` (whose input preparation runs Triton kernels): the `InputBatch`
    it returns, laid out as vLLM lays it out on the host (`vllm/v1/worker/gpu/model_runner.py`,
    `prepare_inputs`: `query_start_loc_np` is the cumulative token count, padded with `num_tokens` up to
    the padded request count and sliced there; `num_tokens_after_padding` from the batch descriptor)."""
    from vllm.v1.worker.gpu.input_batch import InputBatch, InputBuffers

    num_reqs = len(batch_req_state.req_ids)
    num_tokens = batch_req_state.num_tokens
    padded_reqs = batch_desc.num_reqs or num_reqs
    query_start_loc_np = np.empty(MAX_REQS + 1, dtype=np.int32)
    query_start_loc_np[0] = 0
    np.cumsum(batch_req_state.num_scheduled_tokens, out=query_start_loc_np[1 : num_reqs + 1])
    query_start_loc_np[num_reqs + 1 :] = num_tokens
    dummy = InputBatch.make_dummy(
        num_reqs, num_tokens, InputBuffers(MAX_REQS, MAX_TOKENS, torch.device("cpu"))
    )
    return dataclasses.replace(
        dummy,
        req_ids=list(batch_req_state.req_ids),
        num_reqs=num_reqs,
        num_reqs_after_padding=padded_reqs,
        idx_mapping_np=batch_req_state.idx_mapping_np,
        num_scheduled_tokens=batch_req_state.num_scheduled_tokens,
        num_tokens=num_tokens,
        num_tokens_after_padding=max(num_tokens, batch_desc.num_tokens),
        query_start_loc_np=query_start_loc_np[: padded_reqs + 1],
    )


@pytest.fixture
def v2_installed(monkeypatch, tmp_path) -> Iterator[Any]:
    """Every hook of the installed vLLM installed (the V2 runner's included), a profile configured, and
    vLLM's Triton-backed originals stood in for; everything undone afterwards."""
    from vllm.v1.worker.cpu import buffer_utils as cpu_buffers
    from vllm.v1.worker.gpu import buffer_utils as gpu_buffers

    from steer_server.serving.policy import policy
    from steer_server.serving.settings import settings
    from steer_server.serving.vllm_adapter import hooks, table

    monkeypatch.setattr(gpu_buffers, "UvaBuffer", cpu_buffers.UvaBuffer)
    monkeypatch.setenv("MODALITY_STEER_PROFILE", str(_write_profile(tmp_path)))
    monkeypatch.setenv("MODALITY_STEER_ALLOW_RAW_HEADS", "1")
    monkeypatch.delenv("VLLM_RAY_EXTRA_ENV_VAR_PREFIXES_TO_COPY", raising=False)
    monkeypatch.setattr(
        hooks, "decoder_attention_layers", lambda model: {n: _FakeAttention() for n in range(LAYERS)}
    )
    monkeypatch.setattr(hooks, "worker_place", _place)
    settings.cache_clear()
    policy.cache_clear()
    try:
        hooks.install()
        table.stand_in("v2.prepare_inputs", _host_prepare_inputs)
        yield hooks
    finally:
        table.uninstall_all()
        settings.cache_clear()
        policy.cache_clear()


def _place(runner: Any) -> Any:
    from steer_server.serving.worker import WorkerPlace

    return WorkerPlace(
        torch.device("cpu"), torch.float32, MAX_REQS, MAX_TOKENS, 0, 1, 0, 0, (0, LAYERS), LAYERS, "unused"
    )


class _Scheduler:
    """Builds V2 `SchedulerOutput`s as vLLM's scheduler hands them to the runner: new (and resumed)
    requests in `scheduled_new_reqs` with their sampling parameters, running ones as cached requests."""

    def __init__(self) -> None:
        self.prompt_len: dict[str, int] = {}
        self.computed: dict[str, int] = {}

    def step(
        self,
        scheduled: dict[str, int],
        new: dict[str, str | None] | None = None,
        finished: set[str] | None = None,
        preempted: set[str] | None = None,
        drafts: dict[str, list[int]] | None = None,
        prompt_len: dict[str, int] | None = None,
    ) -> Any:
        from vllm.sampling_params import SamplingParams
        from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput

        new = new or {}
        new_reqs = []
        for request_id, spec in new.items():
            length = (prompt_len or {}).get(request_id, self.prompt_len.get(request_id, 8))
            self.prompt_len[request_id] = length
            self.computed.setdefault(request_id, 0)
            params = SamplingParams(max_tokens=16, extra_args={"modality_steer": spec} if spec else None)
            new_reqs.append(
                NewRequestData(
                    req_id=request_id,
                    prompt_token_ids=list(range(length)),
                    mm_features=[],
                    sampling_params=params,
                    pooling_params=None,
                    block_ids=([0],),
                    num_computed_tokens=self.computed[request_id],
                    lora_request=None,
                    prefill_token_ids=list(range(length)),
                )
            )
        cached = [r for r in scheduled if r not in new]
        cached_data = CachedRequestData.make_empty()
        cached_data.req_ids = cached
        cached_data.num_computed_tokens = [self.computed[r] for r in cached]
        cached_data.new_block_ids = [None] * len(cached)
        output = SchedulerOutput.make_empty()
        output.scheduled_new_reqs = new_reqs
        output.scheduled_cached_reqs = cached_data
        output.num_scheduled_tokens = dict(scheduled)
        output.total_num_scheduled_tokens = sum(scheduled.values())
        output.scheduled_spec_decode_tokens = drafts or {}
        output.finished_req_ids = set(finished or ())
        output.preempted_req_ids = set(preempted) if preempted else None
        for request_id, count in scheduled.items():
            self.computed[request_id] += count
        return output


def _run_step(
    runner: Any, scheduler_output: Any, padded_tokens: int | None = None, padded_reqs: int | None = None
) -> Any:
    """vLLM's `execute_model` order up to the forward, then each layer's wrapped attention on ones."""
    runner.finish_requests(scheduler_output)
    runner.add_requests(scheduler_output)
    runner.update_requests(scheduler_output)
    batch_req_state, _ = runner.gather_batch_req_state(scheduler_output, False)
    batch_desc = SimpleNamespace(num_tokens=padded_tokens or batch_req_state.num_tokens, num_reqs=padded_reqs)
    input_batch = runner.prepare_inputs(scheduler_output, batch_req_state, batch_desc, 0)
    return input_batch, _forward(runner, input_batch.num_tokens_after_padding)


def _forward(runner: Any, tokens: int) -> dict[int, torch.Tensor]:
    """Each steered layer's attention output ([tokens, heads, head_dim] of ones through the backend) after
    the plugin's wrapper: the gain each token's heads got."""
    state = runner._modality_steer
    gains = {}
    for layer, module in state.layers.items():
        output = torch.zeros(tokens, HEADS * HEAD_DIM)
        module.impl.forward(None, None, None, None, None, None, output=output)
        gains[layer] = output.view(tokens, HEADS, HEAD_DIM)[:, :, 0]
    return gains


def _expected(
    scheduler_output: Any, input_batch: Any, specs: dict[str, str | None]
) -> dict[int, torch.Tensor]:
    """Every token's gains from its request's spec. Each request's tokens are found by its id: it is the
    only span of the batch whose length is its scheduled count (asserted), the spans tile the batch's
    tokens in order, and everything after them is padding (gain 1)."""
    tokens = input_batch.num_tokens_after_padding
    expected = {layer: torch.ones(tokens, HEADS) for layer in range(LAYERS)}
    start = 0
    for request_id, end in zip(input_batch.req_ids, input_batch.query_start_loc_np[1:], strict=False):
        assert end - start == scheduler_output.num_scheduled_tokens[request_id]
        for (layer, head), gain in _gains(specs[request_id]).items():
            expected[layer][start:end, head] = gain
        start = int(end)
    assert start == scheduler_output.total_num_scheduled_tokens == input_batch.num_tokens
    assert sorted(input_batch.req_ids) == sorted(scheduler_output.num_scheduled_tokens)
    return expected


def _assert_gains(got: dict[int, torch.Tensor], expected: dict[int, torch.Tensor]) -> None:
    for layer in expected:
        want = expected[layer]
        have = got.get(layer, torch.ones_like(want))  # an unsteered layer scales nothing
        assert torch.equal(have, want), (layer, have, want)


def test_v2_steps_map_every_token_to_its_requests_gains(v2_installed):
    """Prefills and decodes reordered decode-first, several configurations in one step, padding up to
    the padded token count, chunked prefill, speculative verification tokens, preemption and resume, a
    streaming re-add with new parameters, finishing, and a step with zero scheduled tokens (vLLM's real
    `execute_model`), each compared token by token with the reference."""
    v2 = importlib.import_module("vllm.v1.worker.gpu.model_runner").GPUModelRunner
    runner = _runner(v2)
    v2_installed.arm(runner)
    state = runner._modality_steer
    scheduler = _Scheduler()
    specs = {
        "a": SPECS["image"],
        "b": SPECS["off"],
        "c": SPECS["text"],
        "d": SPECS["raw"],
        "e": SPECS["block_text"],
    }

    def step(
        *args: Any, padded_tokens: int | None = None, padded_reqs: int | None = None, **kwargs: Any
    ) -> Any:
        output = scheduler.step(*args, **kwargs)
        input_batch, got = _run_step(runner, output, padded_tokens, padded_reqs)
        _assert_gains(got, _expected(output, input_batch, specs))
        return input_batch

    # 1. Three prefills of different lengths, two of them chunked (prompt 20, 12 tokens scheduled).
    batch = step(
        {"a": 12, "b": 5, "c": 7}, new={r: specs[r] for r in "abc"}, prompt_len={"a": 20, "b": 5, "c": 7}
    )
    assert batch.req_ids == ["b", "c", "a"]  # prefills by length, not in scheduler order
    # 2. b and c decode, a's prefill goes on (chunked), d and e arrive; padded to 32 tokens and 8 rows.
    batch = step(
        {"a": 8, "b": 1, "c": 1, "d": 6, "e": 3},
        new={r: specs[r] for r in "de"},
        prompt_len={"d": 6, "e": 3},
        padded_tokens=32,
        padded_reqs=8,
    )
    assert batch.req_ids[:2] == ["b", "c"] and batch.num_tokens_after_padding == 32
    assert state.slots_in_use == 4  # image, text, raw, block_text: one row each
    # 3. Speculative verification: c and d carry draft tokens (1 + drafts each), sorted first.
    batch = step({"a": 1, "b": 1, "c": 3, "d": 2, "e": 1}, drafts={"c": [5, 6], "d": [7]})
    assert batch.req_ids[:2] == ["d", "c"]  # by length among the verifying requests
    # 4. a and e preempted: they leave the runner, their rows are freed if no one else holds them.
    step({"b": 1, "c": 1, "d": 1}, preempted={"a", "e"})
    assert not state.is_tracked("a") and not state.is_tracked("e")
    assert state.slots_in_use == 2  # text (c), raw (d)
    # 5. a resumes through `scheduled_new_reqs` (recomputing its tokens) with its sampling parameters.
    step({"a": 21, "b": 1, "c": 1, "d": 1}, new={"a": specs["a"]}, prompt_len={"a": 21})
    # 6. A streaming re-add: c comes back as a new request with other parameters (off → image).
    specs["c"] = SPECS["image"]
    batch = step({"a": 1, "b": 1, "c": 4, "d": 1}, new={"c": specs["c"]}, prompt_len={"c": 14})
    assert state.slots_in_use == 2  # image (a, c), raw (d): text's row was freed with the re-add
    # 7. d finishes on a step that schedules no token: vLLM's real execute_model returns before the
    # forward; d's configuration is released all the same.
    empty = scheduler.step({}, finished={"d"})
    assert runner.execute_model(empty) == "no forward"
    assert not state.is_tracked("d") and state.slots_in_use == 1
    # 8. Unsteered only: the map is off.
    step({"b": 1}, finished={"a", "c"})
    assert not state.active and state.slots_in_use == 0
    assert state.state()["runner"] == "V2" and state.state()["requests_tracked"] == 1


@pytest.mark.parametrize(
    "entry", ["_dummy_run", "execute_model_dummy", "execute_model_profile", "capture_model"]
)
def test_v2_dummy_runs_and_graph_capture_scale_nothing(v2_installed, entry):
    """After a steered step the map holds that step's slots; `_dummy_run`, `execute_model(dummy_run=True)`
    or profiling, and CUDA-graph capture (which in V2 does not go through `_dummy_run`) must not apply
    them. vLLM's originals need a GPU: they stand in by a forward of the steered layers."""
    from steer_server.serving.vllm_adapter import table

    v2 = importlib.import_module("vllm.v1.worker.gpu.model_runner").GPUModelRunner
    runner = _runner(v2)
    v2_installed.arm(runner)
    scheduler = _Scheduler()
    _run_step(runner, scheduler.step({"a": 4}, new={"a": SPECS["image"]}, prompt_len={"a": 4}))
    assert runner._modality_steer.active
    seen: list[dict[int, torch.Tensor]] = []
    key = {"_dummy_run": "v2._dummy_run", "capture_model": "v2.capture_model"}.get(entry, "v2.execute_model")
    previous = table.stand_in(key, lambda self, *args, **kwargs: seen.append(_forward(self, 4)))
    try:
        if entry == "_dummy_run":
            runner._dummy_run(4)
        elif entry == "execute_model_dummy":
            runner.execute_model(scheduler.step({}), None, True)  # dummy_run passed by position
        elif entry == "execute_model_profile":
            runner.execute_model(scheduler.step({}), dummy_run=False, is_profile=True)
        else:
            runner.capture_model()
    finally:
        table.stand_in(key, previous)
    assert all(torch.equal(g, torch.ones_like(g)) for g in seen[0].values())
    assert not runner._modality_steer.active and not runner._modality_steer.slot_map.any()


def test_v2_a_request_no_hook_saw_is_refused_not_served_unsteered(v2_installed):
    """A batch row whose request never passed `add_requests` (its steering unknown) stops the step."""
    from steer_server.serving.settings import SteeringConfigError

    v2 = importlib.import_module("vllm.v1.worker.gpu.model_runner").GPUModelRunner
    runner = _runner(v2)
    v2_installed.arm(runner)
    from steer_server.serving.vllm_adapter import table

    batch = SimpleNamespace(req_ids=["ghost"], query_start_loc_np=np.array([0, 2]), num_tokens=2)
    table.stand_in("v2.prepare_inputs", lambda *args, **kwargs: batch)
    with pytest.raises(SteeringConfigError, match="no hook saw"):
        runner.prepare_inputs(None, None, None, 0)


def test_v2_token_spans_that_do_not_cover_the_batch_are_refused(v2_installed):
    """Adaptive draft verification reallocates spans on the GPU: the host-side spans then disagree with
    `num_tokens`, and the map is refused rather than built wrong."""
    from steer_server.serving.settings import SteeringConfigError

    for starts, tokens in (([0, 3, 5], 4), ([1, 3], 3), ([0, 4, 2], 2)):
        batch = SimpleNamespace(
            req_ids=["a", "b"][: len(starts) - 1], query_start_loc_np=np.array(starts), num_tokens=tokens
        )
        with pytest.raises(SteeringConfigError, match="do not cover"):
            v2_installed.token_spans(batch)


def test_the_state_method_is_added_to_workers_and_removed():
    from steer_server.serving.settings import WORKER_STATE_METHOD
    from steer_server.serving.vllm_adapter import hooks, table

    worker_base = importlib.import_module("vllm.v1.worker.worker_base").WorkerBase
    table.add_attribute("worker.state_method", WORKER_STATE_METHOD, hooks.report_worker_state)
    assert getattr(worker_base, WORKER_STATE_METHOD) is hooks.report_worker_state
    table.uninstall("worker.state_method")
    assert not hasattr(worker_base, WORKER_STATE_METHOD)


def test_v2_a_speculator_running_the_targets_attention_is_refused(v2_installed, monkeypatch):
    """V2 keeps its drafter in `runner.speculator` (V1 in `runner.drafter`): an MTP-style speculator whose
    model runs the target's attention layers is found there and refused at load, by method."""
    from steer_server.serving.settings import SteeringConfigError

    v2 = importlib.import_module("vllm.v1.worker.gpu.model_runner").GPUModelRunner
    runner = _runner(v2)
    layers = {n: _FakeAttention() for n in range(LAYERS)}
    monkeypatch.setattr(v2_installed, "decoder_attention_layers", lambda model: layers)
    runner.speculator = SimpleNamespace(
        model=SimpleNamespace(named_modules=lambda: [("mtp.layers.0.self_attn.attn", layers[1])])
    )
    runner.vllm_config.speculative_config = SimpleNamespace(method="mtp", enable_adaptive_verification=False)
    with pytest.raises(SteeringConfigError, match=r"method 'mtp'.*mtp\.layers\.0\.self_attn\.attn"):
        v2_installed.arm(runner)
