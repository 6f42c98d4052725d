"""Captions as token ids for the learned text encoder (model.text.encoder learned): a closed word vocabulary.

A caption is lower-cased and split on white space; its ids are START, then the words' ids (2, 3, ... in vocabulary
order), padded with PAD to model.text.max_tokens. The empty caption is START alone: the unconditional input of
classifier-free guidance and of caption dropout. Pure functions; the network's side is `models.sit.TextEncoder`.
"""

from __future__ import annotations

from .errors import UserError, warn
from .models.sit import PAD, SPECIAL_TOKENS, START, ModelConfig


def words_of(caption: str) -> list[str]:
    return caption.lower().split()


def vocabulary_of(captions: list[str]) -> list[str]:
    """Every word of the captions, sorted (a deterministic token order)."""
    return sorted({w for c in captions for w in words_of(c)})


def tokenize(caption: str, vocabulary: list[str], max_tokens: int) -> list[int]:
    """(max_tokens,) ids: START, the words (truncated with a warning beyond max_tokens - 1), PAD."""
    index = {w: i + SPECIAL_TOKENS for i, w in enumerate(vocabulary)}
    words = words_of(caption)
    unknown = [w for w in words if w not in index]
    if unknown:
        raise UserError(
            f"caption {caption!r}: {', '.join(repr(w) for w in unknown[:5])} not in the model's vocabulary of "
            f"{len(vocabulary)} words"
        )
    if len(words) > max_tokens - 1:
        warn(
            f"captions longer than model.text.max_tokens - 1 = {max_tokens - 1} words are truncated (first: "
            f"{caption!r})"
        )
        words = words[: max_tokens - 1]
    ids = [START] + [index[w] for w in words]
    return ids + [PAD] * (max_tokens - len(ids))


def detokenize(ids: list[int], vocabulary: list[str]) -> str:
    """The caption of token ids (START and PAD dropped)."""
    return " ".join(vocabulary[i - SPECIAL_TOKENS] for i in ids if i >= SPECIAL_TOKENS)


def check_token_ids(rows: list, cfg: ModelConfig) -> None:
    """Each row: max_tokens ids starting with START, words in range, then only PAD."""
    tx = cfg.text
    for row in rows:
        row = [int(i) for i in row]
        words = row[1 : row.index(PAD)] if PAD in row else row[1:]
        if (
            len(row) != tx.max_tokens
            or row[0] != START
            or any(i != PAD for i in row[1 + len(words) :])
            or any(not SPECIAL_TOKENS <= i < SPECIAL_TOKENS + len(tx.vocabulary) for i in words)
        ):
            raise UserError(
                f"token ids {row[:8]}... are not a caption of this model (START, word ids, PAD; {tx.max_tokens} in all)"
            )
