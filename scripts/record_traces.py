"""Record routing traces of a model over held-out corpus documents: one prefill trace
(the prompts' tokens) and one decode trace (the replies'), for judging cache policies on
routing they were not fitted to.

    python scripts/record_traces.py CORPUS_DIR OUT_PREFIX [--model FOLDER] \
        [--prompts 40] [--prompt-chars 600] [--max-tokens 48]

Prompts are the opening characters of the last tenth of each corpus file's documents
(the slice the embedded model never trained on), taken in turn from each file so that
the topic changes from one prompt to the next, as in a chat session. Greedy decoding,
no chat template, a fixed number of tokens per reply. Writes OUT_PREFIX-prefill.npz and
OUT_PREFIX-decode.npz.
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

from mlx_pager.engine import Engine
from mlx_pager.settings import Settings
from mlx_pager.sim.trace import attach_recorder


def held_out_documents(path: Path) -> list[str]:
    """The last tenth of a corpus file's distinct documents (blank-line separated; one a
    line when the file has no blank lines)."""
    text = path.read_text()
    docs = [d.strip() for d in text.split("\n\n")] if "\n\n" in text else text.splitlines()
    docs = list(dict.fromkeys(d for d in docs if len(d) > 200))
    return docs[len(docs) - len(docs) // 10 :]


def prompts(corpus: Path, per_file: int, chars: int) -> list[tuple[str, str]]:
    """(domain, prompt) pairs, one file after another in turn."""
    files = sorted(corpus.glob("*.txt"))
    by_file = [[(f.stem, d[:chars]) for d in held_out_documents(f)[:per_file]] for f in files]
    return [p for group in itertools.zip_longest(*by_file) for p in group if p is not None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("corpus", type=Path, help="folder of .txt files (documents)")
    parser.add_argument("out", help="output prefix")
    parser.add_argument("--model", help="model folder (default: the embedded model)")
    parser.add_argument("--prompts", type=int, default=40, help="prompts per corpus file")
    parser.add_argument("--prompt-chars", type=int, default=600)
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
    engine = Engine.open(args.model, settings=Settings(task_preload=False), budget="4GB")
    engine.keep_prompt_cache = False  # every prompt prefilled in full
    engine.learn = False
    pairs = prompts(args.corpus, args.prompts, args.prompt_chars)
    recorder = attach_recorder(engine, phase="decode")
    start = time.perf_counter()
    try:
        for i, (domain, text) in enumerate(pairs):
            recorder.pending_text = text
            for _ in engine.generate(
                text, max_tokens=args.max_tokens, chat_template=False, ignore_eos=True
            ):
                pass
            recorder.end_sequence(label=domain)
            if i % 20 == 0:
                print(f"{i + 1}/{len(pairs)} prompts, {time.perf_counter() - start:.0f} s",
                      flush=True)  # fmt: skip
    finally:
        engine.close()
    for phase in ("prefill", "decode"):
        trace = recorder.to_trace(phase)
        recorder.save(f"{args.out}-{phase}.npz", phase)
        print(f"{args.out}-{phase}.npz: {trace.num_tokens} tokens, {trace.num_sequences} "
              f"sequences, {trace.num_layers} layers, {trace.num_experts} experts, "
              f"top-{trace.top_k}")  # fmt: skip


if __name__ == "__main__":
    main()
