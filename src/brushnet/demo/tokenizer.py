"""A CLIP tokenizer over the demo scenes' closed vocabulary.

The demo model's text encoder is trained from scratch, so its tokenizer only needs the caption words.
It is a real CLIP BPE tokenizer (`CLIPTokenizer` files: vocab.json + merges.txt), so the demo
pipeline is an ordinary SD1.5-shaped pipeline: every single character of the vocabulary is a token
too, and any other lower-case word still tokenizes (into characters) instead of failing.
"""

import json
from pathlib import Path

from .scenes import VOCABULARY

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _merges(word: str) -> list[tuple[str, str]]:
    """The merges that build `word` left to right: ("r", "e"), ("re", "d</w>") for "red"."""
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    merges, left = [], symbols[0]
    for right in symbols[1:]:
        merges.append((left, right))
        left += right
    return merges


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's byte-pair encoding of one word: merge the best-ranked adjacent pair until none applies."""
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    while len(symbols) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


def _ordered_merges(words) -> list[tuple[str, str]]:
    """All words' merges, ranked so that BPE turns every word into one token.

    Deeper merges (longer prefixes) rank first, so a word whose building has started finishes before
    any short merge can split it; among first merges, a word's own first pair is moved ahead of the
    pairs it contains (e.g. "or" ahead of "an" for "orange") until every word comes out whole.
    """
    merges = []
    for word in words:
        merges += [m for m in _merges(word) if m not in merges]
    depth = {m: len(m[0]) for m in merges}
    order = sorted(merges, key=lambda m: -depth[m])
    for _ in range(len(words) ** 2):
        ranks = {m: r for r, m in enumerate(order)}
        broken = [w for w in words if _bpe(w, ranks) != [w + "</w>"]]
        if not broken:
            return order
        first = _merges(broken[0])[0]
        order.remove(first)
        order.insert(len([m for m in order if depth[m] > 1]), first)  # the front of the first merges
    raise ValueError(f"No merge order makes these words single tokens: {broken}.")


def tokenizer_files(words=VOCABULARY) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of a CLIP BPE tokenizer that encodes each of `words` as one token."""
    merges = _ordered_merges(list(words))
    characters = sorted({c for word in words for c in word})
    tokens = [*characters, *(c + "</w>" for c in characters)]
    tokens += [left + right for left, right in merges]
    vocab: dict[str, int] = {}
    for token in [*tokens, BOS, EOS]:
        vocab.setdefault(token, len(vocab))
    return vocab, merges


def write_tokenizer(folder, words=VOCABULARY, max_length: int = 77):
    """Write the tokenizer files to `folder` and return the loaded `CLIPTokenizer`."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = tokenizer_files(words)
    (folder / "vocab.json").write_text(json.dumps(vocab, indent=0))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), unk_token=EOS,
                              bos_token=BOS, eos_token=EOS, pad_token=EOS, model_max_length=max_length)
    tokenizer.save_pretrained(folder)
    return CLIPTokenizer.from_pretrained(folder)
