"""What every family's tiny language model shares: its size from the requested geometry and the toy
tokenizer's vocabulary and special tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def language_model_fields(
    tokenizer: Any, *, layers: int, heads: int, kv_heads: int | None, head_dim: int
) -> dict[str, Any]:
    """Text-config entries of a tiny language model: hidden `heads * head_dim`, MLP twice as wide,
    `kv_heads` key/value heads (None: as many as query heads), 512 positions, the tokenizer's vocabulary
    and special tokens, untied embeddings. Families add their own entries (head_dim, RoPE, ...)."""
    hidden = heads * head_dim
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden,
        "intermediate_size": hidden * 2,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads or heads,
        "max_position_embeddings": 512,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": False,
    }


def save(model: Any, processor: Any, out_dir: Path) -> Path:
    """`save_pretrained` of the model and its processor (tokenizer, chat template) into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir
