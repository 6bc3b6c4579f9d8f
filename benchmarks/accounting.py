"""Time inside the plugin's hooks, measured from the outside in an in-process vLLM engine.

The plugin is not edited: after the engine has loaded, the benchmark wraps, by name and at run time, the
callables through which the plugin does its work (vLLM's originals reached by their row of the vLLM
adapter, `steer_server/serving/vllm_adapter/table.py`, `original` / `stand_in`), with
`time.perf_counter` timers (the CPU backend is synchronous, so host time is the work's time; on a GPU
these timers would see kernel launches only):

- step: the model runner's ``execute_model`` and ``sample_tokens`` (vLLM 0.32's V1 runner splits a step
  in two), wrapped on the runner instance;
- slot fill: ``WorkerSteering.set_step`` (ledger key ``steer.begin_step``; called by the plugin's
  ``_prepare_inputs`` hook of the V1 runner);
- release: ``WorkerSteering.forget`` (ledger key ``steer.release``; ``keep_only`` calls it from the
  ``_update_states`` hook);
- the two runner-method wrappers themselves: the plugin's ``_prepare_inputs`` and ``_update_states``
  wrappers are timed as a whole, and the original vLLM method each one calls (the adapter's original of
  rows ``v1._prepare_inputs`` / ``v1._update_states``, stood in for by a timed version) is timed inside
  it; wrapper minus original is the hook's cost (the slot fill or release included);
- the attention wrapper: every attention layer whose backend ``impl`` carries an instance ``forward``
  (the plugin's wrapper; unsteered layers have none) is timed as a whole, and the backend forward it
  calls (the wrapper's ``original`` attribute, looked up per call) is timed inside it; wrapper minus
  backend is the plugin's own cost per layer, the head-scaling kernel included. The kernel call
  (``head_scale_``, looked up in its module per call) is timed too, for the breakdown;
- the method's floor: the attention layers the plugin leaves alone get a wrapper that only calls the
  backend, timed the same way; its time minus the backend's is what the accounting itself reads on a
  wrapper that does nothing (timers, and on a busy machine whatever lands right after the backend's
  return), reported per call beside the plugin's figures.

Each figure includes the timers' own overhead on the plugin's side (about one ``perf_counter`` call and
one Python call per wrapped call, measured by :func:`timer_overhead_seconds` and reported), so the
shares are upper bounds. The ledger only ever adds; a measured run is the :func:`difference` of two
:meth:`Ledger.snapshot` calls around it.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

# Ledger keys. The plugin's cost is the sum of PLUGIN_PARTS; step time is the sum of STEP_PARTS.
STEP_PARTS = ("runner.execute_model", "runner.sample_tokens")
PLUGIN_PARTS = ("hook.prepare_inputs", "hook.update_states", "hook.attention")
BREAKDOWN = ("steer.begin_step", "steer.release", "attention.kernel")


class Ledger:
    """Seconds and calls per key, summed over every timed call since the process started."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def add(self, key: str, seconds: float) -> None:
        self.seconds[key] += seconds
        self.calls[key] += 1

    def snapshot(self) -> dict[str, tuple[float, int]]:
        return {key: (self.seconds[key], self.calls[key]) for key in list(self.seconds)}


LEDGER = Ledger()


def timed(fn: Callable[..., Any], key: str) -> Callable[..., Any]:
    """`fn` with every call's duration added to ``LEDGER[key]``."""
    clock = time.perf_counter
    ledger = LEDGER

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = clock()
        try:
            return fn(*args, **kwargs)
        finally:
            ledger.add(key, clock() - start)

    wrapper.__wrapped__ = fn  # type: ignore[attr-defined]
    return wrapper


def _split_runner_method(runner: Any, name: str, key: str) -> None:
    """Time the plugin's wrapper of `runner.<name>` (``<key>``) and, inside it, vLLM's original method
    (``<key>.original``), reached through the adapter's row ``v1.<name>``.

    Raises:
        RuntimeError: the method is not the plugin's wrapper.
    """
    from steer_server.serving.vllm_adapter import table

    row = f"v1.{name}"
    wrapper = getattr(type(runner), name)
    if getattr(wrapper, "_modality_steer", None) != row:
        raise RuntimeError(f"{type(runner).__name__}.{name} is not wrapped by the plugin (row {row})")
    table.stand_in(row, timed(table.original(row), f"{key}.original"))
    # An instance attribute shadows the class's function: only this runner's calls are timed.
    setattr(runner, name, timed(getattr(runner, name), key))


def _null_wrapper(backend: Callable[..., Any]) -> Callable[..., Any]:
    """A wrapper that does nothing but call `backend`: installed, timed the same way, on the attention
    layers the plugin leaves alone, it measures the method's floor (timers, and whatever lands between
    the backend's return and the wrapper's)."""

    def forward(*args: Any, **kwargs: Any) -> Any:
        return backend(*args, **kwargs)

    return forward


def _split_attention(runner: Any) -> int:
    """Time every wrapped attention backend; the number of steered layers found.

    Raises:
        RuntimeError: a backend forward that is not the plugin's wrapper.
    """
    from steer_server.kernels import head_scale
    from vllm.model_executor.layers.attention import Attention

    layers = 0
    for name, module in runner.model.named_modules():
        impl = getattr(module, "impl", None)
        if not isinstance(module, Attention) or impl is None:
            continue
        if "forward" not in vars(impl):
            impl.forward = timed(_null_wrapper(timed(impl.forward, "null.backend")), "null.outer")
            continue
        wrapper = vars(impl)["forward"]
        if getattr(wrapper, "_modality_steer", None) != "attention.impl.forward":
            raise RuntimeError(f"{name}: the backend's forward is not the plugin's wrapper")
        wrapper.original = timed(wrapper.original, "attention.backend")
        impl.forward = timed(wrapper, "hook.attention")
        layers += 1
    if layers and not hasattr(head_scale.head_scale_, "__wrapped__"):
        head_scale.head_scale_ = timed(head_scale.head_scale_, "attention.kernel")  # type: ignore[assignment]
    return layers


def install(worker: Any) -> dict[str, Any]:
    """Install every timer in this worker (run in-process by ``LLM.collective_rpc``); what was found."""
    from steer_server.serving import worker as steer_worker

    worker = getattr(worker, "worker", worker)  # vLLM may hand over its worker wrapper
    runner = worker.model_runner
    state = getattr(runner, "_modality_steer", None)
    if state is None:
        raise RuntimeError("the model runner has no steering state: is the plugin loaded with a profile?")
    for method in ("execute_model", "sample_tokens"):
        setattr(runner, method, timed(getattr(runner, method), f"runner.{method}"))
    _split_runner_method(runner, "_prepare_inputs", "hook.prepare_inputs")
    _split_runner_method(runner, "_update_states", "hook.update_states")
    cls = steer_worker.WorkerSteering
    for method, key in (("set_step", "steer.begin_step"), ("forget", "steer.release")):
        setattr(cls, method, timed(getattr(cls, method), key))
    layers = _split_attention(runner)
    if layers == 0:
        raise RuntimeError("no wrapped attention layer found: the profile steers no layer of this model?")
    return {"runner": type(runner).__name__, "steered_layers": layers}


def plugin_seconds(delta: dict[str, tuple[float, int]]) -> dict[str, float]:
    """The plugin's time per part and the step time, from a :func:`difference` of snapshots."""

    def seconds(key: str) -> float:
        return delta.get(key, (0.0, 0))[0]

    parts = {
        "hook.prepare_inputs": seconds("hook.prepare_inputs") - seconds("hook.prepare_inputs.original"),
        "hook.update_states": seconds("hook.update_states") - seconds("hook.update_states.original"),
        "hook.attention": seconds("hook.attention") - seconds("attention.backend"),
    }
    return {
        **parts,
        **{key: seconds(key) for key in BREAKDOWN},
        "plugin": sum(parts.values()),
        "step": sum(seconds(key) for key in STEP_PARTS),
        "steps": float(delta.get("runner.execute_model", (0.0, 0))[1]),
        "attention_calls": float(delta.get("hook.attention", (0.0, 0))[1]),
        "null": seconds("null.outer") - seconds("null.backend"),
        "null_calls": float(delta.get("null.outer", (0.0, 0))[1]),
    }


def difference(
    after: dict[str, tuple[float, int]], before: dict[str, tuple[float, int]]
) -> dict[str, tuple[float, int]]:
    """`after - before`, key by key."""
    return {
        key: (value[0] - before.get(key, (0.0, 0))[0], value[1] - before.get(key, (0.0, 0))[1])
        for key, value in after.items()
    }


def timer_overhead_seconds(calls: int = 200_000) -> float:
    """Seconds a timed wrapper adds around one call of a no-op, the median of 5 runs of `calls` calls."""
    import statistics

    def noop() -> None:
        return None

    wrapped = timed(noop, "calibration")
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            noop()
        plain = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(calls):
            wrapped()
        runs.append((time.perf_counter() - start - plain) / calls)
    LEDGER.seconds.pop("calibration", None)
    LEDGER.calls.pop("calibration", None)
    return statistics.median(runs)
