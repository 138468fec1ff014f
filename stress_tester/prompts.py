"""Synthetic prompts of a wanted token count.

A prompt of N tokens is a short marker followed by the word " the" repeated: " the" is one token in
the BPE and SentencePiece vocabularies of the common open models (Llama, Mistral, Qwen, GPT-2/4), so
the count is N within a few tokens (the marker and the chat template add a handful). The exact count
also travels in the X-Prompt-Tokens header, which the twin server reads and real servers ignore.

The marker leads the prompt so a server's prefix cache cannot reuse one request's blocks for the
next, unless the scenario asks for shared prefixes: then requests of the same prefix group begin
with the same text of the group's prefix length, which the server's cache can reuse as in the
simulator.
"""
from __future__ import annotations

WORD = " the"


def prompt_text(n: int, rid: int, prefix: tuple | None = None, prefix_tokens: int = 0, word: str = WORD) -> str:
    """About `n` tokens; the first `prefix_tokens` shared by all requests with the same `prefix` ids.
    `word` (`stress run --prompt-word`) is a text the server's tokenizer makes one token: " the" for the
    common BPEs, "a" for a byte-vocabulary test model (where " the" is four tokens)."""
    if prefix and prefix_tokens:
        shared = prefix_tokens if prefix_tokens < n else n
        head = f"g{prefix[0]}" + word * (shared - 1)
        rest = n - shared
        return head + (f" r{rid}" + word * (rest - 1) if rest > 0 else "")
    return f"r{rid}" + word * (n - 1 if n > 1 else 0)


def check_word(word: str) -> str | None:
    """Why `word` cannot be a prompt word (it is pasted into JSON unescaped), or None."""
    if not 1 <= len(word) <= 16:
        return "expected 1 to 16 characters"
    if not all(32 <= ord(ch) < 127 and ch not in '"\\' for ch in word):
        return "printable ASCII without quotes or backslashes only"
    return None
