"""GGUF → Hugging Face folder (weights in a chosen dtype, tokenizer, chat template) for peers such as vLLM.

The same conversion as the ``hf_reference`` test fixture: transformers reads the GGUF (dequantizing it), and
we write config.json + model.safetensors ourselves, because ``save_pretrained`` refuses a model that came
from a GGUF file. The tokenizer is saved with ``save_pretrained`` (tokenizer.json, tokenizer_config.json
and, with transformers v5, chat_template.jinja), so the folder loads offline.

Run as a script in a subprocess (``python benchmarks/_hf_convert.py GGUF OUT_DIR --dtype bfloat16``) so the
half-gigabyte of transformers and torch state is gone before any server starts.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
CHECK_TEXT = "Hello world! The capital of France is Paris. 1234 ☃ déjà vu\n  indented"


def is_complete(folder: Path) -> bool:
    """True when ``folder`` holds a finished conversion (it is written elsewhere and renamed into place)."""
    return all((folder / f).exists() for f in REQUIRED_FILES)


def convert(gguf_path: Path, out_dir: Path, dtype_name: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, dtype_name)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=dtype)
    model.config.quantization_config = None
    model.config.save_pretrained(tmp)
    # A null quantization_config is not the same as none to every reader: drop the key.
    cfg_path = tmp / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("quantization_config", None)
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    _save_weights(model, tmp / "model.safetensors")
    del model

    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    if not getattr(tok, "chat_template", None):
        raise SystemExit(f"{gguf_path}: transformers found no chat template in the GGUF metadata.")
    tok.save_pretrained(tmp)
    _check_tokenizer(gguf_path, tmp)

    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)


def _save_weights(model, path: Path) -> None:
    """Write the state dict as the original checkpoint does: a tied lm_head is not stored, only
    ``model.embed_tokens.weight`` (readers such as vLLM load the embedding and tie the head to it)."""
    from safetensors.torch import save_file

    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        if "model.embed_tokens.weight" not in state:
            raise SystemExit("tied embeddings but no model.embed_tokens.weight in the converted model")
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"})


def _check_tokenizer(gguf_path: Path, folder: Path) -> None:
    """The peer must see the same token ids as the load generator (which uses tidellm's GGUF tokenizer)."""
    from transformers import AutoTokenizer

    from tidellm.model_executor.loader import load_model_source

    ours = load_model_source(str(gguf_path)).tokenizer.encode(CHECK_TEXT, add_special_tokens=False)
    theirs = AutoTokenizer.from_pretrained(str(folder)).encode(CHECK_TEXT, add_special_tokens=False)
    if ours != theirs:
        raise SystemExit(
            f"the converted tokenizer in {folder} disagrees with tidellm's on {CHECK_TEXT!r}: {theirs} vs {ours}"
        )


def main() -> int:
    p = argparse.ArgumentParser(description="Convert a GGUF file to a Hugging Face folder.")
    p.add_argument("gguf", type=Path)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = p.parse_args()
    try:
        import transformers  # noqa: F401
    except ImportError:
        print(
            "transformers is needed to convert the GGUF for vLLM: pip install -c constraints.txt -e '.[test,bench]'",
            file=sys.stderr,
        )
        return 2
    convert(args.gguf, args.out_dir, args.dtype)
    print(f"wrote {args.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
