"""The transformers reference for embeddings: ``AutoModel`` + the pooling the folder declares + normalize.

The declared pooling is read here from the sentence-transformers files directly (not through tidellm's
reader), so a mistake in our reader cannot hide in the reference.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch


class HFEmbedder:
    def __init__(self, folder: Path) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        self.model = AutoModel.from_pretrained(str(folder), dtype=torch.float32).eval()
        modules = json.loads((folder / "modules.json").read_text())
        pooling_dir = next(m["path"] for m in modules if m["type"].endswith(".Pooling"))
        cfg = json.loads((folder / pooling_dir / "config.json").read_text())
        modes = [
            k
            for k in ("pooling_mode_mean_tokens", "pooling_mode_cls_token", "pooling_mode_lasttoken")
            if cfg.get(k)
        ]
        assert len(modes) == 1, cfg
        self.mode = modes[0]
        self.normalize = any(m["type"].endswith(".Normalize") for m in modules)

    @torch.no_grad()
    def embed(self, texts: list[str], max_length: int | None = None) -> np.ndarray:
        """[N, H] float64 embeddings, one text at a time (no padding anywhere in the reference)."""
        out = []
        for text in texts:
            enc = self.tokenizer(
                text, return_tensors="pt", truncation=max_length is not None, max_length=max_length
            )
            hidden = self.model(**enc).last_hidden_state[0]  # [n, H]
            if self.mode == "pooling_mode_mean_tokens":
                v = hidden.mean(0)
            elif self.mode == "pooling_mode_cls_token":
                v = hidden[0]
            else:
                v = hidden[-1]
            if self.normalize:
                v = torch.nn.functional.normalize(v, dim=0)
            out.append(v.double().numpy())
        return np.stack(out)


def cosine(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


SENTENCE = (
    "Tides rise and fall twice a day because the moon pulls on the oceans, while the sun adds a smaller pull "
    "of its own; sailors, fishermen and engineers have measured them for centuries."
)


def long_text(tokenizer, target: int) -> str:
    """An English text of at most ``target`` tokens with [CLS]/[SEP], a word short of it at worst."""
    words = SENTENCE.split()
    text_words: list[str] = []
    i = 0
    while len(tokenizer(" ".join(text_words))["input_ids"]) < target:
        text_words.append(words[i % len(words)])
        i += 1
    while len(tokenizer(" ".join(text_words))["input_ids"]) > target:
        text_words.pop()
    return " ".join(text_words)
