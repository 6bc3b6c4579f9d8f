"""Plots of an analysis: head attribution heatmaps, attention-knockout curves, the logit lens and the
sparsity curve (PNG, matplotlib Agg)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..profile import MODES, Profile


def plot_heatmaps(profile: Profile, scores: dict[str, torch.Tensor], path: Path) -> None:
    """Two heatmaps (one per mode) of the mean attribution [L, H], the selected heads boxed; layers
    without attention heads (NaN) are left blank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8), constrained_layout=True)
    for axis, mode in zip(axes, MODES, strict=True):
        table = scores[mode].numpy()
        limit = float(np.nanmax(np.abs(table))) or 1.0
        image = axis.imshow(table, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
        for entry in profile.modes[mode].heads:  # type: ignore[index]
            axis.add_patch(
                Rectangle(
                    (entry.head - 0.5, entry.layer - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=2.2
                )
            )
        axis.set_title(f'"rely on the {mode}": head attribution (boxes: selected)')
        axis.set_xlabel("head")
        axis.set_ylabel("layer")
        axis.set_xticks(range(table.shape[1]))
        axis.set_yticks(range(table.shape[0]))
        fig.colorbar(image, ax=axis, label="predicted drop of log p(instructed) - log p(competing)")
    fig.suptitle(
        f"{profile.model.architecture}: arbitration heads ({len(profile.heads('image'))} + {len(profile.heads('text'))} selected)"
    )
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_knockout(flow: dict[str, Any], path: Path) -> None:
    """Change of the metric and MF ratio per knocked-out window, one line per edge."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    for edge, values in flow["edges"].items():
        style = "-" if edge.endswith("instruction") else "--"
        axes[0].plot(flow["layers"], values["delta_metric"], style, marker="o", label=edge)
        axes[1].plot(flow["layers"], values["mf_ratio"], style, marker="o", label=edge)
    axes[0].axhline(0, color="grey", linewidth=0.8)
    axes[0].set_ylabel("change of log p(instructed) - log p(competing)")
    axes[1].axhline(flow["baseline_mf_ratio"], color="grey", linewidth=0.8, label="no knockout")
    axes[1].set_ylabel("MF ratio")
    axes[1].set_ylim(0, 1.02)
    for axis in axes:
        axis.set_xlabel(f"first layer of the knocked-out window ({flow['window']} layer(s))")
    axes[1].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"Attention knockout between token groups ({flow['samples']} conflict samples)")
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _band(
    axis: Any, xs: list[int], estimates: list[dict[str, Any]], style: str, color: str, label: str
) -> None:
    values = [e["value"] for e in estimates]
    low = [e["ci95"][0] if e["ci95"][0] is not None else e["value"] for e in estimates]
    high = [e["ci95"][1] if e["ci95"][1] is not None else e["value"] for e in estimates]
    axis.plot(xs, values, style, color=color, marker="o", markersize=3, label=label)
    axis.fill_between(xs, low, high, color=color, alpha=0.18, linewidth=0)


def plot_logit_lens(lens: dict[str, Any], path: Path) -> None:
    """Semantic inertia (:mod:`.logit_lens`): left, each layer's attention and MLP contribution to the
    logit difference, for failed and followed conflicts; right, the logit lens (the difference read off
    the residual after each layer). Bands: 95% bootstrap intervals of the means."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    layers = list(range(lens["num_layers"]))
    colors = {"failed": "tab:red", "followed": "tab:blue"}
    for group, data in lens["groups"].items():
        if not data["samples"]:
            continue
        label = f"{group} (n={data['samples']})"
        _band(axes[0], layers, data["attention"], "-", colors[group], f"attention, {label}")
        _band(axes[0], layers, data["mlp"], "--", colors[group], f"MLP, {label}")
        _band(axes[1], [*layers, lens["num_layers"]], data["lens"], "-", colors[group], label)
    for axis in axes:
        axis.axhline(0, color="grey", linewidth=0.8)
        axis.legend(fontsize=8)
    axes[0].set_xlabel("layer")
    axes[0].set_ylabel("direct contribution to logit(instructed) - logit(competing)")
    axes[1].set_xlabel("layers applied (logit lens)")
    axes[1].set_ylabel("logit(instructed) - logit(competing)")
    fig.suptitle(f"Semantic inertia: where the answer is decided ({lens['conflicts']} conflict samples)")
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_sparsity(curve: dict[str, Any], path: Path, *, title: str = "") -> None:
    """The sparsity curve (:func:`~.sparsity.sparsity_curve`): relative drop of the MF ratio against the
    share of heads blocked, the top-ranked heads beside random ones, with 95% intervals; both modes
    pooled, then each mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("both instructions", None), *((f'"rely on the {m}"', m) for m in MODES)]
    fig, axes = plt.subplots(1, len(panels), figsize=(13, 4.2), sharey=True, constrained_layout=True)
    points = list({p["heads"]: p for p in curve["points"]}.values())  # fractions that round alike: one point
    shares = [100 * p["heads_share"] for p in points]
    for axis, (label, mode) in zip(axes, panels, strict=True):
        for key, name, colour in (
            ("relative_drop_top", "top-ranked heads", "tab:red"),
            ("relative_drop_random", f"random heads ({curve['random_draws']} draws)", "tab:grey"),
        ):
            figures = [(p if mode is None else p["modes"][mode])[key] for p in points]
            values = np.array([np.nan if f["value"] is None else f["value"] for f in figures], dtype=float)
            low = np.array([np.nan if f["ci95"][0] is None else f["ci95"][0] for f in figures], dtype=float)
            high = np.array([np.nan if f["ci95"][1] is None else f["ci95"][1] for f in figures], dtype=float)
            axis.errorbar(
                shares,
                100 * values,
                yerr=[100 * (values - low), 100 * (high - values)],
                marker="o",
                capsize=3,
                color=colour,
                label=name,
            )
        axis.axhline(0, color="black", linewidth=0.6)
        axis.set_xscale("log")
        axis.set_xticks(shares, [f"{s:.1f}%\n({p['heads']})" for s, p in zip(shares, points, strict=True)])
        axis.minorticks_off()
        axis.set_xlabel("heads blocked (share of all, count)")
        axis.set_title(label)
    axes[0].set_ylabel("relative drop of the MF ratio (%)")
    axes[0].legend(loc="center right")
    fig.suptitle(
        f"{title + ': ' if title else ''}sparsity curve on the report split "
        f"(baseline MF ratio {curve['mf_ratio_baseline']['value']:.3f})"
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)
