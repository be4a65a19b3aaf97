"""Build a tiny Qwen3-MoE checkpoint directory, tokenizer included, that every engine can load.

No model can be downloaded on the project machines, so tests, tutorials and benchmarks build
their model locally: :func:`build_tiny_checkpoint` writes ``config.json``, ``model.safetensors``
(Qwen3-MoE names, see :mod:`reference_impl.checkpoint`) and a word-level tokenizer saved as
``PreTrainedTokenizerFast`` files, which transformers and vLLM read.

The tokenizer's first 16 tokens are the digit tasks' vocabulary (:mod:`reference_impl.tasks`):
``<pad> <bos> <sep> <eos> 0 1 … 9``; larger vocabularies are filled with ``<t16>``, ``<t17>``, …
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .checkpoint import save_hf_checkpoint
from .model import MoEConfig, MoEForCausalLM
from .tasks import BOS, EOS, PAD

__all__ = ["TOKENS", "build_tiny_checkpoint", "write_tokenizer"]

TOKENS = ["<pad>", "<bos>", "<sep>", "<eos>"] + [str(d) for d in range(10)] + ["<u14>", "<u15>"]


def _vocab(vocab_size: int) -> dict[str, int]:
    names = TOKENS[:vocab_size] + [f"<t{i}>" for i in range(len(TOKENS), vocab_size)]
    return {name: i for i, name in enumerate(names)}


def write_tokenizer(path: str | os.PathLike, vocab_size: int) -> None:
    """A whitespace-separated word-level tokenizer over ``vocab_size`` tokens (``PreTrainedTokenizerFast`` files)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = _vocab(vocab_size)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    names = list(vocab)
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": names[BOS],
                "eos_token": names[EOS],
                "pad_token": names[PAD],
                "unk_token": names[PAD],
                "model_max_length": 4096,
                "clean_up_tokenization_spaces": False,
            },
            indent=2,
        )
    )
    (path / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": names[BOS], "eos_token": names[EOS], "pad_token": names[PAD], "unk_token": names[PAD]})
    )


def build_tiny_checkpoint(
    path: str | os.PathLike,
    config: MoEConfig | None = None,
    *,
    seed: int = 0,
    model: MoEForCausalLM | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a loadable checkpoint directory for ``model`` (or a fresh seeded one from ``config``)."""
    if model is None:
        with torch.random.fork_rng(devices=[]):  # seeded init without reseeding the caller's RNG
            torch.manual_seed(seed)
            model = MoEForCausalLM(config or MoEConfig())
    path = save_hf_checkpoint(model, path, dtype=dtype)
    cfg = json.loads((path / "config.json").read_text())
    cfg.update({"bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD})
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD}))
    write_tokenizer(path, model.config.vocab_size)
    return path
