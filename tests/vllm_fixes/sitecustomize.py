"""Test-only workaround for a vLLM 0.32 bug, loaded by any Python process started with this folder on
PYTHONPATH (a vLLM server the tests launch, and the engine processes it spawns, which inherit the
environment).

The bug: in vLLM's `vllm/model_executor/models/mllama4.py`, `Llama4UnfoldConvolution.forward` unfolds the
image tiles into patches, permutes them (`[tiles, C*k*k, patches]` to `[tiles, patches, C*k*k]`) and passes
that non-contiguous view to its `ColumnParallelLinear`. On the CPU platform the linear layer runs oneDNN
(`vllm._custom_ops.onednn_mm`), which flattens its input with `reshape(-1, K)`; for a single tile (an image
that fits one tile) that reshape is a view whose last stride is not 1, and the kernel fails with
"Expected a.stride(-1) == 1 to be true, but got false". The server starts, then the first request with
such an image kills the engine (HTTP 500, EngineDeadError). A `.contiguous()` after the permute fixes
it; this module installs exactly that forward.

The product does not carry the fix (vLLM bugs are worked around in tests, never in the product); this
module only patches the class when vLLM's module is imported, and does nothing in processes that never
import it.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

TARGET = "vllm.model_executor.models.mllama4"


def _patch(module: ModuleType) -> None:
    """Replace `Llama4UnfoldConvolution.forward` with one that makes the permuted patches contiguous."""
    cls: Any = module.Llama4UnfoldConvolution

    def forward(self: Any, hidden_states: Any) -> Any:
        hidden_states = self.unfold(hidden_states)
        hidden_states = hidden_states.permute(0, 2, 1).contiguous()
        hidden_states, _ = self.linear(hidden_states)
        return hidden_states

    cls.forward = forward


class _PatchingLoader(importlib.abc.Loader):
    """Runs the real loader, then patches the module."""

    def __init__(self, wrapped: importlib.abc.Loader) -> None:
        self._wrapped = wrapped

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._wrapped.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._wrapped.exec_module(module)
        _patch(module)


class _Finder(importlib.abc.MetaPathFinder):
    """Finds vLLM's `mllama4` module through the other finders and wraps its loader."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None and spec.loader is not None:
                spec.loader = _PatchingLoader(spec.loader)
                return spec
        return None


if TARGET in sys.modules:
    _patch(sys.modules[TARGET])
else:
    sys.meta_path.insert(0, _Finder())
