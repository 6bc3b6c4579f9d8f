"""The CUDA serving path, made correct by construction and checked here on CPU where it can be, on a GPU
where it must be (`gpu` marker):

- the slot map's host staging: two host buffers alternating per step, pinned on CUDA, and a buffer is
  rewritten only after the copy that last read it has completed;
- every Triton kernel variant the serving path can hit is compiled (and launched) at load, so that a
  sweep of serving calls afterwards compiles nothing (Triton's own cache keys, computed on CPU with a
  stand-in driver; and the real kernel cache on a GPU);
- the debug range check never reads the slot map back while a CUDA stream is capturing, and a captured
  graph replays the kernel with whatever the slot map holds.

Module level needs only torch, triton and pytest (the GPU tests run on machines without vLLM or pydantic);
the tests of the worker import it inside.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import triton
from steer_server.kernels import head_scale
from steer_server.kernels.head_scale import (
    SlotMapStaging,
    check_arguments,
    head_scale_,
    head_scale_reference,
    warm_up,
    warm_up_token_counts,
)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # on CPU: Triton's interpreter (conftest)


def slots(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32)


# --------------------------------------------------------------------------------------------------
# The slot map's host staging
# --------------------------------------------------------------------------------------------------


def test_staging_alternates_two_plain_host_buffers_on_cpu(monkeypatch):
    def no_events() -> Any:
        raise AssertionError("no CUDA event on a CPU device")

    monkeypatch.setattr(torch.cuda, "Event", no_events)
    staging = SlotMapStaging(8, "cpu")
    first, second = staging.host
    assert not staging.pinned and not first.is_pinned() and not second.is_pinned()
    assert first.data_ptr() != second.data_ptr()
    steps = [slots(1, 1, 2, 2, 2), slots(3, 0, 1), slots(2), slots(), slots(1, 2, 3, 1, 2, 3, 1, 2)]
    for step, per_token in enumerate(steps):
        before = [buffer.clone() for buffer in staging.host]
        staging.stage(per_token)
        written = step % 2  # buffers alternate: 0, 1, 0, 1, ...
        assert torch.equal(staging.host[1 - written], before[1 - written]), step  # the other is untouched
        n = len(per_token)
        assert torch.equal(staging.host[written][:n], per_token), step
        expected = torch.zeros(8, dtype=torch.int32)
        expected[:n] = per_token
        assert torch.equal(staging.slot_map, expected), step  # entries of earlier, longer steps zeroed
    staging.clear()
    assert not staging.slot_map.any()


def test_staging_clear_zeroes_only_the_used_extent():
    staging = SlotMapStaging(6, "cpu")
    staging.stage(slots(1, 2, 3))
    staging.slot_map[5] = 7  # beyond the staged extent: clear() must not pay for it
    staging.clear()
    assert staging.slot_map.tolist() == [0, 0, 0, 0, 0, 7]


def test_staging_waits_for_the_copy_that_last_read_a_buffer_before_rewriting_it():
    """With events (CUDA), a host buffer is rewritten only after waiting for the event recorded after the
    copy that read it two steps ago; the wait comes before any write into the buffer."""
    log: list[tuple[Any, ...]] = []

    class Event:
        def __init__(self) -> None:
            self.index = len([e for e in log if e[0] == "new"])
            log.append(("new", self.index))

        def record(self) -> None:
            log.append(("record", self.index))

        def synchronize(self) -> None:
            log.append(("sync", self.index, staging.host[self.index].tolist()))

    staging = SlotMapStaging(4, "cpu", events=Event)
    for per_token in (slots(1, 1), slots(2, 2, 2), slots(3)):
        staging.stage(per_token)
    assert log == [
        ("new", 0),
        ("new", 1),
        ("sync", 0, [0, 0, 0, 0]),
        ("record", 0),
        ("sync", 1, [0, 0, 0, 0]),
        ("record", 1),
        ("sync", 0, [1, 1, 0, 0]),  # waited while buffer 0 still held step 1's map, read by its copy
        ("record", 0),
    ]
    assert staging.slot_map.tolist() == [3, 0, 0, 0]


@pytest.mark.parametrize(
    "per_token",
    [
        torch.zeros(3, dtype=torch.int64),
        torch.zeros(5, dtype=torch.int32),
        torch.zeros(1, 2, dtype=torch.int32),
    ],
    ids=["int64", "too-long", "2-d"],
)
def test_staging_rejects_bad_maps(per_token):
    with pytest.raises(ValueError, match="per_token must be"):
        SlotMapStaging(4, "cpu").stage(per_token)


@pytest.mark.gpu
@needs_cuda
def test_staging_host_buffers_are_pinned_on_cuda():
    staging = SlotMapStaging(64, "cuda")
    assert staging.pinned and staging.slot_map.is_cuda
    assert all(buffer.is_pinned() for buffer in staging.host)
    assert staging.host[0].data_ptr() != staging.host[1].data_ptr()


@pytest.mark.gpu
@needs_cuda
def test_staging_keeps_each_step_map_while_the_stream_lags():
    """The host runs ahead of a busy stream (as under vLLM's async scheduling): each step's forward,
    modelled by a stream-ordered snapshot of the slot map, must see that step's map. Rewriting a pinned
    host buffer before its pending copy ran would hand step 1 the map of step 3."""
    staging = SlotMapStaging(8, "cuda")
    steps = [slots(1, 1, 1, 1), slots(2, 2), slots(3, 3, 3)]
    seen = []
    torch.cuda._sleep(200_000_000)  # keeps the stream busy while the host stages the next steps
    for per_token in steps:
        staging.stage(per_token)
        seen.append(staging.slot_map.clone())
    torch.cuda.synchronize()
    for per_token, got in zip(steps, seen, strict=True):
        expected = torch.zeros(8, dtype=torch.int32)
        expected[: len(per_token)] = per_token
        assert torch.equal(got.cpu(), expected)


# --------------------------------------------------------------------------------------------------
# Warm-up at load: every kernel variant compiled before CUDA-graph capture
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head_dim", [32, 80, 128, 256])
@pytest.mark.parametrize("max_tokens", [1, 5, 64, 100, 300, 2048, 8192])
def test_warm_up_token_counts_cover_every_block_t(head_dim, max_tokens):
    block_d = triton.next_power_of_2(head_dim)
    reached = {head_scale._block_t(block_d, n) for n in range(1, max_tokens + 1)}
    variants = warm_up_token_counts(head_dim, max_tokens)
    assert set(variants) == reached
    for block_t, count in variants.items():
        assert 1 <= count <= max_tokens and head_scale._block_t(block_d, count) == block_t


# Triton's cache key of each launch, computed by Triton itself with a stand-in CUDA driver (no GPU needed):
# `JITFunction.run` binds the arguments, specialises them and looks the key up; the `jit_cache_hook`
# sees every key about to be compiled and, returning True, skips the compilation (and the launch).
KEYS_SCRIPT = """
import json, sys
import torch
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.runtime import driver


class StandInDriver:
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


driver.set_active(StandInDriver())
keys = []


def record(*, key, **_):
    keys.append(repr(key))
    return True


knobs.runtime.jit_cache_hook = record
from steer_server.kernels import head_scale

heads, head_dim, max_tokens = (int(x) for x in sys.argv[1:4])
dtype = getattr(torch, sys.argv[4])
launches = head_scale.warm_up(heads, head_dim, dtype, "cpu", max_tokens)
warm, keys[:] = list(keys), []
# What the worker's wrapper passes: the attention output vLLM allocates for the step ([T, H*D] or
# [T, H, D]), viewed as [T, H, D]; the persistent slot map's prefix; a table of max_num_reqs + 1 rows
# (deployments differ: 16 and 257 rows).
slot_map = torch.zeros(max_tokens, dtype=torch.int32)
for rows in (16, 257):
    table = torch.ones(rows, heads)
    for tokens in range(1, max_tokens + 1):
        for shape in ((tokens, heads * head_dim), (tokens, heads, head_dim)):
            output = torch.empty(shape, dtype=dtype)
            head_scale.head_scale_triton_(output.view(tokens, heads, -1), slot_map[:tokens], table)
print("RESULTS " + json.dumps({"launches": launches, "warm": warm, "serving": keys}))
"""


def triton_keys(heads: int, head_dim: int, max_tokens: int, dtype: str) -> dict[str, Any]:
    env = {
        k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"
    }  # the real JIT, not the interpreter
    done = subprocess.run(
        [sys.executable, "-c", KEYS_SCRIPT, str(heads), str(head_dim), str(max_tokens), dtype],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULTS ")), None)
    assert line is not None, done.stdout[-2000:] + done.stderr[-3000:]
    return dict(json.loads(line.removeprefix("RESULTS ")))


@pytest.mark.parametrize(
    ("heads", "head_dim", "max_tokens", "dtype"),
    [(4, 32, 100, "bfloat16"), (32, 128, 300, "float16"), (6, 80, 129, "float32")],
)
def test_warm_up_compiles_every_variant_serving_can_hit(heads, head_dim, max_tokens, dtype):
    """After `warm_up`, serving calls with 1..max_tokens tokens (both output layouts, tables of two
    deployments' sizes) need no key the warm-up did not compile; the warm-up launched each variant
    (BLOCK_T) exactly once."""
    got = triton_keys(heads, head_dim, max_tokens, dtype)
    warm, serving = got["warm"], got["serving"]
    assert got["launches"] == len(warm) == len(set(warm)) == len(warm_up_token_counts(head_dim, max_tokens))
    assert set(serving) <= set(warm), sorted(set(serving) - set(warm))[:3]


def test_warm_up_launches_each_block_t_once(monkeypatch):
    """The launches themselves (interpreted on CPU, compiled on CUDA): one per BLOCK_T, each with the
    serving layout (a contiguous [T, H*D] buffer viewed as [T, H, D]) and every token steered."""
    launched: list[int] = []
    real = head_scale.head_scale_triton_

    def spy(out: torch.Tensor, slot: torch.Tensor, table: torch.Tensor) -> None:
        assert out.is_contiguous() and out.stride() == (4 * 32, 32, 1)
        assert (table[slot.long()] != 1.0).all()  # the kernel's full path: load, scale, store
        real(out, slot, table)
        launched.append(out.shape[0])

    monkeypatch.setattr(head_scale, "head_scale_triton_", spy)
    count = warm_up(4, 32, torch.bfloat16, KERNEL_DEVICE, 300)
    variants = warm_up_token_counts(32, 300)
    assert count == len(launched) == len(variants) == 9  # BLOCK_T 1, 2, 4, ..., 256
    assert launched == list(variants.values())
    with pytest.raises(ValueError, match="out must be float16, bfloat16 or float32"):
        warm_up(4, 32, torch.float64, KERNEL_DEVICE, 8)


@pytest.mark.gpu
@needs_cuda
def test_after_warm_up_a_serving_sweep_compiles_nothing_on_cuda(monkeypatch):
    """The real kernel cache on a GPU: `warm_up` compiles exactly its variants (a head shape no other test
    uses, so none is cached yet), and serving calls of every token count compile none."""
    from triton import knobs

    compiled: list[str] = []

    def record(*, key: Any, **_: Any) -> None:
        compiled.append(repr(key))

    monkeypatch.setattr(knobs.runtime, "jit_post_compile_hook", record)
    heads, head_dim, max_tokens = 12, 96, 600  # 12 heads: no other test's shape
    launches = warm_up(heads, head_dim, torch.bfloat16, "cuda", max_tokens)
    assert launches == len(compiled) == len(warm_up_token_counts(head_dim, max_tokens))
    compiled.clear()
    slot_map = torch.zeros(max_tokens, dtype=torch.int32, device="cuda")
    slot_map[::3] = 1
    table = torch.ones(257, heads, device="cuda")
    table[1] = 0.5
    for tokens in range(1, max_tokens + 1):
        output = torch.randn(tokens, heads * head_dim, device="cuda").to(torch.bfloat16)
        expected = head_scale_reference(output, slot_map[:tokens], table)
        head_scale_(output.view(tokens, heads, -1), slot_map[:tokens], table)
        assert torch.equal(output.view(tokens, heads, head_dim), expected), tokens
    assert compiled == []


# --------------------------------------------------------------------------------------------------
# No host synchronisation while a stream is capturing
# --------------------------------------------------------------------------------------------------


class LooksCuda(torch.Tensor):
    """A CPU tensor that reports itself as CUDA and fails any read-back of its extremes."""

    @property
    def is_cuda(self) -> bool:  # type: ignore[override]
        return True

    def min(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        raise AssertionError("slot.min() read back to the host")

    def max(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        raise AssertionError("slot.max() read back to the host")


def test_debug_range_check_is_skipped_while_capturing(monkeypatch):
    monkeypatch.setenv("MODALITY_STEER_DEBUG", "1")
    out, table = torch.zeros(3, 2, 8), torch.ones(2, 2)
    slot = slots(0, 1, 1).as_subclass(LooksCuda)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    with pytest.raises(AssertionError, match="read back"):  # not capturing: the check reads the range
        check_arguments(out, slot, table)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert check_arguments(out, slot, table).shape == (3, 2, 8)  # capturing: no read-back
    # Host tensors are checked whatever a CUDA stream does.
    with pytest.raises(IndexError, match="slot values must lie"):
        check_arguments(out, slots(0, 1, 2), table)


@pytest.mark.gpu
@needs_cuda
def test_captured_graph_replays_head_scale_with_the_current_slot_map(monkeypatch):
    """With debug checks on, capture `head_scale_` as the worker calls it (a prefix of a persistent slot
    map) in a CUDA graph, then replay it after rewriting the slot map in place: each replay equals the
    reference for the map it read."""
    monkeypatch.setenv("MODALITY_STEER_DEBUG", "1")
    heads, head_dim, tokens, dtype = 4, 64, 24, torch.bfloat16
    warm_up(heads, head_dim, dtype, "cuda", 64)
    gen = torch.Generator().manual_seed(3)
    source = torch.randn(tokens, heads * head_dim, generator=gen).to(dtype).cuda()
    table = (torch.rand(3, heads, generator=gen) * 4.0).cuda()
    table[0] = 1.0
    out = source.clone()
    slot_map = torch.zeros(64, dtype=torch.int32, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        head_scale_(out.view(tokens, heads, -1), slot_map[:tokens], table)
    patterns = [
        torch.randint(0, 3, (tokens,), generator=gen, dtype=torch.int32),
        torch.zeros(tokens, dtype=torch.int32),
        torch.full((tokens,), 2, dtype=torch.int32),
    ]
    for pattern in patterns:
        out.copy_(source)
        slot_map[:tokens].copy_(pattern)
        graph.replay()
        torch.cuda.synchronize()
        expected = head_scale_reference(source, pattern.cuda(), table)
        assert torch.equal(out.view(tokens, heads, head_dim), expected)


# --------------------------------------------------------------------------------------------------
# The worker: staging and warm-up wired in at load
# --------------------------------------------------------------------------------------------------


def test_worker_warms_up_the_kernel_on_cuda_only(monkeypatch):
    from steer_server.serving import worker

    calls: list[tuple[Any, ...]] = []

    def fake_warm_up(*args: Any) -> int:
        calls.append(args)
        return 7

    monkeypatch.setattr(head_scale, "warm_up", fake_warm_up)
    layers = [
        SimpleNamespace(num_heads=4, head_size=32),
        SimpleNamespace(num_heads=4, head_size=32),
        SimpleNamespace(num_heads=4, head_size=64, head_size_v=48),  # the output's width is head_size_v
    ]
    assert worker.warm_up_kernel(torch.device("cpu"), torch.bfloat16, layers, 512) == 0
    assert calls == []
    cuda = torch.device("cuda", 1)
    assert worker.warm_up_kernel(cuda, torch.bfloat16, layers, 512) == 14
    assert calls == [(4, 32, torch.bfloat16, cuda, 512), (4, 48, torch.bfloat16, cuda, 512)]
    assert worker.warm_up_kernel(cuda, torch.bfloat16, [], 512) == 0  # nothing steered on this stage


def test_worker_stages_the_slot_map_and_warms_up_at_load(monkeypatch, tmp_path):
    """`WorkerSteering` (what the adapter builds when the model loads): it hands its device, the model's
    dtype, the steered layers and the step's token limit to the warm-up, and each step's slot map goes
    through the two alternating host buffers."""
    from steer_server.profile import load_profile
    from steer_server.serving import worker
    from steer_server.serving.settings import PluginSettings

    profile_path = tmp_path / "profile.json"
    profile_path.write_text(
        json.dumps(
            {
                "format": "modality-steer.profile/v1",
                "model": {
                    "architecture": "LlavaForConditionalGeneration",
                    "num_layers": 2,
                    "num_heads": 4,
                    "head_dim": 32,
                },
                "default_gain": 3.0,
                "modes": {
                    "image": {"heads": [{"layer": 1, "head": 0, "score": 0.5}]},
                    "text": {"heads": [{"layer": 1, "head": 3, "score": 0.4}]},
                },
            }
        )
    )
    plugin = PluginSettings(profile_path, load_profile(profile_path), max_gain=8.0, allow_raw_heads=False)
    layers = {n: SimpleNamespace(num_heads=4, head_size=32) for n in (0, 1)}
    warmed: list[tuple[Any, ...]] = []
    monkeypatch.setattr(worker, "warm_up_kernel", lambda *args: warmed.append(args) or 3)
    place = worker.WorkerPlace(
        device=torch.device("cpu"),
        dtype=torch.bfloat16,
        max_num_reqs=4,
        max_num_tokens=16,
        tp_rank=0,
        tp_size=1,
        pp_rank=0,
        dp_rank=0,
        stage_layers=(0, 2),
        total_layers=2,
        model_path=str(tmp_path),
    )
    facts = worker.EngineFacts("V2", "test.Runner", False, False, False, False, False, 1)
    state = worker.WorkerSteering(place, plugin, layers, facts)
    assert warmed == [(torch.device("cpu"), torch.bfloat16, [layers[1]], 16)]
    assert state.kernel_variants == 3 and state.steered_layers == [1]

    for request_id, spec in (("a", "image"), ("b", None), ("c", "text")):
        state.track(request_id, {"modality_steer": spec} if spec else {})
    staging = state._staging
    assert state.slot_map is staging.slot_map
    host_ptrs = [buffer.data_ptr() for buffer in staging.host]
    written = []
    for order, counts in ((["a", "b", "c"], [3, 2, 1]), (["c", "a"], [1, 1]), (["b", "a"], [4, 2])):
        before = [buffer.clone() for buffer in staging.host]
        state.set_step(order, counts)
        written.append([not torch.equal(b, buffer) for b, buffer in zip(before, staging.host, strict=True)])
        expected = [
            0 if r == "b" else state.slot_of(r) for r, n in zip(order, counts, strict=True) for _ in range(n)
        ]
        assert state.active and state.slot_map.tolist() == expected + [0] * (16 - len(expected))
    assert written == [[True, False], [False, True], [True, False]]
    assert [buffer.data_ptr() for buffer in staging.host] == host_ptrs
    state.deactivate()
    assert not state.active and not state.slot_map.any()
