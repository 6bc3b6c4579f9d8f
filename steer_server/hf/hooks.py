"""Hook points into a transformers MLLM's language model: the one way the analysis, the toy model's
training and the tests reach a head's output or cut attention.

Three kinds of hook point, named as TransformerLens names them:

- ``blocks.{layer}.attn.hook_z``: the per-head attention output, i.e. the input of the layer's `o_proj`
  (``[batch, positions, heads * head_dim]``), reached by forward pre-hooks on `o_proj`
  (:func:`~steer_server.architectures.o_proj_modules`). :func:`scale_heads` multiplies heads by gains
  there (what the server applies); :func:`capture_head_outputs` keeps it with its gradient
  (attribution).
- ``blocks.{layer}.attn.hook_pattern``: which keys each query may attend to, reached by forward
  pre-hooks on the self-attention module that replace its `attention_mask` argument
  (:func:`knockout_attention`, the paper's attention knockout).
- ``blocks.{layer}.hook_resid_pre`` / ``hook_resid_mid`` / ``hook_resid_post`` and ``ln_final.hook_in``:
  the residual stream before a decoder layer, between its token mixer and its MLP, after it, and at the
  final norm (:func:`capture_residual_stream`, the logit lens). :func:`capture_resid_pre` keeps
  ``hook_resid_pre`` of chosen layers whole, and :func:`start_at_layer` runs a later forward of the same
  batch from one of them (TransformerLens's ``start_at_layer``): what an intervention at layer l and
  above cannot change is not computed again.

Every function is a context manager: hooks are removed, and anything changed is restored, on exit,
also when the body raises.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from ..architectures import attention_modules, geometry_of, o_proj_modules, residual_modules


@contextmanager
def _hooks(modules: dict[int, Any], make: Any, **options: Any) -> Iterator[None]:
    with ExitStack() as stack:
        for layer, module in modules.items():
            hook = make(layer)
            if hook is not None:
                stack.callback(module.register_forward_pre_hook(hook, **options).remove)
        yield


@contextmanager
def scale_heads(model: Any, gains: torch.Tensor) -> Iterator[None]:
    """Multiply each head's output at `hook_z` by its gain: 1 leaves a head alone, 0 blocks it.

    Args:
        gains: [layers, heads] (one setting for the batch) or [batch, layers, heads] (one per row).

    Every layer with attention is hooked, even at gain 1, so that "gain 1 is an exact no-op" is a property of the hook's
    arithmetic and can be tested as such.

    Raises:
        ValueError: `gains` does not end in (layers, heads) of the model.
    """
    geometry = geometry_of(model.config)
    expected = (geometry.num_layers, geometry.num_heads)
    if tuple(gains.shape[-2:]) != expected:
        raise ValueError(f"gains must end in {expected} (layers, heads), got {tuple(gains.shape)}")
    table = gains.float()

    def make(layer: int) -> Any:
        def scale(module: Any, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            z = args[0]
            heads = z.unflatten(-1, (geometry.num_heads, geometry.head_dim))
            row = table[..., layer, :].to(z.device)
            # [H] → [H, 1]; per batch row [B, H] → [B, 1, H, 1] (batch, positions, heads, head_dim)
            shape = (row.shape[0], 1, -1, 1) if row.dim() == 2 else (-1, 1)
            return ((heads.float() * row.reshape(shape)).to(z.dtype).flatten(-2), *args[1:])

        return scale

    with _hooks(o_proj_modules(model), make):
        yield


@contextmanager
def capture_head_outputs(model: Any) -> Iterator[list[tuple[int, torch.Tensor]]]:
    """Collect `(layer, hook_z)` of every layer with attention, in forward order, with `retain_grad()`
    so that a backward pass fills each tensor's `.grad` ([batch, positions, heads * head_dim] each). The
    list is filled by the forward passes run inside the block."""
    captured: list[tuple[int, torch.Tensor]] = []

    def make(layer: int) -> Any:
        def keep(module: Any, args: tuple[torch.Tensor, ...]) -> None:
            if args[0].requires_grad:
                args[0].retain_grad()
            captured.append((layer, args[0]))

        return keep

    with _hooks(o_proj_modules(model), make):
        yield captured


@contextmanager
def knockout_attention(model: Any, layers: set[int], blocked: torch.Tensor) -> Iterator[None]:
    """Cut attention from query positions to key positions in the given layers (the paper's attention
    knockout): where ``blocked[b, q, k]`` is True, query q of row b does not attend to key k.

    Args:
        layers: decoder layer indices to cut in.
        blocked: [batch, positions, positions] bool over the prompt; positions past its size (generated
            tokens) are not cut.

    The layer's own mask (causal, padding, sliding window) is kept and the cut added to it, in the format
    the attention implementation expects (bool for SDPA, additive float for eager).

    Raises:
        RuntimeError: a hooked attention module was called without `hidden_states` or an
            `attention_mask` argument.
    """

    def make(layer: int) -> Any:
        if layer not in layers:
            return None

        def cut(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
            if "attention_mask" not in kwargs:
                raise RuntimeError(f"layer {layer}: the attention module got no attention_mask argument")
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            if not isinstance(hidden, torch.Tensor):
                raise RuntimeError(f"layer {layer}: the attention module got no hidden_states tensor")
            mask = kwargs["attention_mask"]
            past = kwargs.get("past_key_values")  # positions before the hidden states', when cached
            cached = past.get_seq_length(getattr(module, "layer_idx", 0)) if past is not None else 0
            kwargs["attention_mask"] = _with_cut(mask, blocked, hidden, model, cached)
            return args, kwargs

        return cut

    with _hooks(attention_modules(model), make, with_kwargs=True):
        yield


def _with_cut(
    mask: Any, blocked: torch.Tensor, hidden: torch.Tensor, model: Any, cached: int = 0
) -> torch.Tensor:
    batch, q_len = hidden.shape[0], hidden.shape[1]
    device = hidden.device
    if isinstance(mask, torch.Tensor):
        k_len = mask.shape[-1]
        allowed = mask[:, 0] if mask.dtype == torch.bool else mask[:, 0] == 0
    else:
        k_len = q_len + cached
        allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)
        allowed = allowed.expand(batch, q_len, k_len)
    cut = torch.zeros(batch, q_len, k_len, dtype=torch.bool, device=device)
    # Query rows are the last q_len positions of the k_len keys.
    offset = k_len - q_len
    rows = blocked[:, offset : offset + q_len, :k_len].to(device)
    cut[:, : rows.shape[1], : rows.shape[2]] = rows
    allowed = allowed & ~cut
    if isinstance(mask, torch.Tensor) and mask.dtype != torch.bool:
        additive = torch.zeros(allowed.shape, dtype=mask.dtype, device=device)
        return additive.masked_fill(~allowed, torch.finfo(mask.dtype).min)[:, None]
    if mask is None and model.config._attn_implementation == "eager":
        dtype = hidden.dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )[:, None]
    return allowed[:, None]


@contextmanager
def capture_residual_stream(
    model: Any, positions: torch.Tensor | None = None
) -> Iterator[dict[str, dict[int, torch.Tensor]]]:
    """Collect the residual stream of the forward pass run inside the block: ``resid_pre[l]`` (layer
    l's input), ``resid_mid[l]`` (the input of its pre-MLP norm), ``mlp_in[l]`` (its MLP's input: that
    norm's output), ``resid_post[l]`` (its output) and ``ln_final[0]`` (the final norm's input); detached,
    each [batch, positions, hidden], or [batch, hidden] at one position per row when `positions` ([batch]
    int) is given (what the logit lens keeps: a model's whole residual stream does not fit). A later
    forward overwrites an earlier one's entries.

    Raises:
        steer_server.architectures.UnsupportedArchitectureError: see
            :func:`~steer_server.architectures.residual_modules`.
        RuntimeError: a hooked module got no hidden-states tensor.
    """
    modules = residual_modules(model)
    stream: dict[str, dict[int, torch.Tensor]] = {
        key: {} for key in ("resid_pre", "resid_mid", "mlp_in", "resid_post", "ln_final")
    }

    def kept(hidden: torch.Tensor) -> torch.Tensor:
        if positions is None:
            return hidden.detach()
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return hidden.detach()[rows, positions.to(hidden.device)]

    def keep_input(kind: str, index: int) -> Any:
        def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            if not isinstance(hidden, torch.Tensor):
                raise RuntimeError(f"{kind}[{index}]: the module got no hidden-states tensor")
            stream[kind][index] = kept(hidden)

        return hook

    def keep_output(index: int) -> Any:
        def hook(module: Any, args: Any, output: Any) -> None:
            stream["resid_post"][index] = kept(output[0] if isinstance(output, tuple) else output)

        return hook

    with ExitStack() as stack:
        for index, layer in modules.layers.items():
            handles = (
                layer.register_forward_pre_hook(keep_input("resid_pre", index), with_kwargs=True),
                layer.register_forward_hook(keep_output(index)),
                modules.pre_mlp_norms[index].register_forward_pre_hook(
                    keep_input("resid_mid", index), with_kwargs=True
                ),
                modules.mlps[index].register_forward_pre_hook(keep_input("mlp_in", index), with_kwargs=True),
            )
            for handle in handles:
                stack.callback(handle.remove)
        final = modules.final_norm.register_forward_pre_hook(keep_input("ln_final", 0), with_kwargs=True)
        stack.callback(final.remove)
        yield stream


def _hidden_states(args: tuple[Any, ...], kwargs: dict[str, Any], where: str) -> torch.Tensor:
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    if not isinstance(hidden, torch.Tensor):
        raise RuntimeError(f"{where}: the module got no hidden-states tensor")
    return hidden


@dataclass
class ResidualCapture:
    """What :func:`capture_resid_pre` kept of one forward: ``hook_resid_pre`` of the chosen layers
    ([batch, positions, hidden] each, detached) and each decoder layer's `position_embeddings` argument
    (the rotary cos/sin its attention reads, positions on dim -2; absent for models whose layers compute
    their own)."""

    resid_pre: dict[int, torch.Tensor] = field(default_factory=dict)
    rotary: dict[int, Any] = field(default_factory=dict)


@contextmanager
def capture_resid_pre(model: Any, layers: Collection[int]) -> Iterator[ResidualCapture]:
    """Keep :class:`ResidualCapture` of the forward run inside the block, for :func:`start_at_layer`.

    Raises:
        RuntimeError: a hooked layer got no hidden-states tensor.
    """
    modules = residual_modules(model).layers
    kept = ResidualCapture()

    def make(layer: int) -> Any:
        def keep(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if layer in layers:
                kept.resid_pre[layer] = _hidden_states(args, kwargs, f"resid_pre[{layer}]").detach()
            if kwargs.get("position_embeddings") is not None:
                kept.rotary[layer] = kwargs["position_embeddings"]

        return keep

    with _hooks(modules, make, with_kwargs=True):
        yield kept


def _restore_forward(module: Any, previous: Any) -> None:
    if previous is None:
        vars(module).pop("forward", None)
    else:
        module.forward = previous


def _from_position(value: Any, position: int) -> Any:
    """Positions `position` on (dim -2) of a rotary tensor or of each tensor of a tuple."""
    if isinstance(value, torch.Tensor):
        return value[..., position:, :]
    return type(value)(_from_position(item, position) for item in value)


@contextmanager
def start_at_layer(
    model: Any, layer: int, captured: ResidualCapture, *, from_position: int = 0
) -> Iterator[None]:
    """Run the forward inside the block from decoder layer `layer` on (TransformerLens's
    ``start_at_layer``), and, with `from_position` > 0, for the positions from there only: the layers
    before `layer` hand their input on unchanged (their forward is not run), layer `layer` reads the
    captured ``hook_resid_pre`` instead of its input, and every layer from `layer` on reads the captured
    rotary position embeddings of those positions.

    Exact when `captured` comes from a forward of the same batch that differed from this one only at
    layer `layer` and above (decoder layers run in order) and, with `from_position`, only at positions
    `from_position` and after (a causal model's earlier positions never see later ones); the caller then
    runs those positions alone against that forward's KV cache of the earlier ones
    (:func:`steer_server.hf.model.suffix_last_logits`). The embeddings, the masks and, for a whole
    sequence, the vision tower are still computed (they are outside the decoder layers).

    Args:
        layer: the first decoder layer that runs (0 only with `from_position` > 0).
        captured: :func:`capture_resid_pre` of that forward, with `layer` among its layers (when > 0).
        from_position: the first position this forward runs.

    Raises:
        ValueError: `layer` is not a decoder layer, or is the first one with no later position to start at.
        RuntimeError: layer `layer`'s input is not shaped like the captured stream from `from_position`
            (another batch); a skipped layer got no hidden-states tensor.
    """
    modules = residual_modules(model).layers
    if layer not in modules or (layer == min(modules) and from_position <= 0):
        raise ValueError(f"start_at_layer needs a later decoder layer or position, got layer {layer}")
    resid_pre = captured.resid_pre[layer][:, from_position:] if layer > min(modules) else None

    def passthrough(*args: Any, **kwargs: Any) -> torch.Tensor:
        # transformers 5's decoder layers return the hidden states (a tensor), as this does.
        return _hidden_states(args, kwargs, "a skipped decoder layer")

    def resume(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        hidden = _hidden_states(args, kwargs, f"resid_pre[{layer}]")
        assert resid_pre is not None
        if hidden.shape != resid_pre.shape:
            raise RuntimeError(
                f"start_at_layer({layer}): the layer's input is {tuple(hidden.shape)}, the kept residual "
                f"stream {tuple(resid_pre.shape)} (another batch)"
            )
        replaced = resid_pre.to(hidden.device, hidden.dtype)
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": replaced}
        return (replaced, *args[1:]), kwargs

    def rotary(index: int) -> Any:
        def replace(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
            return args, {
                **kwargs,
                "position_embeddings": _from_position(captured.rotary[index], from_position),
            }

        return replace

    with ExitStack() as stack:
        for index, module in modules.items():
            if index < layer:
                # accelerate's device-map hooks live in the instance's own `forward`: put back what was there.
                stack.callback(_restore_forward, module, vars(module).get("forward"))
                module.forward = passthrough
            elif from_position > 0 and index in captured.rotary:
                stack.callback(module.register_forward_pre_hook(rotary(index), with_kwargs=True).remove)
        if resid_pre is not None:
            handle = modules[layer].register_forward_pre_hook(resume, with_kwargs=True)
            stack.callback(handle.remove)
        yield
