"""The one place modality-steer touches vLLM: every vLLM symbol it wraps, replaces, adds to, calls or
reads is a row of :mod:`.table`; :mod:`.hooks` installs the rows that apply to the installed vLLM and turns
what vLLM built into plain values for the rest of :mod:`steer_server.serving`, which imports no vLLM
(an import contract in `make lint` says so); :mod:`.compat` checks the rows against other vLLM releases'
sources; :mod:`.cli` runs vLLM's own command line.
"""

from __future__ import annotations

from .table import ROWS, SUPPORTED_VLLM, Row

__all__ = ["ROWS", "SUPPORTED_VLLM", "Row"]
