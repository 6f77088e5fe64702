"""Text <-> token ids for the server: a wrapper over Hugging Face tokenizers (the tiny random test
models use the engine's own ``ByteTokenizer``, which is a ``Codec`` as it is, so ``adaserve serve``
and ``adaserve run`` tokenize alike), incremental detokenization for streaming, and stop-string
handling."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from adaserve.engine.tokenizer import ByteTokenizer, simple_chat_text

Message = dict[str, str]  # {"role": ..., "content": ...} with text content

REPLACEMENT = "\ufffd"


class Codec(Protocol):
    """What the server needs of a tokenizer (``ByteTokenizer`` and ``HFCodec`` have it)."""

    name: str

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def chat_ids(self, messages: Sequence[Message]) -> list[int]: ...


__all__ = ["ByteTokenizer", "Codec", "HFCodec", "IncrementalDetokenizer", "TextStream", "simple_chat_text"]


class HFCodec:
    """A ``transformers`` tokenizer; chat prompts through its chat template (or ``simple_chat_text``)."""

    def __init__(self, tokenizer: Any):
        self.tok = tokenizer
        self.name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=True).input_ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def chat_ids(self, messages: Sequence[Message]) -> list[int]:
        if getattr(self.tok, "chat_template", None):
            text = self.tok.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        else:
            text = simple_chat_text(messages)
        # the template writes the special tokens (BOS, role markers) itself
        return list(self.tok(text, add_special_tokens=False).input_ids)


class IncrementalDetokenizer:
    """Text deltas for a growing list of token ids.

    Decodes a short window (the previous delta's tokens plus the new ones) so that tokenizers whose
    text depends on the neighbouring token (leading spaces) decode correctly, and holds back a delta
    that ends in an incomplete UTF-8 character until the rest arrives."""

    def __init__(self, codec: Codec):
        self.codec = codec
        self.ids: list[int] = []
        self.prefix = 0  # start of the decoding window
        self.read = 0    # tokens whose text was emitted

    def push(self, ids: Sequence[int]) -> str:
        self.ids.extend(int(t) for t in ids)
        return self._delta(final=False)

    def flush(self) -> str:
        """Whatever is held back (end of the stream)."""
        return self._delta(final=True)

    def _delta(self, final: bool) -> str:
        before = self.codec.decode(self.ids[self.prefix:self.read])
        after = self.codec.decode(self.ids[self.prefix:])
        if len(after) <= len(before) or (after.endswith(REPLACEMENT) and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before):]


class TextStream:
    """Detokenized output with stop strings: ``push`` returns the text that is safe to send (never
    a prefix of a stop string that may still complete) and whether a stop string was hit; the text
    from the stop string on is never sent."""

    def __init__(self, codec: Codec, stop: Sequence[str] = ()):
        self.detok = IncrementalDetokenizer(codec)
        self.stop = [s for s in stop if s]
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""
        self.sent = 0
        self.stopped = False

    def push(self, ids: Sequence[int]) -> str:
        if self.stopped:
            return ""
        self.text += self.detok.push(ids)
        return self._emit(final=False)

    def finish(self) -> str:
        if self.stopped:
            return ""
        self.text += self.detok.flush()
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        hit = self._find_stop()
        if hit is not None:
            self.stopped = True
            self.text = self.text[:hit]
            end = hit
        else:
            end = len(self.text) if final else max(self.sent, len(self.text) - self.holdback)
        out = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return out

    def _find_stop(self) -> int | None:
        start = max(0, self.sent - self.holdback)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        return min(hits) if hits else None
