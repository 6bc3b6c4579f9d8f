"""Scale-out with vLLM's own machinery: data parallel with several API servers (one process answers any
request), metrics summed over processes, the state of every engine's workers, dummy runs, and the
settings reaching workers vLLM's Ray executor starts. Pipeline parallel and speculative decoding:
test_serving.py (they compare against its single-process server)."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest
from helpers import (
    SPECS,
    assert_same_steps,
    chat,
    engine_env,
    http_request,
    reference_steps,
    run_engine_script,
    serve,
    served_steps,
)

from steer_server.hf.model import load_model
from steer_server.profile import load_profile

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

# The request mix: what each asks for, and what the deployment (default "text") makes of it.
ASKED: list[Any] = [None, *SPECS, {"follow": "image", "gain": 99}, "bogus"]
EFFECTIVE: list[Any] = ["text", *SPECS, None, None]  # None: refused with 400
MODE = ["text", "off", "image", "text", "text", "heads", None, None]


def _get(server, path: str) -> str:
    reply = http_request(server, path, timeout=30)
    assert reply.status == 200, reply
    return reply.body.decode()


def _steer_metrics(text: str) -> dict[str, float]:
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("modality_steer_"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def _requests_per_process(multiproc_dir: Path) -> dict[str, float]:
    """modality_steer_requests_total counted by each process (Prometheus' multiprocess files)."""
    from prometheus_client.mmap_dict import MmapedDict

    counts = {}
    for path in multiproc_dir.glob("counter_*.db"):
        total = 0.0
        for key, value, _, _ in MmapedDict.read_all_values_from_file(str(path)):
            if json.loads(key)[1] == "modality_steer_requests_total":
                total += value
        counts[path.name] = total
    return counts


@pytest.fixture(scope="module")
def dp_server(tiny_llava, llava_profile, tmp_path_factory):
    """`--data-parallel-size 2`: two engines and, vLLM's default, two API-server processes."""
    multiproc_dir = tmp_path_factory.mktemp("prometheus")
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(multiproc_dir))
    steer_args = ["--allow-raw-heads", "--default-steer", "text"]
    with serve(
        tiny_llava,
        llava_profile,
        "--enforce-eager",
        "--data-parallel-size",
        "2",
        steer_args=steer_args,
        env=env,
    ) as server:
        yield server, multiproc_dir


def test_data_parallel_api_servers_steer_every_request_as_the_policy_says(
    dp_server, tiny_llava, llava_profile, serve_samples
):
    server, multiproc_dir = dp_server
    profile = load_profile(llava_profile)
    reference_model = load_model(tiny_llava)
    work = [(serve_samples[i % len(serve_samples)], i % len(ASKED)) for i in range(40)]
    expected = {
        (id(sample), case): reference_steps(reference_model, profile, sample, EFFECTIVE[case])
        for sample, case in work
        if EFFECTIVE[case] is not None
    }

    def send(item: tuple[Any, int]) -> tuple[int, Any, str | None]:
        sample, case = item
        client = server.client(max_retries=0)  # a connection of its own: any API server may take it
        try:
            raw = chat(client.with_raw_response, str(tiny_llava), sample, ASKED[case])
        except openai.BadRequestError as exc:
            return case, exc, None
        finally:
            client.close()
        return case, served_steps(raw.parse()), raw.headers.get("x-modality-steer")

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(send, work))
    for (sample, case), (_, got, header) in zip(work, results, strict=True):
        if EFFECTIVE[case] is None:
            assert isinstance(got, openai.BadRequestError) and got.body["param"] == "modality_steer", got
            continue
        assert_same_steps(got, expected[(id(sample), case)], 1e-3)
        if MODE[case] == "off":
            assert header is None
        else:
            assert header is not None and header.startswith(f"mode={MODE[case]};"), header

    sent = Counter(MODE[case] for _, case in work if MODE[case] is not None)
    refused = sum(MODE[case] is None for _, case in work)
    for _ in range(4):  # each scrape may reach either API server; each reports the sum over both
        metrics = _steer_metrics(_get(server, "/metrics"))
        profiles = [k for k, v in metrics.items() if k.startswith("modality_steer_profile_info{") and v == 1]
        assert len(profiles) == 1 and f'profile_id="{profile.profile_id}"' in profiles[0], metrics
        for mode in ("off", "image", "text", "heads"):
            assert metrics[f'modality_steer_requests_total{{mode="{mode}"}}'] == sent[mode], (mode, metrics)
        rejected = sum(v for k, v in metrics.items() if k.startswith("modality_steer_rejected_total{"))
        assert rejected == refused
    per_process = _requests_per_process(multiproc_dir)
    assert sum(per_process.values()) == sum(sent.values())
    assert sum(count > 0 for count in per_process.values()) == 2, per_process  # both API servers answered

    deadline = time.monotonic() + 60
    while True:
        workers = json.loads(_get(server, "/v1/modality_steer/state"))["workers"]
        if all(w["slots_in_use"] == 0 and w["requests_tracked"] == 0 for w in workers):
            break
        assert time.monotonic() < deadline, workers
        time.sleep(0.5)
    assert sorted((w["dp_rank"], w["pp_rank"], w["tp_rank"]) for w in workers) == [(0, 0, 0), (1, 0, 0)]
    assert all(w["armed"] and w["profile_id"] == profile.profile_id for w in workers)


# --------------------------------------------------------------------------------------------------
# Dummy runs and Ray workers, in one in-process engine.
# --------------------------------------------------------------------------------------------------

IN_PROCESS = """
import json, os, sys
from vllm import LLM, SamplingParams


def probe(worker):
    runner = getattr(worker, "model_runner", None) or worker.worker.model_runner
    state = runner._modality_steer
    before = {"active": state.active, "slot_map_nonzero": int(state.slot_map.count_nonzero())}
    runner._dummy_run(4)
    after = {"active": state.active, "slot_map_nonzero": int(state.slot_map.count_nonzero())}
    return {"before": before, "after": after}


if __name__ == "__main__":
    llm = LLM(model=sys.argv[1], dtype="float32", enforce_eager=True, max_model_len=256, max_num_seqs=4,
              kv_cache_memory_bytes=256 * 2**20)
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, extra_args={"modality_steer": "text"})
    llm.generate(["USER: What colour is the object?\\nASSISTANT:"], params, use_tqdm=False)
    from vllm.ray.ray_env import get_env_vars_to_copy
    copied = sorted(n for n in get_env_vars_to_copy() if n.startswith("MODALITY_STEER_"))
    print("RESULTS " + json.dumps({"dummy": llm.collective_rpc(probe)[0], "ray_copies": copied}))
"""


def test_dummy_runs_scale_nothing_and_settings_reach_ray_workers(tiny_llava, llava_profile, tmp_path):
    """After a steered step the slot map still holds that step's slots; a dummy run (idle data-parallel
    ranks, warm-up, graph capture) must not apply them. The plugin also lists its settings among the
    variables vLLM's Ray executor copies to workers on every node (`vllm/ray/ray_env.py`; the CPU backend
    itself refuses the Ray executor: "current platform cpu does not support ray")."""
    inherited = {
        k: v
        for k, v in engine_env().items()
        if not k.startswith("MODALITY_STEER_") and k != "VLLM_RAY_EXTRA_ENV_VAR_PREFIXES_TO_COPY"
    }
    env = {
        **inherited,
        "MODALITY_STEER_PROFILE": str(llava_profile),
        "MODALITY_STEER_DEFAULT": "image",
        "MODALITY_STEER_CANARIES": "auto",  # a hand-made profile: no canaries
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
    }
    results = run_engine_script(IN_PROCESS, tiny_llava, tmp_path, env)
    assert results["dummy"]["before"] == {"active": True, "slot_map_nonzero": 1}  # the last steered step
    assert results["dummy"]["after"] == {"active": False, "slot_map_nonzero": 0}
    # The canary secret too: a worker's handshake reports its digest.
    assert results["ray_copies"] == [
        "MODALITY_STEER_CANARIES",
        "MODALITY_STEER_CANARY_SECRET",
        "MODALITY_STEER_DEFAULT",
        "MODALITY_STEER_PROFILE",
    ]
