"""The analysis' settings and its error type."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data.prompts import INSTRUCTIONS
from ..data.schema import LoadedSample

DEFAULT_GAINS = (1.5, 2.0, 3.0, 4.0, 6.0)
# --dtype: the forward passes' precision. The metric, the attribution's products and sums, and the
# logit lens' decomposition are computed in float32 / float64 whatever it is.
DTYPES = ("float32", "bfloat16", "float16")


class AnalysisError(ValueError):
    """Input the analysis cannot work with; the message says what and where."""


# ``--transfer`` rules (:mod:`.transfer`): what kinds there are, and the wordings a rule may name.
RULE_KINDS = ("task", "wording")
WORDINGS = ("paraphrase",)


@dataclass(frozen=True)
class TransferRule:
    """One ``--transfer`` rule: `kind` ("task" or "wording") and the values it matches."""

    kind: str
    values: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.kind}:{','.join(self.values)}"

    @classmethod
    def parse(cls, text: str) -> TransferRule:
        """Raises:
        AnalysisError: not ``task:NAME[,NAME...]`` or ``wording:paraphrase``.
        """
        kind, _, rest = text.partition(":")
        values = tuple(v.strip() for v in rest.split(",") if v.strip())
        if kind not in RULE_KINDS or not values:
            raise AnalysisError(f"--transfer must be task:NAME[,NAME...] or wording:paraphrase, got {text!r}")
        if kind == "wording" and values != WORDINGS:
            raise AnalysisError(f"--transfer wording:... knows {', '.join(WORDINGS)} only, got {text!r}")
        return cls(kind, values)

    def matches(self, loaded: LoadedSample) -> bool:
        sample = loaded.sample
        if self.kind == "wording":
            return sample.instruction is not None and sample.instruction != INSTRUCTIONS[sample.follow]
        return (sample.task or "").split("/", 1)[0] in self.values


@dataclass(frozen=True)
class AnalysisConfig:
    """Settings of one analysis run (the CLI flags of `modality-steer analyze`).

    Attributes:
        top_frac: share of all heads selected per mode, in (0, 1] (the paper selects about 5%).
        device: "cpu" or "cuda" (a whole model on one device).
        device_map: the model split across devices instead (``--device-map``): one of
            :data:`~steer_server.hf.model.DEVICE_MAP_STRATEGIES` (accelerate places the modules on the GPUs
            present, then the CPU, then disk) or a JSON file of module name -> device (a GPU index,
            "cpu" or "disk"); None: `device`.
        dtype: the weights' and forward passes' dtype (:data:`DTYPES`); float32 by default.
        batch_size: samples per forward pass; on a GPU, the most: the analysis halves it until its
            largest pass fits (:func:`~steer_server.analysis.attribution.fit_batch_size`).
        limit: use only the first N samples of each data file.
        gains: the amplification gains swept in the validation.
        random_draws: draws of as many random unselected heads for the control.
        candidate_factor: exact ablation of `candidate_factor` x the number selected, best attributed first.
        knockout_samples: conflict samples for the attention knockout.
        knockout_window: layers cut at once (default: max(1, layers // 8)).
        seed: seeds the random draws and the held-out split.
        holdout: without separate report data, the share of the data (per instruction and kind, seeded)
            held out as the report split; the rest is the selection split.
        progress: show progress bars.
        canaries: canaries written into the profile per instruction (0: none; such a profile is served only
            with the deployment's canary check turned off).
        transfer: ``--transfer`` rules (:mod:`.transfer`): the samples each matches are kept out of every
            choice and reported as a transfer split of their own.
    """

    top_frac: float = 0.05
    device: str = "cpu"
    device_map: str | None = None
    dtype: str = "float32"
    batch_size: int = 32
    limit: int | None = None
    gains: tuple[float, ...] = DEFAULT_GAINS
    random_draws: int = 5
    candidate_factor: int = 3
    knockout_samples: int = 128
    knockout_window: int | None = None
    seed: int = 0
    holdout: float = 0.5
    progress: bool = True
    canaries: int = 3
    transfer: tuple[str, ...] = ()

    def placement(self) -> str | dict[str, Any] | None:
        """`device_map` as transformers takes it (a strategy's name, or the JSON file's mapping).

        Raises:
            AnalysisError: neither a strategy nor a readable JSON object of module name -> device.
        """
        from ..hf.model import DEVICE_MAP_STRATEGIES

        if self.device_map is None or self.device_map in DEVICE_MAP_STRATEGIES:
            return self.device_map
        try:
            mapping = json.loads(Path(self.device_map).read_text())
        except (OSError, ValueError) as exc:
            raise AnalysisError(
                f"--device-map must be one of {', '.join(DEVICE_MAP_STRATEGIES)} or a JSON file of module name -> "
                f"device, got {self.device_map!r} ({exc})"
            ) from exc
        if not isinstance(mapping, dict) or not all(
            isinstance(k, str) and (isinstance(v, int) or v in ("cpu", "disk") or str(v).startswith("cuda"))
            for k, v in mapping.items()
        ):
            raise AnalysisError(
                f'--device-map {self.device_map}: expected a JSON object of module name -> GPU index, "cpu" or "disk"'
            )
        return mapping

    def check(self) -> None:
        """Raises:
        AnalysisError: a setting out of range (named by its CLI flag).
        """
        if not 0 < self.top_frac <= 1:
            raise AnalysisError(f"--top-frac must lie in (0, 1], got {self.top_frac}")
        if self.device_map is not None:
            self.placement()
        for rule in self.transfer:
            TransferRule.parse(rule)
        if self.dtype not in DTYPES:
            raise AnalysisError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.canaries < 0:
            raise AnalysisError(f"--canaries must be >= 0, got {self.canaries}")
        if self.batch_size < 1:
            raise AnalysisError(f"--batch-size must be positive, got {self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise AnalysisError(f"--limit must be positive, got {self.limit}")
        if not 0 < self.holdout < 1:
            raise AnalysisError(f"--holdout must lie in (0, 1), got {self.holdout}")
        if self.random_draws < 1:
            raise AnalysisError("at least one random draw is needed")
        if any(not math.isfinite(g) or g < 0 for g in self.gains):
            raise AnalysisError(f"gains must be finite and >= 0, got {self.gains}")
