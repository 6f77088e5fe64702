"""The tokenizer of the tiny random models: UTF-8 bytes as token ids (no files, no download).
``adaserve run`` and ``adaserve serve`` both use it for ``tiny-llama`` / ``tiny-qwen2``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import SimpleNamespace


def simple_chat_text(messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
    """A minimal ChatML-like template, for tokenizers that have none (the byte tokenizer's)."""
    text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages)
    return text + "<|assistant|>\n" if add_generation_prompt else text


class ByteTokenizer:
    """The tokenizer of the tiny random models (``adaserve run`` and ``adaserve serve`` both use
    this one): UTF-8 bytes shifted past the special ids, token id =
    byte + ``OFFSET``. Ids 0, 1, 2 (pad, BOS, EOS of the tiny models) are never produced by
    ``encode`` and are dropped by ``decode``. UTF-8 never uses bytes above 0xF4, so every id that
    encoding produces is at most 247 < 256 = the tiny vocabulary, and ``decode(encode(text)) ==
    text`` for any valid text (a lone surrogate is encoded without an error and decodes to U+FFFD).
    Ids of no byte (>= OFFSET + 256) decode to nothing; bytes that are not valid UTF-8 (a model
    may generate them) decode to U+FFFD.

    Implements both the Hugging Face calls the engine uses (``tok(text).input_ids``,
    ``apply_chat_template``, ``decode``) and the server's ``Codec`` protocol (``name``, ``encode``,
    ``decode``, ``chat_ids``). The chat template is ``simple_chat_text``."""

    OFFSET = 3
    name = "bytes"
    chat_template = "simple_chat_text"  # <|role|>\ncontent\n ... <|assistant|>\n

    def __init__(self, vocab_size: int = 256):
        if vocab_size < self.OFFSET + 0xF5:
            raise ValueError(f"a byte tokenizer needs a vocabulary of at least {self.OFFSET + 0xF5} ids "
                             f"(ids {self.OFFSET}..{self.OFFSET + 0xF4} for UTF-8 bytes), got {vocab_size}")
        self.vocab_size = vocab_size
        self.special = frozenset(range(self.OFFSET))

    def encode(self, text: str) -> list[int]:
        return [b + self.OFFSET for b in text.encode("utf-8", errors="surrogatepass")]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        data = bytes(t - self.OFFSET for t in map(int, ids) if self.OFFSET <= t < self.OFFSET + 256)
        return data.decode("utf-8", errors="replace")

    def __call__(self, text: str) -> SimpleNamespace:
        return SimpleNamespace(input_ids=self.encode(text))

    def chat_ids(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        return self.encode(simple_chat_text(messages))

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]], tokenize: bool = True,
                            add_generation_prompt: bool = True, **_) -> list[int] | str:
        text = simple_chat_text(messages, add_generation_prompt)
        return self.encode(text) if tokenize else text
