"""One self-contained HTML page of a profile, for the people who sign it off (`modality-steer report`):
the model and geometry, the heads per mode on the layer x head map, the validation with intervals and
counts, which split chose what, the knockout and logit-lens plots, the sparsity curve, the transfer
figures and the canaries, where the profile has them.

The page needs no network to view: the plots are drawn here (matplotlib, :mod:`.plots`) and embedded as
PNG data URLs, the style is inline, and there is no script. The knockout and logit-lens results are read
from the JSON files the analysis writes beside the profile (``<stem>.knockout.json``,
``<stem>.logit_lens.json``); a section whose input is missing says so.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..profile import MODES, Profile, load_profile
from .plots import plot_heatmaps, plot_knockout, plot_logit_lens, plot_sparsity

# The page's sections, in order (their ids are the anchors a reader, and the browser test, goes to).
SECTIONS = (
    ("model", "Model and geometry"),
    ("heads", "Arbitration heads"),
    ("validation", "Validation on the report split"),
    ("splits", "Which split chose what"),
    ("sparsity", "Sparsity curve"),
    ("transfer", "Transfer"),
    ("knockout", "Attention knockout"),
    ("logit-lens", "Logit lens (semantic inertia)"),
    ("canaries", "Canaries"),
)
STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 1180px; padding: 0 24px 48px;
  color: #1d1d1f; }
h1 { margin: 24px 0 4px; } h2 { border-bottom: 2px solid #ddd; padding-bottom: 4px; margin-top: 36px; }
table { border-collapse: collapse; margin: 8px 0 16px; } th, td { border: 1px solid #ccc; padding: 4px 8px;
  text-align: left; vertical-align: top; } th { background: #f3f3f5; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; border: 1px solid #eee; } .note { color: #666; }
nav a { margin-right: 12px; } code { background: #f3f3f5; padding: 0 3px; }
"""


def _esc(value: Any) -> str:
    return html.escape(str(value))


def _figure(estimate: Any) -> str:
    """An estimate (value, ci95, n) as "0.912 [0.88, 0.94] n=210"; other values as they are."""
    if isinstance(estimate, dict) and "value" in estimate:
        value = estimate["value"]
        if value is None:
            return f"n/a (n={estimate.get('n', 0)})"
        low, high = estimate.get("ci95") or (None, None)
        interval = f" [{low:.3f}, {high:.3f}]" if low is not None and high is not None else ""
        return f"{value:.3f}{interval} n={estimate.get('n', '?')}"
    if estimate is None:
        return "n/a"
    if isinstance(estimate, float):
        return f"{estimate:.4g}"
    return str(estimate)


def _table(header: Sequence[str] | None, rows: Iterable[Sequence[Any]]) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header or ())
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="num">{_esc(_figure(c))}</td>'
            if isinstance(c, (dict, float))
            else f"<td>{_esc(c)}</td>"
            for c in row
        )
        + "</tr>"
        for row in rows
    )
    thead = f"<thead><tr>{head}</tr></thead>" if head else ""
    return f"<table>{thead}<tbody>{body}</tbody></table>"


def _png(draw: Callable[[Path], None]) -> str:
    """An <img> of what `draw` writes to a PNG path, as a data URL."""
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "plot.png"
        draw(path)
        encoded = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="plot" src="data:image/png;base64,{encoded}">'


def _missing(what: str) -> str:
    return f'<p class="note">Not in this profile: {_esc(what)}.</p>'


def _model(profile: Profile, extra: dict[str, Any]) -> str:
    geometry = profile.model
    provenance = extra.get("provenance", {})
    rows = [
        ("architecture", geometry.architecture),
        ("layers x heads", f"{geometry.num_layers} x {geometry.num_heads} ({geometry.total_heads} heads)"),
        ("head_dim", geometry.head_dim),
        ("fingerprint", geometry.fingerprint or "none"),
        ("profile id", profile.profile_id),
        ("default gain", str(profile.default_gain)),
        ("analysed with", provenance.get("tool", "?")),
        ("device, dtype", f"{provenance.get('device', '?')}, {provenance.get('dtype', '?')}"),
        ("model folder", provenance.get("model_dir", "?")),
        ("run time", f"{provenance.get('seconds', '?')} s"),
    ]
    return _table(None, rows)


def _heads(profile: Profile, extra: dict[str, Any]) -> str:
    rows = [
        (f'"rely on the {mode}"', f"L{entry.layer}H{entry.head}", entry.score)
        for mode in MODES
        for entry in profile.modes[mode].heads  # type: ignore[index]
    ]
    parts = [_table(("mode", "head", "measured drop of the metric when blocked alone"), rows)]
    attribution = extra.get("scores", {}).get("attribution")
    if attribution:
        scores = {
            mode: torch.tensor([[math.nan if v is None else v for v in row] for row in attribution[mode]])
            for mode in MODES
        }
        parts.append(_png(lambda path: plot_heatmaps(profile, scores, path)))
    else:
        parts.append(_missing("the attribution scores (scores.attribution)"))
    return "".join(parts)


VALIDATION_ROWS = (
    ("MF ratio, baseline", "mf_ratio_baseline"),
    ("MF ratio, selected heads blocked", "mf_ratio_block_top"),
    ("MF ratio, as many random heads blocked", "mf_ratio_block_random"),
    ("amplified: baseline failures rescued", "amplify_rescued_share"),
    ("amplified: baseline successes broken", "amplify_broken_share"),
    ("control accuracy, baseline", "control_accuracy_baseline"),
    ("control accuracy, selected heads blocked", "control_accuracy_block_top"),
)


def _validation(extra: dict[str, Any]) -> str:
    validation = extra.get("validation")
    if not validation:
        return _missing("validation")
    modes, summary = validation["modes"], validation["summary"]
    rows = [
        (label, *(modes[m].get(key) for m in MODES), summary.get(key, "")) for label, key in VALIDATION_ROWS
    ]
    rows += [
        ("relative drop of the MF ratio, selected heads blocked", "", "", summary["block_top_relative_drop"]),
        (
            "relative drop of the MF ratio, random heads blocked",
            "",
            "",
            summary["block_random_relative_drop"],
        ),
    ]
    for arm in ("block", "amplify"):
        rows.append(
            (
                f"collateral: controls whose answer changed ({arm})",
                *(
                    (modes[m].get("collateral") or {}).get(f"{arm}_changed_share", "not measured")
                    for m in MODES
                ),
                "",
            )
        )
    table = _table(("figure", '"rely on the image"', '"rely on the text"', "both"), rows)
    return (
        f"<p>Default gain {_esc(validation['default_gain'])}; value [95% interval] and count per figure.</p>"
        + table
    )


def _splits(extra: dict[str, Any]) -> str:
    splits = extra.get("provenance", {}).get("splits")
    if not splits:
        return _missing("the split provenance")
    named = [("selection", splits["selection"]), ("report", splits["report"])]
    named += [(f"transfer {name}", record) for name, record in splits.get("transfer", {}).items()]
    rows = [
        (name, r["data"], r["samples"], r["conflicts"], ", ".join(r["used_for"]), r["sha256"][:16])
        for name, r in named
    ]
    notes = [
        f"Sample ids of the selection and report splits disjoint: {splits.get('disjoint_sample_ids')}.",
        f"Report samples content-identical to a selection sample: "
        f"{splits.get('report_samples_identical_to_selection_samples')}.",
    ]
    if splits.get("transfer_rules"):
        notes.append(
            "Transfer rules (kept out of every choice): "
            + ", ".join(
                f"{rule} ({splits['kept_out_of_selection'][rule]} samples kept out of the selection split)"
                for rule in splits["transfer_rules"]
            )
            + "."
        )
    return _table(("split", "data", "samples", "conflicts", "used for", "sha256"), rows) + "".join(
        f"<p>{_esc(n)}</p>" for n in notes
    )


def _distinct_points(curve: dict[str, Any]) -> list[dict[str, Any]]:
    """The curve's points, once per number of heads (fractions that round to the same count are one)."""
    return list({point["heads"]: point for point in curve["points"]}.values())


def _sparsity(extra: dict[str, Any]) -> str:
    curve = extra.get("sparsity")
    if not curve:
        return _missing("the sparsity curve (analysed before it was measured)")
    rows = [
        (f"{100 * p['heads_share']:.1f}%", p["heads"], p["relative_drop_top"], p["relative_drop_random"])
        for p in _distinct_points(curve)
    ]
    return (
        _png(lambda path: plot_sparsity(curve, path))
        + f"<p>Ranking: {_esc(curve['ranking'])}. Random heads: {curve['random_draws']} draws per point.</p>"
        + _table(
            ("share of heads", "heads", "relative MF drop, top heads", "relative MF drop, random heads"), rows
        )
    )


def _transfer(extra: dict[str, Any]) -> str:
    transfer = extra.get("transfer")
    if not transfer:
        return _missing("transfer splits (the analysis ran without --transfer)")
    table = transfer["side_by_side"]
    names = ["within", *transfer["rules"]]
    rows = [(figure, *(table[figure][name] for name in names)) for figure in table if figure != "collateral"]
    for mode, by_split in table["collateral"].items():
        for arm in ("block", "amplify"):
            rows.append(
                (
                    f"collateral ({mode}, {arm})",
                    *((by_split[name] or {}).get(f"{arm}_changed_share", "no controls") for name in names),
                )
            )
    return _table(("figure", *names), rows)


def _beside(profile_path: Path, suffix: str, what: str, plot: Callable[[dict[str, Any], Path], None]) -> str:
    """The plot of the JSON the analysis wrote beside the profile (``<stem><suffix>``), or why not."""
    path = profile_path.with_name(profile_path.stem + suffix)
    if not path.exists():
        return _missing(f"{what} ({path.name})")
    payload = json.loads(path.read_text())
    return _png(lambda out: plot(payload, out))


def _canaries(profile: Profile, extra: dict[str, Any]) -> str:
    if profile.canaries is None:
        why = extra.get("provenance", {}).get("canaries", "the analysis wrote none")
        return _missing(f"canaries ({why})")
    settings = list(profile.canaries.samples[0].recorded)
    rows = [(c.id, c.follow, *(c.recorded[s] for s in settings)) for c in profile.canaries.samples]
    return (
        f"<p>Tolerance {profile.canaries.tolerance:.4g} ({_esc(profile.canaries.tolerance_basis)}). Recorded "
        "metric (float32, log-probability units) per setting; the deployment checks these before it serves.</p>"
        + _table(("id", "instruction", *settings), rows)
    )


def render(profile_path: Path) -> str:
    """The page of the profile at `profile_path` (HTML text).

    Raises:
        steer_server.profile.ProfileError: the profile does not load.
    """
    profile = load_profile(profile_path)
    extra = profile.model_extra or {}
    bodies = {
        "model": _model(profile, extra),
        "heads": _heads(profile, extra),
        "validation": _validation(extra),
        "splits": _splits(extra),
        "sparsity": _sparsity(extra),
        "transfer": _transfer(extra),
        "knockout": _beside(profile_path, ".knockout.json", "the knockout results", plot_knockout),
        "logit-lens": _beside(profile_path, ".logit_lens.json", "the logit-lens results", plot_logit_lens),
        "canaries": _canaries(profile, extra),
    }
    nav = "".join(f'<a href="#{key}">{_esc(title)}</a>' for key, title in SECTIONS)
    sections = "".join(
        f'<section id="{key}"><h2>{_esc(title)}</h2>{bodies[key]}</section>' for key, title in SECTIONS
    )
    title = f"modality-steer profile: {profile.model.architecture} ({profile_path.name})"
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>'
        f"<style>{STYLE}</style></head><body><h1>{_esc(title)}</h1><nav>{nav}</nav>{sections}</body></html>\n"
    )


def write_report(profile_path: Path, out: Path) -> Path:
    """Write :func:`render`'s page to `out` (atomically); returns `out`."""
    tmp = out.with_suffix(out.suffix + ".partial")
    tmp.write_text(render(profile_path), encoding="utf-8")
    tmp.replace(out)
    return out


class BrowserUnavailable(RuntimeError):
    """No headless browser to open the page with (Playwright and a Chromium are needed)."""


def open_in_chromium(page_path: Path, width: int = 1200) -> Any:
    """A context manager that opens `page_path` in headless Chromium (the OS package's, found on PATH)
    through Playwright, with every request outside the page refused, and yields (page, problems): the
    Playwright page and a list that collects console messages, page errors and refused requests.

    Raises:
        BrowserUnavailable: Playwright is not installed or no `chromium` is on PATH (`make browser`).
    """
    import contextlib
    import shutil

    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        raise BrowserUnavailable("Playwright is not installed (pip install playwright)") from exc
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        raise BrowserUnavailable("no chromium on PATH: install the OS package (make browser)")

    @contextlib.contextmanager
    def opened() -> Any:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
            try:
                page = browser.new_page(viewport={"width": width, "height": 900})
                problems: list[str] = []
                page.on("console", lambda message: problems.append(f"console {message.type}: {message.text}"))
                page.on("pageerror", lambda error: problems.append(f"page error: {error}"))

                def only_the_page(route: Any) -> None:
                    url = route.request.url
                    if url.startswith("data:") or url == page_path.resolve().as_uri():
                        route.continue_()
                    else:
                        problems.append(f"request outside the page refused: {url}")
                        route.abort()

                page.route("**/*", only_the_page)
                page.goto(page_path.resolve().as_uri())
                yield page, problems
            finally:
                browser.close()

    return opened()


def screenshot(page_path: Path, out: Path, *, width: int = 1200) -> list[str]:
    """A full-page PNG of the page at `page_path` (headless Chromium, :func:`open_in_chromium`); returns
    the problems the browser reported (empty: none).

    Raises:
        BrowserUnavailable: see :func:`open_in_chromium`.
    """
    with open_in_chromium(page_path, width) as (page, problems):
        page.screenshot(path=str(out), full_page=True)
        return list(problems)


# --------------------------------------------------------------------------------------------------
# The README's figure blocks: tables rendered from a profile, so a figure in the README is its file's.
# --------------------------------------------------------------------------------------------------

FIGURE_BLOCK = re.compile(
    r"(<!-- figures: (?P<path>\S+) (?P<kind>\w+) -->\n)(?P<body>.*?)(<!-- /figures -->)", re.DOTALL
)


def _pct(estimate: dict[str, Any] | None) -> str:
    if estimate is None:
        return "-"
    if estimate.get("value") is None:
        return f"n/a (n={estimate.get('n', 0)})"
    low, high = estimate["ci95"]
    return f"{100 * estimate['value']:.1f}% [{100 * low:.1f}, {100 * high:.1f}]"


def _validation_markdown(profile: Profile, extra: dict[str, Any]) -> list[str]:
    validation = extra["validation"]
    modes, summary = validation["modes"], validation["summary"]
    gain = validation["default_gain"]
    rows = [
        ("selected heads", *(", ".join(f"L{la}H{h}" for la, h in profile.heads(m)) for m in MODES), ""),
        ("conflicts", *(str(modes[m]["conflicts"]) for m in MODES), str(summary["conflicts"])),
        *(
            (label, *(_pct(modes[m].get(key)) for m in MODES), _pct(summary.get(key)))
            for label, key in (
                ("MF ratio, baseline", "mf_ratio_baseline"),
                ("MF ratio, selected heads blocked", "mf_ratio_block_top"),
                (
                    f"MF ratio, as many random heads blocked ({len(modes[MODES[0]]['block_random_heads'])} draws)",
                    "mf_ratio_block_random",
                ),
                (f"failures rescued at the default gain {gain:g}", "amplify_rescued_share"),
                (f"correct answers broken at gain {gain:g}", "amplify_broken_share"),
                ("control accuracy, baseline", "control_accuracy_baseline"),
                ("control accuracy, selected heads blocked", "control_accuracy_block_top"),
            )
        ),
        ("MF ratio drop, selected heads blocked", "", "", _pct(summary["block_top_relative_drop"])),
        ("MF ratio drop, random heads blocked", "", "", _pct(summary["block_random_relative_drop"])),
    ]
    return [
        '| | "rely on the image" | "rely on the text" | both |',
        "|---|---|---|---|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def _sparsity_markdown(curve: dict[str, Any]) -> list[str]:
    lines = [
        f"| heads blocked (of {curve['total_heads']}) | MF ratio drop, top-ranked heads | "
        f"MF ratio drop, random heads ({curve['random_draws']} draws) |",
        "|---|---|---|",
    ]
    for point in _distinct_points(curve):
        lines.append(
            f"| {point['heads']} ({100 * point['heads_share']:.1f}%) | {_pct(point['relative_drop_top'])} | "
            f"{_pct(point['relative_drop_random'])} |"
        )
    conflicts = sum(curve["conflicts"].values())
    return [
        *lines,
        "",
        f"Baseline MF ratio {_pct(curve['mf_ratio_baseline'])}, {conflicts} report conflicts.",
    ]


def _transfer_markdown(transfer: dict[str, Any]) -> list[str]:
    table = transfer["side_by_side"]
    names = ["within", *transfer["rules"]]
    counts = [table["mf_ratio_baseline"][n]["n"] for n in names]
    lines = [
        "| figure | " + " | ".join(f"{n} ({c} conflicts)" for n, c in zip(names, counts, strict=True)) + " |",
        "|---" * (len(names) + 1) + "|",
    ]
    labels = {
        "mf_ratio_baseline": "MF ratio, baseline",
        "block_top_relative_drop": "MF ratio drop, selected heads blocked",
        "block_random_relative_drop": "MF ratio drop, random heads blocked",
        "amplify_rescued_share": "failures rescued at the default gain",
        "amplify_broken_share": "correct answers broken at the default gain",
    }
    for key, label in labels.items():
        lines.append(f"| {label} | " + " | ".join(_pct(table[key][n]) for n in names) + " |")
    for mode in MODES:
        for arm, verb in (("block", "blocked"), ("amplify", "amplified")):
            cells = [_pct((table["collateral"][mode][n] or {}).get(f"{arm}_changed_share")) for n in names]
            lines.append(f'| controls changed, "{mode}" heads {verb} | ' + " | ".join(cells) + " |")
    return lines


FIGURE_KINDS = ("validation", "sparsity", "transfer")


def figures_markdown(profile_path: Path, kind: str) -> str:
    """One of :data:`FIGURE_KINDS` of a profile as a Markdown table (shares in %, 95% intervals in
    brackets), as the README shows it.

    Raises:
        ValueError: an unknown kind, or a profile without that part.
    """
    profile = load_profile(profile_path)
    extra = profile.model_extra or {}
    part = {"validation": "validation", "sparsity": "sparsity", "transfer": "transfer"}.get(kind)
    if part is None or not extra.get(part):
        raise ValueError(f"{profile_path}: no {kind!r} figures (kinds: {', '.join(FIGURE_KINDS)})")
    if kind == "validation":
        lines = _validation_markdown(profile, extra)
    elif kind == "sparsity":
        lines = _sparsity_markdown(extra["sparsity"])
    else:
        lines = _transfer_markdown(extra["transfer"])
    return "\n".join(lines) + "\n"


def update_figure_blocks(text: str, root: Path) -> str:
    """`text` with every ``<!-- figures: PATH KIND -->`` ... ``<!-- /figures -->`` block rendered again
    from the profile at PATH (relative to `root`) by :func:`figures_markdown`."""
    return FIGURE_BLOCK.sub(
        lambda m: m.group(1) + figures_markdown(root / m.group("path"), m.group("kind")) + m.group(5), text
    )
