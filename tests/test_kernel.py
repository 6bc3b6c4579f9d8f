"""head_scale_: the Triton kernel (interpreted on CPU, compiled on CUDA) and the torch path against the
reference definition, over dtypes, shapes, strides and slots."""

from __future__ import annotations

import os
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from steer_server.kernels.head_scale import (
    MAX_HEADS,
    MAX_TOKENS,
    head_scale_,
    head_scale_reference,
    head_scale_torch_,
    head_scale_triton_,
)

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HEAD_DIMS = (32, 64, 80, 96, 112, 128, 256)
IMPLEMENTATIONS = {"torch": head_scale_torch_, "triton": head_scale_triton_, "op": head_scale_}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# Triton runs CPU tensors only in its interpreter, which conftest switches on where torch sees no GPU.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture(autouse=True)
def _triton_on_cpu_needs_the_interpreter(request):
    params = getattr(request.node, "callspec", None)
    params = params.params if params else {}
    runs_triton_on_cpu = params.get("name") == "triton" and params.get("device", "cpu") == "cpu"
    if (runs_triton_on_cpu or request.node.name.startswith("test_triton_")) and not INTERPRETED:
        pytest.skip("Triton runs CPU tensors only under TRITON_INTERPRET=1 (set where torch sees no GPU)")


def make_case(tokens, heads, head_dim, slots, dtype, layout, seed, device="cpu"):
    """A buffer with padding around the [T, H, D] region, a slot map using every slot, and a table."""
    gen = torch.Generator().manual_seed(seed)
    pad = 24 if layout == "padded" else 0
    # "3d" and "flat" are contiguous [T, H*D]; "padded" rows are longer, as in vLLM's padded views.
    storage = torch.randn(tokens, heads * head_dim + pad, generator=gen).to(dtype)
    slot = torch.randint(0, slots, (tokens,), generator=gen, dtype=torch.int32)
    if tokens:
        slot[0] = 0
    table = torch.rand(slots, heads, generator=gen) * 4.0
    table[0] = 1.0
    if slots > 1:
        table[1, 0] = 0.0  # a blocked head
    return storage.to(device), slot.to(device), table.to(device)


def expected_result(name, device, before_view, slot, table):
    """The reference; except that Triton's CPU interpreter casts float32 to bfloat16 by truncation where
    GPUs round to nearest even, so there (and only there) the exact expectation is the truncated product."""
    interpreted = name == "triton" and device == "cpu"
    if not (interpreted and before_view.dtype == torch.bfloat16):
        return head_scale_reference(before_view, slot, table)
    heads = before_view.reshape(
        before_view.shape[0],
        table.shape[1],
        before_view.shape[-1] // (table.shape[1] if before_view.dim() == 2 else 1),
    )
    product = heads.float() * table[slot.long()][:, :, None]
    return (product.view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)


def view_of(storage, heads, head_dim, layout):
    return (
        storage.view(storage.shape[0], heads, head_dim) if layout == "3d" else storage[:, : heads * head_dim]
    )


def test_reference_is_the_stated_definition():
    out = torch.randn(5, 3, 4)
    slot = torch.tensor([0, 2, 1, 2, 0], dtype=torch.int32)
    table = torch.tensor([[1.0, 1.0, 1.0], [0.0, 2.0, 1.0], [3.0, 0.5, 1.5]])
    expected = out.clone()
    for t in range(5):
        for h in range(3):
            expected[t, h, :] = out[t, h, :] * table[slot[t], h]
    assert torch.equal(head_scale_reference(out, slot, table), expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(IMPLEMENTATIONS))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    tokens=st.integers(0, 40),
    heads=st.integers(1, 8),
    head_dim=st.sampled_from(HEAD_DIMS),
    slots=st.integers(1, 5),
    dtype=st.sampled_from(DTYPES),
    layout=st.sampled_from(["3d", "flat", "padded"]),
    seed=st.integers(0, 2**16),
)
def test_matches_reference(name, device, tokens, heads, head_dim, slots, dtype, layout, seed):
    if name == "triton" and device == "cpu" and tokens * heads > 160:
        tokens = 160 // heads  # the interpreter is slow; the shapes' variety matters, not their size
    storage, slot, table = make_case(tokens, heads, head_dim, slots, dtype, layout, seed, device)
    before = storage.clone()
    expected = expected_result(name, device, view_of(before, heads, head_dim, layout), slot, table)
    IMPLEMENTATIONS[name](view_of(storage, heads, head_dim, layout), slot, table)
    got = view_of(storage, heads, head_dim, layout).reshape(tokens, heads, head_dim)
    assert torch.equal(got, expected.reshape(tokens, heads, head_dim))
    # Bytes outside the [T, H*D] region (vLLM's padding) are never touched.
    assert torch.equal(storage[:, heads * head_dim :], before[:, heads * head_dim :])


@pytest.mark.parametrize("name", sorted(IMPLEMENTATIONS))
def test_slot_zero_is_exact_identity(name):
    storage, slot, table = make_case(17, 4, 64, 3, torch.bfloat16, "3d", 7)
    slot.zero_()
    before = storage.clone()
    IMPLEMENTATIONS[name](storage, slot, table)
    assert torch.equal(storage, before)


@pytest.mark.parametrize("name", ["triton", "torch"])
def test_max_heads(name):
    storage, slot, table = make_case(3, MAX_HEADS, 32, 3, torch.float32, "flat", 3)
    expected = head_scale_reference(storage, slot, table)
    IMPLEMENTATIONS[name](storage, slot, table)
    assert torch.equal(storage.view(3, MAX_HEADS, 32), expected)


def test_max_tokens_torch_path():
    storage, slot, table = make_case(MAX_TOKENS, 2, 32, 4, torch.bfloat16, "flat", 5)
    expected = head_scale_reference(storage, slot, table)
    head_scale_(storage, slot, table)
    assert torch.equal(storage.view(MAX_TOKENS, 2, 32), expected)


def _bad(**overrides):
    case = {
        "out": torch.zeros(4, 2, 32),
        "slot": torch.zeros(4, dtype=torch.int32),
        "table": torch.ones(3, 2),
    }
    case.update(overrides)
    return case


BAD_INPUTS = [
    (_bad(table=torch.ones(3, 2, dtype=torch.float64)), "table must be [S, H] float32"),
    (_bad(table=torch.ones(3, 2, 1)), "table must be [S, H] float32"),
    (_bad(slot=torch.zeros(4, dtype=torch.int64)), "slot must be [T] int32"),
    (_bad(slot=torch.zeros(5, dtype=torch.int32)), "slot must be [T] int32 with T=4"),
    (_bad(out=torch.zeros(4, 2, 32, dtype=torch.int32)), "out must be float16, bfloat16 or float32"),
    (_bad(out=torch.zeros(4, 3, 32)), "out has 3 heads, the gain table 2"),
    (_bad(out=torch.zeros(4, 65)), "out must be [T, H, D] or [T, H*D] with H=2"),
    (_bad(out=torch.zeros(64, 4).t()), "unit stride in its last dimension"),
    (
        _bad(
            out=torch.zeros(1, MAX_HEADS + 1, 32),
            slot=torch.zeros(1, dtype=torch.int32),
            table=torch.ones(1, MAX_HEADS + 1),
        ),
        f"at most {MAX_HEADS} heads",
    ),
    (
        _bad(
            out=torch.zeros(MAX_TOKENS + 1, 1, 32),
            slot=torch.zeros(MAX_TOKENS + 1, dtype=torch.int32),
            table=torch.ones(1, 1),
        ),
        f"at most {MAX_TOKENS} tokens",
    ),
]


@pytest.mark.parametrize("name", sorted(IMPLEMENTATIONS))
@pytest.mark.parametrize(("case", "needle"), BAD_INPUTS, ids=[n for _, n in BAD_INPUTS])
def test_rejects_bad_input(name, case, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        IMPLEMENTATIONS[name](**case)


@pytest.mark.parametrize("name", sorted(IMPLEMENTATIONS))
@pytest.mark.parametrize("bad_slot", [-1, 3])
def test_debug_mode_checks_slot_range(name, bad_slot, monkeypatch):
    monkeypatch.setenv("MODALITY_STEER_DEBUG", "1")
    case = _bad(slot=torch.tensor([0, 1, bad_slot, 2], dtype=torch.int32))
    with pytest.raises(IndexError, match=r"slot values must lie in \[0, 3\)"):
        IMPLEMENTATIONS[name](**case)


def test_triton_out_of_range_slot_reads_no_memory_outside_table(monkeypatch):
    """Outside debug mode a bad slot is the caller's error, but it never reaches past the table."""
    monkeypatch.delenv("MODALITY_STEER_DEBUG", raising=False)
    out = torch.ones(2, 2, 32)
    table = torch.full((2, 2), 3.0)
    head_scale_triton_(out, torch.tensor([1, 99], dtype=torch.int32), table)
    assert torch.equal(out[0], torch.full((2, 32), 3.0))
    assert torch.equal(out[1], torch.ones(2, 32))


def test_custom_op_is_opaque_under_torch_compile():
    """One graph with the op inside (fullgraph: no break), same numbers as eager."""
    torch._dynamo.reset()

    def step(x, slot, table):
        y = x * 2.0
        torch.ops.modality_steer.head_scale_(y, slot, table)
        return y + 1.0

    storage, slot, table = make_case(9, 4, 32, 3, torch.float32, "3d", 11)
    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    assert torch.equal(compiled(storage.clone(), slot, table), step(storage.clone(), slot, table))
    slot2 = torch.flip(slot, dims=[0]).contiguous()
    assert torch.equal(compiled(storage.clone(), slot2, table), step(storage.clone(), slot2, table))


def test_fake_impl_supports_meta_tracing():
    out = torch.empty(5, 4, 32, device="meta")
    head_scale_(out, torch.empty(5, dtype=torch.int32, device="meta"), torch.empty(2, 4, device="meta"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_dispatches_to_triton_and_matches_reference():
    storage, slot, table = make_case(4096, 32, 128, 9, torch.bfloat16, "padded", 13, device="cuda")
    expected = head_scale_reference(storage[:, : 32 * 128], slot, table)
    head_scale_(storage[:, : 32 * 128], slot, table)
    torch.cuda.synchronize()
    assert torch.equal(storage[:, : 32 * 128].view(4096, 32, 128), expected)
