"""`modality-steer` command line."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Find and steer the attention heads that arbitrate between image and text in multimodal LLMs.",
)
data_app = typer.Typer(no_args_is_help=True, help="Build and import conflict data sets (JSONL + images).")
toy_app = typer.Typer(
    no_args_is_help=True, help="The embedded tiny LLaVA that arbitrates between image and text."
)
app.add_typer(data_app, name="data")
app.add_typer(toy_app, name="toy")


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


@app.command()
def doctor() -> None:
    """Print versions, the platform, how the Triton kernel can run, and whether the vLLM plugin is registered."""
    from .doctor import report

    facts = report()
    width = max(len(k) for k in facts)
    for key, value in facts.items():
        typer.echo(f"{key:<{width}}  {value}")


@data_app.command("synth")
def data_synth(
    out: Annotated[Path, typer.Option(help="Folder for train/validation/test JSONL files and images.")],
    n: Annotated[int, typer.Option(help="Samples over all splits (80/10/10).")] = 6000,
    seed: Annotated[int, typer.Option(help="Seed: the same seed writes the same files.")] = 0,
    paraphrase_share: Annotated[
        float,
        typer.Option(
            help="Share of samples whose instruction is a paraphrase of the paper's sentence (for the "
            "analysis' --transfer wording:paraphrase; 0: the paper's wording only, as before)."
        ),
    ] = 0.0,
) -> None:
    """Generate synthetic coloured-shape conflict data with controls."""
    from .data.schema import DataError, load_samples
    from .data.synth import SynthSpec, synth_dataset

    if not 0 <= paraphrase_share <= 1:
        _fail(f"--paraphrase-share must lie in [0, 1], got {paraphrase_share}")
    try:
        paths = synth_dataset(out, n, seed, SynthSpec(paraphrase_share=paraphrase_share))
    except DataError as exc:
        _fail(str(exc))
    for split, path in paths.items():
        typer.echo(f"{split:<10} {len(load_samples(path))} samples  {path}")


@data_app.command("import-mf")
def data_import_mf(
    file: Annotated[Path, typer.Argument(help="A released modality-following JSON file.")],
    images: Annotated[Path, typer.Option(help="Folder with the COCO-2014 images.")],
    out: Annotated[Path, typer.Option(help="JSONL file to write.")],
    skip_missing: Annotated[
        bool, typer.Option(help="Write the samples whose image exists, report the rest.")
    ] = False,
) -> None:
    """Convert the paper's released file into the project's JSONL format."""
    from .data.importer import import_mf
    from .data.schema import DataError

    try:
        report = import_mf(file, images, out, skip_missing=skip_missing)
    except DataError as exc:
        _fail(str(exc))
    typer.echo(f"wrote {report.written} of {report.total} samples to {out}")
    if report.missing_images:
        typer.secho(
            f"skipped {len(report.missing_images)} samples whose image is missing "
            f"(first ids: {', '.join(report.missing_images[:5])})",
            fg=typer.colors.YELLOW,
            err=True,
        )


@toy_app.command("train")
def toy_train(
    out: Annotated[Path, typer.Option(help="Where to write the checkpoint.")],
    seed: Annotated[int, typer.Option()] = 0,
    steps: Annotated[int | None, typer.Option(help="Training steps (default: the recipe's).")] = None,
    threads: Annotated[int, typer.Option(help="torch CPU threads.")] = 2,
    arbitration: Annotated[
        str,
        typer.Option(
            help="planted: the embedded toy, whose arbitration heads are scaled during training (a known "
            "circuit); learned: plain next-token loss, no head touched (the second embedded model)."
        ),
    ] = "planted",
) -> None:
    """Train a toy model from scratch (about 28 minutes on 2 cores), evaluate it and write its model card."""
    import dataclasses

    import torch

    from .toy.card import evaluate, write_model_card
    from .toy.training import Recipe, train

    torch.set_num_threads(threads)
    if arbitration not in ("planted", "learned"):
        raise typer.BadParameter(f"--arbitration must be planted or learned, got {arbitration!r}")
    recipe = Recipe.of("learned" if arbitration == "learned" else "planted", seed)
    if steps is not None:
        recipe = dataclasses.replace(recipe, steps=steps)
    info = train(out, recipe)
    typer.echo(f"trained in {info['train_seconds']} s, final loss {info['final_loss']:.4f}")
    report = evaluate(out, progress=True)
    write_model_card(out, info, report)
    typer.echo(json.dumps(report, indent=2))


@toy_app.command("eval")
def toy_eval(
    model: Annotated[Path | None, typer.Option(help="Checkpoint folder (default: the embedded toy).")] = None,
    data: Annotated[
        Path | None, typer.Option(help="JSONL data (default: the held-out synthetic test split).")
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the report here as JSON.")] = None,
) -> None:
    """Measure MF ratio per instruction, control accuracy and the uninstructed preference with transformers."""
    from .toy.card import evaluate
    from .toy.model import toy_model_dir

    report = evaluate(model or toy_model_dir(), data=data, progress=True)
    text = json.dumps(report, indent=2)
    typer.echo(text)
    if json_out:
        json_out.write_text(text + "\n")


@app.command()
def analyze(
    model_dir: Annotated[
        Path,
        typer.Argument(help="A transformers checkpoint folder of a family in the support matrix (README)."),
    ],
    data: Annotated[
        Path,
        typer.Option(
            help="JSONL conflict data: the selection split (heads and default gain are chosen on it)."
        ),
    ],
    out: Annotated[Path, typer.Option(help="Profile JSON to write.")],
    eval_data: Annotated[
        Path | None,
        typer.Option(
            help="The report split: held-out JSONL for every reported figure, disjoint from --data "
            "(default: --holdout of --data, held out before any choice)."
        ),
    ] = None,
    holdout: Annotated[
        float, typer.Option(help="Without --eval-data: share of --data held out as the report split.")
    ] = 0.5,
    top_frac: Annotated[float, typer.Option(help="Share of all heads to select per mode, in (0, 1].")] = 0.05,
    device: Annotated[str, typer.Option(help="cpu or cuda: the whole model on one device.")] = "cpu",
    device_map: Annotated[
        str | None,
        typer.Option(
            help="Split the model across devices instead (accelerate): auto, balanced, balanced_low_0 or "
            "sequential (the GPUs present, then the CPU, then disk), or a JSON file of module name -> device "
            "(a GPU index, cpu or disk)."
        ),
    ] = None,
    dtype: Annotated[
        str,
        typer.Option(
            help="Weights and forward passes: float32, bfloat16 or float16 (the metric, the attribution's "
            "sums and the logit lens stay float32)."
        ),
    ] = "float32",
    batch_size: Annotated[
        int,
        typer.Option(
            help="Samples per forward pass; on a GPU the most: halved until the largest pass fits its memory."
        ),
    ] = 32,
    limit: Annotated[int | None, typer.Option(help="Use only the first N samples.")] = None,
    plots: Annotated[Path | None, typer.Option(help="Folder for the PNG plots.")] = None,
    knockout_samples: Annotated[int, typer.Option(help="Conflict samples for the attention knockout.")] = 128,
    random_draws: Annotated[int, typer.Option(help="Draws of random heads for the control.")] = 5,
    seed: Annotated[int, typer.Option(help="Seeds the random-head draws and the --holdout split.")] = 0,
    canaries: Annotated[
        int,
        typer.Option(
            help="Canaries per instruction written into the profile (report conflicts with a large measured "
            "effect, checked by every deployment before it serves; 0: none)."
        ),
    ] = 3,
    resume: Annotated[
        bool,
        typer.Option(
            help="Keep finished stages in <out stem>.checkpoint/ and resume an interrupted run of the same "
            "model, data and settings from them (removed once the profile is written)."
        ),
    ] = True,
    transfer: Annotated[
        list[str] | None,
        typer.Option(
            help="Keep the samples this rule matches out of every choice and report them as a transfer split "
            "beside the within-distribution figures: task:NAME[,NAME...] or wording:paraphrase (repeatable)."
        ),
    ] = None,
) -> None:
    """Find the heads that arbitrate between image and text; validate them; write a profile."""
    from .analysis.config import AnalysisConfig, AnalysisError
    from .analysis.pipeline import analyze as run_analysis
    from .analysis.pipeline import write_outputs
    from .architectures import UnsupportedArchitectureError
    from .data.schema import DataError
    from .hf.model import ModelLoadError

    if device not in ("cpu", "cuda"):
        _fail(f"--device must be cpu or cuda, got {device}")
    config = AnalysisConfig(
        top_frac=top_frac,
        device=device,
        device_map=device_map,
        dtype=dtype,
        batch_size=batch_size,
        limit=limit,
        knockout_samples=knockout_samples,
        random_draws=random_draws,
        seed=seed,
        holdout=holdout,
        canaries=canaries,
        transfer=tuple(transfer or ()),
    )
    # Finished stages go beside the profile; a rerun of the same analysis resumes from them.
    checkpoint = out.with_name(out.stem + ".checkpoint") if resume else None
    try:
        result = run_analysis(model_dir, data, config, eval_data=eval_data, checkpoint=checkpoint)
    except (AnalysisError, DataError, UnsupportedArchitectureError, ModelLoadError) as exc:
        _fail(str(exc))
    for path in write_outputs(result, out, plots):
        typer.echo(f"wrote {path}")
    if checkpoint is not None:
        shutil.rmtree(checkpoint, ignore_errors=True)
    summary = result.profile.model_extra["validation"]["summary"] if result.profile.model_extra else {}
    typer.echo(json.dumps({"default_gain": result.profile.default_gain, **summary}, indent=2))


@app.command()
def report(
    profile: Annotated[
        Path, typer.Argument(help="Profile JSON (the knockout and logit-lens JSON beside it are read too).")
    ],
    out: Annotated[
        Path | None, typer.Option(help="HTML file to write (default: the profile's path with .html).")
    ] = None,
    screenshot: Annotated[
        Path | None,
        typer.Option(
            help="Also write a full-page PNG of it, from headless Chromium (needs Playwright and chromium)."
        ),
    ] = None,
) -> None:
    """Write one self-contained HTML page of a profile for review: heads, validation, splits, plots, canaries."""
    from .analysis import report as page
    from .profile import ProfileError

    try:
        written = page.write_report(profile, out or profile.with_suffix(".html"))
        typer.echo(f"wrote {written}")
        if screenshot is not None:
            problems = page.screenshot(written, screenshot)
            typer.echo(f"wrote {screenshot}")
            if problems:
                _fail("the browser reported: " + "; ".join(problems))
    except (ProfileError, OSError, page.BrowserUnavailable) as exc:
        _fail(str(exc))


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    epilog="Every other option is passed to `vllm serve` (run as python -m steer_server.serving.vllm_adapter.cli serve): "
    "--api-server-count, --data-parallel-size, --pipeline-parallel-size, --headless and the rest are vLLM's own.",
)
def serve(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="Model folder or name, as for vLLM.")],
    profile: Annotated[Path, typer.Option(help="Arbitration-head profile (JSON) made for this model.")],
    max_gain: Annotated[float, typer.Option(help="Largest gain a request may ask for.")] = 8.0,
    allow_raw_heads: Annotated[
        bool, typer.Option(help="Accept {'heads': [[layer, head, gain], ...]} (research).")
    ] = False,
    default_steer: Annotated[
        str | None, typer.Option(help="Spec applied when a request has none, e.g. text.")
    ] = None,
    enforce_steer: Annotated[
        str | None, typer.Option(help="image or text: every request is steered so; others get 403.")
    ] = None,
    inject_instruction: Annotated[
        bool, typer.Option(help="Add the mode's instruction sentence to steered prompts.")
    ] = False,
    instruction_image: Annotated[
        str | None, typer.Option(help="Sentence injected for image steering (default: the paper's).")
    ] = None,
    instruction_text: Annotated[
        str | None, typer.Option(help="Sentence injected for text steering (default: the paper's).")
    ] = None,
    canaries: Annotated[
        str | None,
        typer.Option(
            help="on (default): before serving, run the profile's canaries through every engine and refuse to "
            "start unless steering does what the profile records; auto: only when the profile has canaries; "
            "off: serve unverified. Default: MODALITY_STEER_CANARIES, else on."
        ),
    ] = None,
    profile_match: Annotated[
        str,
        typer.Option(
            help="fingerprint: the checkpoint must be the analysed one; geometry: any checkpoint of the same "
            "geometry (quantized, fine-tuned), accepted only when the canaries pass on it."
        ),
    ] = "fingerprint",
) -> None:
    """Serve MODEL with vLLM's OpenAI-compatible server and per-request head steering."""
    import os

    from .serving.policy import policy
    from .serving.settings import (
        ALLOW_RAW_HEADS_ENV,
        CANARIES_ENV,
        DEFAULT_STEER_ENV,
        ENFORCE_STEER_ENV,
        ENTRY_POINT_NAME,
        INJECT_INSTRUCTION_ENV,
        INSTRUCTION_ENV,
        MAX_GAIN_ENV,
        PROFILE_ENV,
        PROFILE_MATCH_ENV,
        VLLM_CLI_MODULE,
        SteeringConfigError,
        settings,
    )

    allowed = os.environ.get("VLLM_PLUGINS")
    if allowed is not None and ENTRY_POINT_NAME not in allowed.split(","):
        _fail(
            f"VLLM_PLUGINS={allowed!r} does not list {ENTRY_POINT_NAME}: vLLM would not load the plugin and "
            "nothing would be steered; add it or unset VLLM_PLUGINS"
        )
    env = {
        PROFILE_ENV: str(profile.resolve()),
        MAX_GAIN_ENV: repr(max_gain),
        ALLOW_RAW_HEADS_ENV: "1" if allow_raw_heads else "0",
        INJECT_INSTRUCTION_ENV: "1" if inject_instruction else "0",
        CANARIES_ENV: canaries or os.environ.get(CANARIES_ENV, "on"),
        PROFILE_MATCH_ENV: profile_match,
    }
    for key, value in (
        (DEFAULT_STEER_ENV, default_steer),
        (ENFORCE_STEER_ENV, enforce_steer),
        (INSTRUCTION_ENV["image"], instruction_image),
        (INSTRUCTION_ENV["text"], instruction_text),
    ):
        os.environ.pop(key, None)
        if value is not None:
            env[key] = value
    os.environ.update(env)
    # The same checks every process of the deployment makes when the plugin loads, made here first so
    # that a bad flag is named before vLLM starts.
    settings.cache_clear()
    policy.cache_clear()
    try:
        current = settings()
        policy()
    except SteeringConfigError as exc:
        _fail(str(exc))
    assert current is not None
    command = [sys.executable, "-m", VLLM_CLI_MODULE, "serve", model, *ctx.args]
    typer.echo(f"modality-steer: profile {current.profile.profile_id} ({profile}); starting vLLM", err=True)
    os.execvp(command[0], command)


@app.command("eval")
def eval_endpoint(
    base_url: Annotated[str, typer.Option(help="Server root, e.g. http://127.0.0.1:8000")],
    model: Annotated[str, typer.Option(help="Model name as the server knows it.")],
    data: Annotated[Path, typer.Option(help="JSONL data set.")],
    steer: Annotated[
        str,
        typer.Option(
            help="modality_steer for every request (off, image, text, JSON), or instructed[:GAIN] for each sample's own mode."
        ),
    ] = "off",
    concurrency: Annotated[int, typer.Option(help="Requests in flight.")] = 8,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the report here as JSON.")] = None,
) -> None:
    """Measure modality following through an OpenAI-compatible endpoint (temperature 0)."""
    import openai

    from .data.schema import DataError, load_samples
    from .eval.endpoint import served_answers, served_report, steer_body, summary_line

    try:
        samples = load_samples(data)
    except DataError as exc:
        _fail(str(exc))
    client = openai.OpenAI(base_url=base_url.rstrip("/") + "/v1", api_key="EMPTY")
    try:
        body = steer_body(steer)
    except (ValueError, json.JSONDecodeError) as exc:
        _fail(f"--steer: {exc}")
    run = served_answers(client, model, samples, concurrency=concurrency, extra_body=body, progress=True)
    report = served_report(samples, run)
    report["steer"] = steer
    text = json.dumps(report, indent=2)
    typer.echo(text)
    typer.echo(summary_line(report), err=True)
    if json_out:
        json_out.write_text(text + "\n")
    if run.errors:
        _fail(f"{len(run.errors)} of {len(samples)} requests failed (listed in the report)")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Where to write the results.")] = Path("demo-results.json"),
) -> None:
    """Measure the embedded toy model with transformers and served by vLLM, side by side."""
    from .eval.demo import run_demo

    run_demo(out)


def main(argv: list[str] | None = None) -> Any:
    """Run the `modality-steer` command line on `argv` (default: the process's arguments)."""
    return app(args=argv if argv is not None else sys.argv[1:])


if __name__ == "__main__":
    main()
