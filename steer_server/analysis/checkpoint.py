"""Finished stages of an analysis, kept beside its output so that an interrupted run resumes where it
stopped (`modality-steer analyze` writes them to ``<out stem>.checkpoint/`` and removes the folder once
the profile is written).

A stage's result is saved when the stage finishes (atomically: a partial file never counts) and loaded
instead of recomputed on the next run with the same run key: the model's fingerprint, the data files'
digests, the settings (progress bars aside) and the tool's version. A folder left by another run key is
cleared first, with a warning naming why.
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

T = TypeVar("T")
RUN_FILE = "run.json"


class Checkpoint:
    """The stages of one run, saved in `folder` (None: nothing saved, every stage computed).

    Args:
        folder: where the stages go.
        run_key: what makes two runs the same run (JSON-serialisable).
        stages: the stage names in order, for the whole-run progress line.
        progress: show the whole-run progress line (stage, elapsed, estimated time left).
    """

    def __init__(
        self, folder: Path | None, run_key: dict[str, Any], stages: list[str], progress: bool = False
    ) -> None:
        from tqdm import tqdm

        self.folder = folder
        self.stages = stages
        self._bar = tqdm(total=len(stages), desc="analysis", unit="stage", disable=not progress, position=0)
        if folder is None:
            return
        key_text = json.dumps(run_key, sort_keys=True)
        run_file = folder / RUN_FILE
        if folder.exists():
            previous = run_file.read_text() if run_file.exists() else None
            if previous != key_text:
                warnings.warn(
                    f"{folder}: left by another run (other model, data or settings); starting afresh",
                    stacklevel=2,
                )
                shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        run_file.write_text(key_text)

    def _path(self, name: str) -> Path:
        assert self.folder is not None
        return self.folder / f"{name}.pt"

    def stage(self, name: str, compute: Callable[[], T]) -> T:
        """The stage's result: loaded when a previous run of the same key finished it, else computed and
        saved. Raises whatever `compute` raises (nothing is saved then)."""
        if name not in self.stages:
            raise KeyError(f"unknown analysis stage {name!r}")
        self._bar.set_postfix_str(name)
        if self.folder is not None and self._path(name).exists():
            result: T = torch.load(self._path(name), weights_only=False)
        else:
            started = time.monotonic()
            result = compute()
            if self.folder is not None:
                partial = self._path(name).with_suffix(".partial")
                torch.save(result, partial)
                partial.replace(self._path(name))
            self._bar.set_postfix_str(f"{name} ({time.monotonic() - started:.0f} s)")
        self._bar.update(1)
        return result

    def close(self) -> None:
        """End the progress line (the folder stays: whoever writes the run's outputs removes it)."""
        self._bar.close()
