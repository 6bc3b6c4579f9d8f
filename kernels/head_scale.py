"""Per-token, per-head gain applied in place to attention output before `o_proj`.

Semantics (one source of truth, :func:`head_scale_reference`): for every token t and head h,
``out[t, h, :] = dtype(float32(out[t, h, :]) * table[slot[t], h])``. Row 0 of every table is all ones by
convention, so slot 0 means "unsteered" (and covers padding).

Two implementations, chosen by device through ``torch.library``:
- CUDA: a Triton kernel. Tokens whose gain is exactly 1 are neither read nor written (masked loads issue
  no memory traffic), so a mixed batch costs in proportion to its steered tokens.
- everything else: the same arithmetic in torch (CPU serving path, and the reference for the kernel).
"""

from __future__ import annotations

import os

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
    """Validate shapes, dtypes and devices; return `out` viewed as [T, H, D]."""
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
    if _debug_checks_enabled() and slot.numel():
        low, high = int(slot.min()), int(slot.max())
        if low < 0 or high >= table.shape[0]:
            raise IndexError(f"slot values must lie in [0, {table.shape[0]}), got [{low}, {high}]")
    return heads


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


@triton.jit
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
