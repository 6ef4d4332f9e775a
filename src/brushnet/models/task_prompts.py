"""PowerPaint v2's branch text encoder: a stock CLIP text encoder that knows three task words.

PowerPaint learns one prompt per task: `P_ctxt` (fill from context), `P_shape` (fill the mask's
shape) and `P_obj` (insert an object), 10 embedding vectors each. The released
`PowerPaint_Brushnet/pytorch_model.bin` keeps them beside the ordinary token table, under the names
of the authors' embedding wrapper. Here they become 30 ordinary tokens: the tokenizer gets
`P_ctxt_0 .. P_obj_9` (ids `vocab_size + 0 .. + 29`, in the authors' order) and the vectors are
written into those rows of a resized token table, so a plain `CLIPTextModel` computes the same
embeddings and saves, loads, offloads and casts like any other.

The one behaviour of the authors' wrapper not kept: when the same task word appears twice in a row
("P_obj P_obj") it leaves the second run as the embedding of token 0. Here every occurrence gets
the learned vectors.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

TASK_WORDS = ("P_ctxt", "P_shape", "P_obj")  # the order of their token ids, as the authors register them
VECTORS_PER_WORD = 10

# Key names in the released state dict (the authors' EmbeddingLayerWithFixes).
_EMBEDDING_PREFIX = "text_model.embeddings.token_embedding."
WRAPPED_TABLE_KEY = _EMBEDDING_PREFIX + "wrapped.weight"
LEARNED_KEY = _EMBEDDING_PREFIX + "trainable_embeddings.{}"
TABLE_KEY = _EMBEDDING_PREFIX + "weight"

# A task word on its own, not one of its numbered tokens (P_obj, not P_obj_3).
_TASK_WORD = re.compile(r"\b(" + "|".join(TASK_WORDS) + r")\b(?!_\d)")


def task_tokens(word: str) -> list[str]:
    return [f"{word}_{i}" for i in range(VECTORS_PER_WORD)]


ALL_TASK_TOKENS = [token for word in TASK_WORDS for token in task_tokens(word)]


def expand_task_words(text: str) -> str:
    """`"a P_obj"` -> `"a P_obj_0 P_obj_1 ... P_obj_9"`: what the tokenizer must see."""
    return _TASK_WORD.sub(lambda m: " ".join(task_tokens(m.group(1))), text)


def has_task_tokens(tokenizer) -> bool:
    vocab = tokenizer.get_vocab()
    return all(token in vocab for token in ALL_TASK_TOKENS)


def add_task_tokens(tokenizer):
    """Register the 30 task tokens (in place) unless the tokenizer already has them; returns it.

    A tokenizer that has only some of them, or has them at other ids than right after its base
    vocabulary, cannot match the released vectors and raises `ValueError`.
    """
    vocab = tokenizer.get_vocab()
    present = [token for token in ALL_TASK_TOKENS if token in vocab]
    if not present:
        base = len(tokenizer)
        tokenizer.add_tokens(ALL_TASK_TOKENS)
    elif len(present) == len(ALL_TASK_TOKENS):
        base = vocab[ALL_TASK_TOKENS[0]]
    else:
        raise ValueError(f"The tokenizer has {len(present)} of PowerPaint's 30 task tokens: use the base tokenizer.")
    vocab = tokenizer.get_vocab()
    if [vocab[token] for token in ALL_TASK_TOKENS] != list(range(base, base + len(ALL_TASK_TOKENS))):
        raise ValueError("The tokenizer's PowerPaint task tokens are not consecutive ids: use the base tokenizer.")
    return tokenizer


def is_wrapped_state_dict(state_dict: Mapping) -> bool:
    """True for the released layout (`...token_embedding.wrapped.weight` + learned task vectors)."""
    return WRAPPED_TABLE_KEY in state_dict


def unwrap_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The released text-encoder state dict as a plain `CLIPTextModel` state dict with a 30-row longer
    token table: the learned vectors of P_ctxt, P_shape, P_obj (in that order) follow the base rows."""
    missing = [LEARNED_KEY.format(word) for word in TASK_WORDS if LEARNED_KEY.format(word) not in state_dict]
    if WRAPPED_TABLE_KEY not in state_dict or missing:
        raise ValueError(
            f"Not a PowerPaint branch text encoder: it lacks {(missing or [WRAPPED_TABLE_KEY])[0]}."
        )
    table = state_dict[WRAPPED_TABLE_KEY]
    learned = [state_dict[LEARNED_KEY.format(word)] for word in TASK_WORDS]
    for word, vectors in zip(TASK_WORDS, learned):
        if tuple(vectors.shape) != (VECTORS_PER_WORD, table.shape[1]):
            raise ValueError(
                f"PowerPaint's {word} vectors have shape {tuple(vectors.shape)}, expected "
                f"({VECTORS_PER_WORD}, {table.shape[1]})."
            )
    skip = {WRAPPED_TABLE_KEY, *(LEARNED_KEY.format(word) for word in TASK_WORDS)}
    plain = {key: value for key, value in state_dict.items() if key not in skip}
    plain[TABLE_KEY] = torch.cat([table, *(v.to(table.dtype) for v in learned)])
    return plain


def branch_text_encoder(config, state_dict: Mapping[str, torch.Tensor], torch_dtype=None):
    """A stock `CLIPTextModel` with the architecture `config` (the base text encoder's) and the released
    branch weights, its token table resized by the 30 task tokens.

    `state_dict` is either the released layout (see `unwrap_state_dict`) or already plain. Every key
    must be there, and no other: a partial file would silently keep the base weights.
    """
    from transformers import CLIPTextConfig, CLIPTextModel

    plain = unwrap_state_dict(state_dict) if is_wrapped_state_dict(state_dict) else dict(state_dict)
    if TABLE_KEY not in plain:
        raise ValueError(f"Not a CLIP text encoder state dict: it has no {TABLE_KEY}.")
    config = CLIPTextConfig.from_dict(config.to_dict() if hasattr(config, "to_dict") else dict(config))
    config.vocab_size = plain[TABLE_KEY].shape[0]
    # from_pretrained rather than load_state_dict: it maps the checkpoint key names onto whatever
    # module names the installed transformers uses.
    model, info = CLIPTextModel.from_pretrained(None, config=config, state_dict=plain, output_loading_info=True)
    problems = [f"{len(info[kind])} {kind.replace('_', ' ')} such as {sorted(info[kind])[0]}"
                for kind in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(kind)]
    if problems:
        raise ValueError(f"The branch text encoder weights do not fit the base text encoder's config "
                         f"({'; '.join(problems)}).")
    if torch_dtype is not None:
        model.to(torch_dtype)
    return model.eval()
