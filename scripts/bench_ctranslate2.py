"""CTranslate2's batch-1 greedy decode time per token on the same weights, for comparison with
``scripts/bench_cpu_decode.py`` (docs/engine.md, "CPU kernels"). A benchmark, not a test.

CTranslate2 is not a dependency of adaserve: run this in an environment of its own, e.g.::

    python3 -m venv /tmp/ct2 && /tmp/ct2/bin/pip install torch==2.13.0 ctranslate2 transformers
    .venv/bin/adaserve bench engine --model smollm2-135m --only overhead --batches 1 >/dev/null  # caches the HF folder
    /tmp/ct2/bin/python scripts/bench_ctranslate2.py ~/.cache/adaserve/smollm2-135m \\
        --compute-type float32 --rounds 7

The Hugging Face folder is converted once (``ct2-transformers-converter``) into ``<folder>-ct2``.
The time per decode token is (generate 65 tokens − generate 1 token) / 64 after a 128-token prompt,
on one thread, median over rounds, so prefill is left out as in the engine's decode step."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPT_TOKENS, NEW_TOKENS = 128, 64


def converted(folder: Path, force: bool) -> Path:
    out = folder.with_name(folder.name + "-ct2")
    if force or not (out / "model.bin").is_file():
        subprocess.run([str(Path(sys.executable).parent / "ct2-transformers-converter"), "--model", str(folder), "--output_dir", str(out),
                        "--force"], check=True)
    return out


def decode_ms_per_token(path: Path, compute_type: str, rounds: int) -> list[float]:
    import ctranslate2

    gen = ctranslate2.Generator(str(path), device="cpu", compute_type=compute_type, intra_threads=1,
                                inter_threads=1)
    vocab = json.loads((path / "vocabulary.json").read_text())
    prompt = vocab[1000:1000 + PROMPT_TOKENS]  # ordinary tokens; greedy continuation, no EOS stop

    def run(n: int) -> float:
        t = time.perf_counter()
        gen.generate_batch([prompt], max_length=n, min_length=n, sampling_topk=1,
                           include_prompt_in_result=False)
        return time.perf_counter() - t

    run(8)  # warm-up
    per = []
    for _ in range(rounds):
        first, full = run(1), run(NEW_TOKENS + 1)
        per.append((full - first) / NEW_TOKENS * 1e3)
    return per


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path, help="Hugging Face model folder (config.json + safetensors)")
    ap.add_argument("--compute-type", default="float32", help="CTranslate2 compute type (float32, bfloat16, int8, ...)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--force-convert", action="store_true")
    args = ap.parse_args(argv)
    if not (args.folder / "config.json").is_file():
        sys.exit(f"{args.folder}: no config.json (a Hugging Face model folder is needed)")
    per = decode_ms_per_token(converted(args.folder, args.force_convert), args.compute_type, args.rounds)
    import ctranslate2
    print(f"ctranslate2 {ctranslate2.__version__} {args.compute_type}, 1 thread: decode "
          f"{statistics.median(per):.2f} ms/token median ({', '.join(f'{x:.2f}' for x in per)})")


if __name__ == "__main__":
    main()
