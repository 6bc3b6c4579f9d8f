"""Per-token, per-head gain applied in place to attention output before `o_proj`.

Semantics (one source of truth, :func:`head_scale_reference`): for every token t and head h,
``out[t, h, :] = dtype(float32(out[t, h, :]) * table[slot[t], h])``. Row 0 of every table is all ones by
convention, so slot 0 means "unsteered" (and covers padding).

Two implementations, chosen by device through ``torch.library``:
- CUDA: a Triton kernel. Tokens whose gain is exactly 1 are neither read nor written (masked loads issue
  no memory traffic), so a mixed batch costs in proportion to its steered tokens.
- everything else: the same arithmetic in torch (CPU serving path, and the reference for the kernel).

CUDA graphs: for the serving layout, the kernel compiles one variant per (dtype, NUM_HEADS, HEAD_DIM,
BLOCK_T) — per-call integers are not specialised — and :func:`warm_up` compiles and launches every
variant a model's serving path can hit, so that nothing compiles while vLLM captures a graph. The
host-side debug range check is skipped while the current CUDA stream is capturing (it would
synchronise). :class:`SlotMapStaging` holds the slot map a captured graph reads and stages it from the
host each step.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl

LIBRARY = "modality_steer"
MAX_HEADS = 128
MAX_TOKENS = 65536


def _debug_checks_enabled() -> bool:
    # Read per call: a deployment can turn it on without re-importing.
    return os.environ.get("MODALITY_STEER_DEBUG", "0") not in ("", "0")


def as_heads(out: torch.Tensor, num_heads: int) -> torch.Tensor:
    """View `out` as [T, H, D]: accepts [T, H, D] or a [T, H*D] view whose T stride may exceed H*D."""
    if out.dim() == 3:
        if out.shape[1] != num_heads:
            raise ValueError(f"out has {out.shape[1]} heads, the gain table {num_heads}")
        return out
    if out.dim() != 2 or out.shape[1] % num_heads:
        raise ValueError(f"out must be [T, H, D] or [T, H*D] with H={num_heads}, got {tuple(out.shape)}")
    if out.stride(1) != 1:
        raise ValueError("the [T, H*D] form needs unit stride in its last dimension")
    head_dim = out.shape[1] // num_heads
    return out.as_strided((out.shape[0], num_heads, head_dim), (out.stride(0), head_dim, 1))


def check_arguments(out: torch.Tensor, slot: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Validate shapes, dtypes and devices; return `out` viewed as [T, H, D].

    With `MODALITY_STEER_DEBUG` set, also check that every slot indexes a row of `table`: that reads the
    slot values back to the host (a device synchronisation on CUDA), so it is skipped while the current
    CUDA stream is capturing a graph, where a synchronisation is illegal.

    Raises:
        ValueError: a shape, dtype, stride, size limit or device mismatch.
        IndexError: (debug mode only) a slot outside ``[0, table.shape[0])``.
    """
    if table.dim() != 2 or table.dtype != torch.float32:
        raise ValueError(f"table must be [S, H] float32, got {tuple(table.shape)} {table.dtype}")
    if table.shape[1] > MAX_HEADS:
        raise ValueError(f"at most {MAX_HEADS} heads, got {table.shape[1]}")
    if out.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"out must be float16, bfloat16 or float32, got {out.dtype}")
    heads = as_heads(out, table.shape[1])
    if slot.dim() != 1 or slot.dtype != torch.int32 or slot.shape[0] != heads.shape[0]:
        raise ValueError(
            f"slot must be [T] int32 with T={heads.shape[0]}, got {tuple(slot.shape)} {slot.dtype}"
        )
    if heads.shape[0] > MAX_TOKENS:
        raise ValueError(f"at most {MAX_TOKENS} tokens per call, got {heads.shape[0]}")
    if not (out.device == slot.device == table.device):
        raise ValueError(
            f"out, slot and table must share a device: {out.device}, {slot.device}, {table.device}"
        )
    if _debug_checks_enabled() and slot.numel() and not _capturing(slot):
        low, high = int(slot.min()), int(slot.max())
        if low < 0 or high >= table.shape[0]:
            raise IndexError(f"slot values must lie in [0, {table.shape[0]}), got [{low}, {high}]")
    return heads


def _capturing(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is a CUDA tensor and the current CUDA stream is capturing a graph."""
    return tensor.is_cuda and torch.cuda.is_current_stream_capturing()


def head_scale_reference(out: torch.Tensor, slot: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The definition, out of place and written for clarity: what both implementations must equal."""
    heads = as_heads(out, table.shape[1])
    gains = table[slot.long()]  # [T, H] float32
    return (heads.float() * gains[:, :, None]).to(out.dtype)


def head_scale_torch_(out: torch.Tensor, slot: torch.Tensor, table: torch.Tensor) -> None:
    """In-place torch implementation (CPU serving path)."""
    heads = check_arguments(out, slot, table)
    if heads.shape[0] == 0:
        return
    gains = table.index_select(0, slot.long())  # [T, H] float32
    # An in-place multiply by a float32 operand computes in float32 and rounds once into out's dtype,
    # exactly like the kernel's float32 multiply followed by a cast.
    heads.mul_(gains.unsqueeze(-1))


# `num_tokens` changes every call and `num_slots` between deployments: left unspecialised, they do not
# multiply the compiled variants (Triton otherwise specialises an integer on being 1 and on divisibility by
# 16). The strides are fixed per model and layout (and `warm_up` uses the serving layout), so they keep
# their specialisation, as do the pointers' 16-byte alignment (fresh torch allocations and their slices
# from the start, as in the serving path).
@triton.jit(do_not_specialize=["num_tokens", "num_slots"])
def _head_scale_kernel(  # type: ignore[no-untyped-def]  # Triton pointers carry no Python types
    out_ptr,
    slot_ptr,
    table_ptr,
    num_tokens,
    num_slots,
    stride_t,
    stride_h,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_t = tl.program_id(0)
    head = tl.program_id(1)
    tokens = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    token_ok = tokens < num_tokens
    slots = tl.load(slot_ptr + tokens, mask=token_ok, other=0)
    # A slot out of range is a caller error (checked on the host in debug mode); here it reads no
    # memory outside the table.
    slot_ok = token_ok & (slots >= 0) & (slots < num_slots)
    gains = tl.load(table_ptr + slots * NUM_HEADS + head, mask=slot_ok, other=1.0)
    dims = tl.arange(0, BLOCK_D)
    offsets = tokens.to(tl.int64)[:, None] * stride_t + head * stride_h + dims[None, :]
    touch = (gains != 1.0)[:, None] & (dims < HEAD_DIM)[None, :]
    values = tl.load(out_ptr + offsets, mask=touch, other=0.0)
    scaled = values.to(tl.float32) * gains[:, None]
    tl.store(out_ptr + offsets, scaled.to(values.dtype), mask=touch)


def _block_t(head_dim_block: int, num_tokens: int) -> int:
    # About 16 KiB of 16-bit data per program at prefill sizes; one token row per program at decode.
    target = max(1, 8192 // head_dim_block)
    return max(1, min(target, triton.next_power_of_2(max(num_tokens, 1))))


def warm_up_token_counts(head_dim: int, max_tokens: int) -> dict[int, int]:
    """Every BLOCK_T a call with 1..`max_tokens` tokens of head size `head_dim` can use, mapped to a token
    count that uses it (the first of 1, 2, 4, ..., `max_tokens` that does).

    `_block_t` depends on the token count only through its next power of two. The powers reached are 1
    and every ``2**k`` with ``2**(k-1) < max_tokens``; each is reached by ``2**k`` itself when that is at
    most `max_tokens`, else by `max_tokens`; so those counts cover them all.

    Raises:
        ValueError: `head_dim` or `max_tokens` below 1.
    """
    if head_dim < 1 or max_tokens < 1:
        raise ValueError(f"head_dim and max_tokens must be at least 1, got {head_dim} and {max_tokens}")
    block_d = triton.next_power_of_2(head_dim)
    counts = [1 << k for k in range(max_tokens.bit_length()) if 1 << k <= max_tokens] + [max_tokens]
    variants: dict[int, int] = {}
    for count in sorted(counts):
        variants.setdefault(_block_t(block_d, count), count)
    return variants


def warm_up(
    num_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device | str, max_tokens: int
) -> int:
    """Compile and launch, once each, every variant of the Triton kernel that serving calls on `device`
    with up to `max_tokens` tokens of `num_heads` heads x `head_dim` of `dtype` can hit; return how many
    launches that took (one per variant, i.e. per distinct BLOCK_T).

    Run it before CUDA-graph capture: a variant first compiled, or first launched (Triton loads a compiled
    variant's module on its first launch), inside a capture would load a module and synchronise, which a
    capturing stream forbids. The launches use the serving layout (a contiguous
    ``[T, H*D]`` buffer viewed as ``[T, H, D]``, an int32 slot map, a float32 table) on a scratch buffer,
    with every token steered so that each launch does the full work; the device is synchronised at the end
    so that a launch failure surfaces here, at load. On a CPU device the kernel runs only under
    ``TRITON_INTERPRET=1`` (tests).

    Raises:
        ValueError: arguments the kernel refuses (see :func:`check_arguments`), or sizes below 1.
    """
    variants = warm_up_token_counts(head_dim, max_tokens)
    most = max(variants.values())
    out = torch.zeros(most, num_heads * head_dim, dtype=dtype, device=device)
    slot = torch.ones(most, dtype=torch.int32, device=device)
    table = torch.ones(2, num_heads, dtype=torch.float32, device=device)
    table[1] = 2.0
    for count in variants.values():
        head_scale_triton_(out[:count].view(count, num_heads, head_dim), slot[:count], table)
    if out.is_cuda:
        torch.cuda.synchronize(out.device)
    return len(variants)


def head_scale_triton_(out: torch.Tensor, slot: torch.Tensor, table: torch.Tensor) -> None:
    """In-place Triton implementation (CUDA; also runs on CPU tensors under TRITON_INTERPRET=1)."""
    heads = check_arguments(out, slot, table)
    num_tokens, num_heads, head_dim = heads.shape
    if num_tokens == 0 or num_heads == 0:
        return
    if heads.stride(2) != 1:
        raise ValueError("out must be contiguous within a head (unit stride in head_dim)")
    block_d = triton.next_power_of_2(head_dim)
    block_t = _block_t(block_d, num_tokens)
    grid = (triton.cdiv(num_tokens, block_t), num_heads)
    _head_scale_kernel[grid](
        heads,
        slot,
        table,
        num_tokens,
        table.shape[0],
        heads.stride(0),
        heads.stride(1),
        NUM_HEADS=num_heads,
        HEAD_DIM=head_dim,
        BLOCK_T=block_t,
        BLOCK_D=block_d,
        num_warps=4 if block_t * block_d >= 4096 else 1,
    )


@torch.library.custom_op(f"{LIBRARY}::head_scale_", mutates_args=("out",), device_types=None)
def head_scale_(out: torch.Tensor, slot: torch.Tensor, table: torch.Tensor) -> None:
    """Scale each token's heads in place by `table[slot[t], h]` (see the module docstring)."""
    head_scale_torch_(out, slot, table)


@head_scale_.register_kernel("cuda")
def _head_scale_cuda(out: torch.Tensor, slot: torch.Tensor, table: torch.Tensor) -> None:
    head_scale_triton_(out, slot, table)


@head_scale_.register_fake
def _head_scale_fake(out: torch.Tensor, slot: torch.Tensor, table: torch.Tensor) -> None:
    return None


class SlotMapStaging:
    """The token → slot map the kernel reads (`slot_map`, ``[max_tokens]`` int32 on `device`, persistent
    so that CUDA graphs replay it) and its host-to-device staging, one copy per step.

    Two host buffers alternate, one per staged step. On CUDA they are pinned, so that the copy is truly
    asynchronous on the current stream (a copy from pageable memory synchronises the host), like vLLM's
    own input buffers (`vllm/v1/utils.py`, `CpuGpuBuffer.copy_to_gpu`). Under vLLM's async scheduling the
    host prepares step n+1 while step n's copy may still wait on the stream, so a host buffer is written
    again only after the copy that last read it (two steps ago, normally long done) has completed: an event
    recorded after each copy is waited on before reuse. On other devices the buffers are plain memory, the
    copy is synchronous and no events are used.

    `events` makes the events (default: `torch.cuda.Event` on CUDA, none elsewhere); tests pass fakes.
    """

    def __init__(
        self, max_tokens: int, device: torch.device | str, events: Callable[[], Any] | None = None
    ) -> None:
        device = torch.device(device)
        # Page-locked host buffers only for a CUDA device (pinning needs CUDA; elsewhere it buys nothing).
        self.pinned = device.type == "cuda" and torch.cuda.is_available()
        self.slot_map = torch.zeros(max_tokens, dtype=torch.int32, device=device)
        self.host = tuple(
            torch.zeros(max_tokens, dtype=torch.int32, pin_memory=self.pinned) for _ in range(2)
        )
        make_event = events if events is not None else (torch.cuda.Event if self.pinned else None)
        # One per host buffer, recorded after the copy that read it; None: synchronous copies.
        self._events = None if make_event is None else tuple(make_event() for _ in self.host)
        self._next = 0  # the host buffer the next step writes
        self._dirty = 0  # slot_map[:_dirty] may be non-zero

    def stage(self, per_token: torch.Tensor) -> None:
        """Make ``slot_map[:n]`` equal `per_token` (``[n]`` int32, on the host) and the rest zero, with one
        copy of ``max(n, previous n)`` entries enqueued on the current stream (the host returns at once on
        CUDA, unless the copy of two steps ago is still pending).

        Raises:
            ValueError: `per_token` is not a 1-D int32 host tensor of at most `max_tokens` entries.
        """
        total = per_token.shape[0] if per_token.dim() == 1 else -1
        if (
            per_token.dtype != torch.int32
            or per_token.device.type != "cpu"
            or not 0 <= total <= len(self.slot_map)
        ):
            raise ValueError(
                f"per_token must be [n] int32 on the host with n <= {len(self.slot_map)}, got "
                f"{tuple(per_token.shape)} {per_token.dtype} on {per_token.device}"
            )
        index = self._next
        self._next = 1 - index
        host = self.host[index]
        if self._events is not None:
            # Wait for the copy that last read `host` (two steps ago); returns at once if never recorded.
            self._events[index].synchronize()
        extent = max(total, self._dirty)
        host[:total].copy_(per_token)
        host[total:extent].zero_()  # entries the previous step set and this one does not
        self.slot_map[:extent].copy_(host[:extent], non_blocking=True)
        if self._events is not None:
            self._events[index].record()
        self._dirty = total

    def clear(self) -> None:
        """Zero the slot map's entries that may be non-zero (enqueued on the current stream; no host
        buffer is involved)."""
        if self._dirty:
            self.slot_map[: self._dirty].zero_()
            self._dirty = 0
