"""Prompt length in *target* tokens without the target's tokenizer.

Traces carry ``input_length`` in Llama-3 tokens, but the Llama tokenizer cannot be downloaded on
offline machines. The estimator imitates how a byte-level BPE with a GPT-4/Llama-3 style
pre-tokenizer splits text: it counts pre-tokenizer pieces (words with their leading space or
punctuation, runs of up to three digits, punctuation runs, whitespace runs), then adds a little
for long words (which BPE splits further) and for non-ASCII characters (several bytes each).

The coefficients were fitted by relative least squares on the 832 distinct prompts of the
artifact traces (``traces/fig8,9`` and ``traces/fig15``), which carry both the prompt text and its
Llama-3 token count. 5-fold cross-validated relative error (mean |error|): coding 3.5%, chat 4.1%,
summarization 2.4%; a plain per-category characters-per-token ratio gives 12%, 13% and 4.4%.
See docs/workloads.md; ``fit_coefficients`` re-measures it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace
from functools import lru_cache

import numpy as np

# Llama-3's pre-tokenizer pattern, with \p{L} approximated by [^\W\d_] (Python's re has no \p{}).
_PIECE = re.compile(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\w]?[^\W\d_]+|\d{1,3}"
                    r"| ?[^\s\w]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LONG_WORD = 6  # letters beyond this many in a word cost extra tokens
_LONG_WORDS = re.compile(r"[^\W\d_]{%d,}" % (LONG_WORD + 1))
_NON_ASCII = re.compile(r"[^\x00-\x7f]")

# Fitted on the artifact traces (see module doc): pieces, long-word letters, non-ASCII chars, 1.
COEFFICIENTS = (1.0347, 0.0481, 0.5232, 0.7316)


def features(text: str) -> list[float]:
    """The estimator's inputs: pieces, letters beyond LONG_WORD per word, non-ASCII chars, 1."""
    pieces = len(_PIECE.findall(text))
    long_words = _LONG_WORDS.findall(text)
    long_letters = sum(map(len, long_words)) - LONG_WORD * len(long_words)
    return [float(pieces), float(long_letters), float(non_ascii_count(text)), 1.0]


def non_ascii_count(text: str) -> int:
    return 0 if text.isascii() else len(_NON_ASCII.findall(text))


def estimate_tokens(text: str, coefficients: Sequence[float] = COEFFICIENTS) -> int:
    """Estimated Llama-3 token count of ``text`` (at least 1)."""
    return tokens_from_features(features(text), coefficients)


def tokens_from_features(feats: Sequence[float],
                         coefficients: Sequence[float] = COEFFICIENTS) -> int:
    """The estimate for a feature vector; the features of a concatenation are (up to the pieces at
    the seams) the sum of the parts' features with the constant counted once."""
    return max(1, int(round(float(np.dot(feats, coefficients)))))


def fit_coefficients(texts: Sequence[str], lengths: Sequence[int]) -> tuple[float, ...]:
    """Coefficients minimising the squared *relative* error of ``estimate_tokens`` on the data."""
    x = np.array([features(t) for t in texts], dtype=float)
    y = np.asarray(lengths, dtype=float)
    if x.shape[0] < x.shape[1] or np.any(y <= 0):
        raise ValueError("need at least 4 texts with positive lengths to fit the estimator")
    coef, *_ = np.linalg.lstsq(x / y[:, None], np.ones_like(y), rcond=None)
    return tuple(float(c) for c in coef)


def relative_errors(texts: Sequence[str], lengths: Sequence[int],
                    coefficients: Sequence[float] = COEFFICIENTS) -> np.ndarray:
    """(estimate − true) / true for each text."""
    est = np.array([estimate_tokens(t, coefficients) for t in texts], dtype=float)
    y = np.asarray(lengths, dtype=float)
    return (est - y) / y


def cross_validated_errors(texts: Sequence[str], lengths: Sequence[int], folds: int = 5,
                           seed: int = 0) -> np.ndarray:
    """Relative errors of estimators fitted without the text they are tested on (k-fold)."""
    n = len(texts)
    order = np.random.default_rng(seed).permutation(n)
    errors = np.empty(n)
    for part in np.array_split(order, folds):
        train = np.setdiff1d(order, part)
        coef = fit_coefficients([texts[i] for i in train], [lengths[i] for i in train])
        errors[part] = relative_errors([texts[i] for i in part], [lengths[i] for i in part], coef)
    return errors


# ------------------------------------------------------------------ recorded lengths vs prompts

LENGTH_MISMATCH_FACTOR = 2.0  # more than 2x apart: the recorded length is not this prompt's tokens


def input_length_mismatches(records, factor: float = LENGTH_MISMATCH_FACTOR
                            ) -> list[tuple[int, int, int]]:
    """(index, recorded ``input_length``, estimated tokens) of every record that carries its prompt
    and whose ``input_length`` is more than ``factor`` times larger or smaller than the prompt's
    estimated token count (e.g. a length recorded in characters). The estimator is within a few
    percent of Llama-3's tokenizer (module doc), far inside a factor of 2."""
    check = InputLengthCheck(factor=factor)
    for i, r in enumerate(records):
        check(i, r)
    return check.mismatches()


class InputLengthCheck:
    """``check_input_lengths`` one record at a time, as ``load_trace(path, each=check)`` reads
    them, so that the prompts need not be kept: call it on every record, then ``warning``.
    Prompts seen recently are estimated once (a trace repeats its prompt pool's prompts: 60% of
    the generated 100k-request RPS 4.8 trace's estimates are repeats of the last 1,024 prompts);
    the cache lives as long as the check and holds at most ``CACHE`` prompts, whatever the
    trace's length."""

    CACHE = 1024

    def __init__(self, fix: bool = False, factor: float = LENGTH_MISMATCH_FACTOR):
        self.fix, self.factor = fix, factor
        self.bad: dict[int, tuple[int, int]] = {}  # record index -> (input_length, estimate)
        self.seen = 0
        self._estimate = lru_cache(maxsize=self.CACHE)(estimate_tokens)

    def __call__(self, index: int, record):
        """The record, or with ``fix`` and a mismatch, the record with the estimated length."""
        self.seen = max(self.seen, index + 1)
        if not record.prompt:
            return record
        est = self._estimate(record.prompt)
        if not (record.input_length > self.factor * est or est > self.factor * record.input_length):
            return record
        self.bad[index] = (record.input_length, est)
        return replace(record, input_length=est) if self.fix else record

    def mismatches(self) -> list[tuple[int, int, int]]:
        return [(i, recorded, est) for i, (recorded, est) in sorted(self.bad.items())]

    def warning(self, source: str) -> str | None:
        """Names the file, how many records disagree and an example; None when all agree."""
        if not self.bad:
            return None
        i, recorded, est = self.mismatches()[0]
        what = ("replaced by the prompts' estimated token counts" if self.fix else
                "kept as recorded (--fix-input-length replaces them by the prompts' token counts)")
        return (f"{source}: {len(self.bad)} of {self.seen} records have an input_length more than "
                f"{self.factor:g}x away from their prompt's token count (record {i}: input_length "
                f"{recorded}, prompt ≈ {est} tokens; characters instead of tokens?); {what}")


def check_input_lengths(records, source: str, *, fix: bool = False,
                        factor: float = LENGTH_MISMATCH_FACTOR) -> tuple[list, str | None]:
    """The records (with ``fix``, mismatched ``input_length``s replaced by the prompt's estimated
    token count) and a warning naming the file, how many records disagree and an example; None
    when all agree."""
    check = InputLengthCheck(fix, factor)
    out = [check(i, r) for i, r in enumerate(records)]
    check.seen = len(out)
    return out, check.warning(source)
