"""Helpers shared by the serving tests: a tiny model's profile, requests, and the transformers reference."""

from __future__ import annotations

import base64
import io
import json
import math
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from steer_server.architectures import geometry_of
from steer_server.data.prompts import openai_messages
from steer_server.data.schema import LoadedSample
from steer_server.hf.hooks import scale_heads
from steer_server.hf.model import LoadedModel, encode
from steer_server.profile import Profile, load_profile
from steer_server.serving.launcher import VllmServer
from steer_server.spec import effective_gains, gains_matrix, parse_spec

MAX_TOKENS = 4
BASE_ARGS = ["--max-model-len", "256", "--max-num-seqs", "16"]
SPECS = ["off", "image", "text", {"follow": "text", "gain": 0}, {"heads": [[0, 1, 0.0], [1, 2, 4.0]]}]
SPEC_IDS = ["off", "image", "text", "block-text", "raw-heads"]

# The profile of the example: the smallest valid profile, 8 layers x 8 heads.
MINIMAL_PROFILE: dict[str, Any] = {
    "format": "modality-steer.profile/v1",
    "model": {
        "architecture": "LlavaForConditionalGeneration",
        "num_layers": 8,
        "num_heads": 8,
        "head_dim": 32,
    },
    "default_gain": 2.0,
    "modes": {
        "image": {"heads": [{"layer": 5, "head": 3, "score": 0.41}]},
        "text": {"heads": [{"layer": 6, "head": 1, "score": 0.37}]},
    },
}


def write_profile(model_dir: Path, path: Path, *, fingerprint: str | None = None) -> Path:
    """A hand-made profile for a tiny random model: two image heads, one text head."""
    config = json.loads((model_dir / "config.json").read_text())
    text = config["text_config"]
    heads = text["num_attention_heads"]
    profile = {
        "format": "modality-steer.profile/v1",
        "model": {
            "architecture": config["architectures"][0],
            "num_layers": text["num_hidden_layers"],
            "num_heads": heads,
            "head_dim": text.get("head_dim") or text["hidden_size"] // heads,
        },
        "default_gain": 3.0,
        "modes": {
            "image": {
                "heads": [
                    {"layer": 1, "head": 0, "score": 0.5},
                    {"layer": 0, "head": heads - 1, "score": 0.3},
                ]
            },
            "text": {"heads": [{"layer": 1, "head": heads - 1, "score": 0.4}]},
        },
    }
    if fingerprint:
        profile["model"]["fingerprint"] = fingerprint
    path.write_text(json.dumps(profile))
    return path


def image_url(colour: tuple[int, int, int]) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def chat(
    client: Any,
    model: str,
    loaded: LoadedSample,
    steer: Any = None,
    max_tokens: int = MAX_TOKENS,
    token_ids: bool = False,
    kv_transfer_params: dict[str, Any] | None = None,
    **kwargs: Any,
) -> Any:
    """A greedy chat request with top-5 logprobs; `token_ids`: tokens come back as ``token_id:N`` (for
    byte-level vocabularies whose token strings do not survive detokenisation); `kv_transfer_params` as
    vLLM's disaggregated-prefill proxies send them."""
    extra: dict[str, Any] = {"ignore_eos": True}
    if kv_transfer_params is not None:
        extra["kv_transfer_params"] = kv_transfer_params
    if token_ids:
        extra["return_tokens_as_token_ids"] = True
    if steer is not None:
        extra["modality_steer"] = steer
    return client.chat.completions.create(
        model=model,
        messages=openai_messages(loaded),
        max_tokens=max_tokens,
        temperature=0,
        logprobs=True,
        top_logprobs=5,
        extra_body=extra,
        **kwargs,
    )


def served_steps(reply: Any) -> list[tuple[str, dict[str, float]]]:
    return [
        (step.token.strip(), {t.token.strip(): t.logprob for t in step.top_logprobs})
        for step in reply.choices[0].logprobs.content
    ]


def reference_steps(
    loaded_model: LoadedModel,
    profile: Profile,
    sample: LoadedSample,
    steer: Any,
    token_ids: bool = False,
    drop_inputs: tuple[str, ...] = (),
) -> list[tuple[str, dict[str, float]]]:
    """Greedy steps and top-5 logprobs from transformers with the same gains (pre-hooks on o_proj);
    `token_ids`: tokens named ``token_id:N`` as vLLM names them with `return_tokens_as_token_ids`;
    `drop_inputs`: processor outputs withheld from the model."""
    geometry = geometry_of(loaded_model.model.config)
    spec = parse_spec(steer if steer is not None else "off", geometry=geometry, allow_raw_heads=True)
    gains = gains_matrix(effective_gains(spec, profile), geometry)
    batch = {k: v for k, v in encode(loaded_model, [sample]).items() if k not in drop_inputs}
    tokenizer = loaded_model.processor.tokenizer
    with torch.inference_mode(), scale_heads(loaded_model.model, gains):
        out = loaded_model.model.generate(
            **batch,
            max_new_tokens=MAX_TOKENS,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            eos_token_id=None,
            pad_token_id=tokenizer.pad_token_id,
        )

    def name(token: int) -> str:
        return f"token_id:{token}" if token_ids else str(tokenizer.convert_ids_to_tokens(token))

    steps = []
    for logits in out.logits:
        logprobs = torch.log_softmax(logits[0].float(), dim=-1)
        top = torch.topk(logprobs, 5)
        words = {name(int(i)): float(v) for v, i in zip(top.values, top.indices, strict=True)}
        steps.append((name(int(logprobs.argmax())), words))
    return steps


def profile_of(path: Path) -> Profile:
    return load_profile(path)


def serve(model, profile, *extra, steer_args=("--allow-raw-heads",), env=None):
    """`modality-steer serve` on a tiny model (raw heads allowed unless steer_args say otherwise)."""
    return VllmServer(model, [*BASE_ARGS, *extra], profile=profile, steer_args=list(steer_args), env=env)


def assert_same_steps(got, expected, tolerance):
    assert [token for token, _ in got] == [token for token, _ in expected]
    for (_, got_top), (_, want_top) in zip(got, expected, strict=True):
        for word, logprob in want_top.items():
            if logprob > -20:  # ranks among near-zero probabilities are not comparable
                assert math.isclose(got_top[word], logprob, abs_tol=tolerance), (word, got_top, want_top)


def engine_env(**variables: str) -> dict[str, str]:
    """This process's environment with `variables`, without the Triton interpreter switch of the test
    session (an engine must never inherit it)."""
    return {k: v for k, v in {**os.environ, **variables}.items() if k != "TRITON_INTERPRET"}


def run_engine_script(source: str, model: Path, tmp_path: Path, env: dict[str, str]) -> dict[str, Any]:
    """Run `source` (a script that starts an engine on `model`, its first argument) in a fresh process and
    return the JSON it prints after ``RESULTS ``."""
    script = tmp_path / "engine_script.py"
    script.write_text(source)
    done = subprocess.run(
        [sys.executable, str(script), str(model)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=600,
        check=False,
    )
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULTS ")), None)
    assert line is not None, done.stdout[-2000:] + done.stderr[-3000:]
    return dict(json.loads(line.removeprefix("RESULTS ")))


def post_json(server: Any, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any], dict[str, str]]:
    """POST `body` as JSON to `server` (a VllmServer); (status, JSON answer, headers), also for 4xx/5xx."""
    request = urllib.request.Request(
        f"{server.base_url}{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}"), dict(error.headers)


def server_state(server: Any) -> dict[str, Any]:
    """`GET /v1/modality_steer/state` of `server` (a VllmServer without --api-key)."""
    with urllib.request.urlopen(f"{server.base_url}/v1/modality_steer/state", timeout=60) as response:
        return json.loads(response.read())


# --------------------------------------------------------------------------------------------------
# HTTP against a running server (urllib: no client library between the test and the wire).
# --------------------------------------------------------------------------------------------------

# The probes every deployment answers without credentials (steer_server.serving.api.PUBLIC_PROBES, pinned).
PUBLIC_PROBES = ["/health", "/metrics", "/ping", "/version"]


def http_request(
    url: str, method: str = "GET", key: str | None = None, body: Any = None, *, timeout: float = 120
) -> tuple[int, bytes]:
    """(status, body) of one request; `key` as a bearer token; `body` as JSON (not sent with GET / HEAD)."""
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode() if body is not None and method not in ("GET", "HEAD") else None
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def generated_tokens(base_url: str) -> float:
    """vLLM's count of generated tokens, from /metrics (a public probe)."""
    status, text = http_request(f"{base_url}/metrics")
    assert status == 200
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.decode().splitlines()
        if line.startswith("vllm:generation_tokens_total")
    )


def assert_every_route_needs_the_key(server: Any, model: Path, key: str, *, root: str = "") -> None:
    """Every route of the running app (from its own route table, every method it takes, path parameters
    filled in): without the key 401 and nothing generated, unless it is a public probe; with the key, not
    401, and the chat route generates."""
    base = server.base_url + root
    status, raw = http_request(f"{base}/v1/modality_steer/state", "GET", key)
    assert status == 200, raw
    routes = json.loads(raw)["routes"]
    assert routes["public"] == PUBLIC_PROBES  # pinned: a probe vLLM adds or renames fails here
    body = {
        "model": str(model),
        "prompt": "USER: What colour is the object?\nASSISTANT:",
        "messages": [{"role": "user", "content": "What colour is the object?"}],
        "input": "What colour is the object?",
        "max_tokens": 2,
    }
    before = generated_tokens(server.base_url)
    walked = 0
    for path, methods in routes["methods"].items():
        url = base + path.replace("{", "").replace("}", "").replace(":path", "")
        for method in methods:
            if method == "WEBSOCKET":
                continue  # no HTTP method reaches a websocket route; the cheap test covers the handshake
            method = "POST" if method == "*" else method
            status, raw = http_request(url, method, None, body)
            walked += 1
            if path in PUBLIC_PROBES:
                assert status != 401, (method, path)
                continue
            assert status == 401, (method, path, status, raw[:200])
            if method != "HEAD":  # a HEAD answer has no body
                assert json.loads(raw) == {"error": "Unauthorized"}, (method, path, raw[:200])
    assert walked >= 30, walked  # every method of every route of vLLM 0.32's app (40 here)
    assert generated_tokens(server.base_url) == before, "an unauthenticated request generated"
    status, raw = http_request(f"{base}/v1/chat/completions", "POST", key, body)
    assert status == 200, raw
    assert generated_tokens(server.base_url) > before
    status, raw = http_request(f"{base}/invocations", "POST", key, {**body, "modality_steer": "bogus"})
    assert status in (400, 403) and b"modality_steer" in raw, raw
