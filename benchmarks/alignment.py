"""Token alignment: speed and match shares of the ``offsets`` and ``dtw`` aligners. Prints JSON.

    .venv/bin/python benchmarks/alignment.py                   # SmolLM2 <-> Gemma-3, the Orca sample
    .venv/bin/python benchmarks/alignment.py --lengths 256 1024 --repeats 3 --loop-texts 8   # quicker

On the GT responses of ``--data`` (any format the ``file`` dataset source reads), in both
directions (target SmolLM2 / source Gemma-3 and the reverse):

* ``corpus``: per aligner, target tokens per second of ``Aligner.align`` alone (tokenisation is
  done once beforehand and reported apart: the pipeline has both tokenisations anyway) and the
  shares of target tokens per category (``profuser.alignment.classify``);
* ``lengths``: windows of exactly L target tokens cut from the concatenated responses, seconds per
  window for each aligner (dtw up to ``--dtw-max-length``): linear growth shows as a time per token
  that stays flat (or falls, while the fixed per-call cost still shows) as L grows;
* ``fusellm_loop``: FuseLLM's own formulation (a Python double loop over the DTW matrix, one edit
  distance per cell) on the first ``--loop-texts`` responses, to compare with FuseLLM's published
  throughput on the same kind of text.

Timings are the minimum over ``--repeats`` runs (``--offsets-repeats`` for the cheap offsets
timings): on a shared machine the minimum is the least disturbed run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = Path("/work/shared/data/instruct/orca-sample.jsonl")
MODELS = {"smollm2": "builtin:smollm2-135m-instruct", "gemma3": "builtin:gemma3-270m"}


def best_time(align, pairs, repeats: int) -> float:
    """Minimum over ``repeats`` runs of ``align(target, source)`` over all pairs, in seconds."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for target, source in pairs:
            align(target, source)
        best = min(best, time.perf_counter() - t0)
    return best


def categories(vmap, target, source, starts, ends) -> np.ndarray:
    from profuser.alignment import classify

    s0 = np.clip(starts, 0, max(len(source.ids) - 1, 0))
    same = (ends - starts == 1) & (vmap.lookup(source.ids[s0], "exact") == target.ids)
    return classify(starts, ends, len(source.ids), same)


def fusellm_loop(target, source) -> None:
    """FuseLLM's dtw(): the matrix cell by cell in Python, then the same backtrack."""
    from profuser_plugins.aligners.dtw import normalise, warping_path
    from rapidfuzz.distance import Levenshtein

    a, b = [normalise(t) for t in source.tokens], [normalise(t) for t in target.tokens]
    D = np.full((len(a) + 1, len(b) + 1), np.inf)
    D[0, 0] = 0
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            D[i + 1, j + 1] = Levenshtein.distance(x, y) + min(D[i, j + 1], D[i + 1, j], D[i, j])
    warping_path(D[1:, 1:])


def windows(tokenizer, texts: list[str], length: int, count: int) -> list[str]:
    """Up to ``count`` texts of exactly ``length`` target tokens, cut from the joined corpus."""
    from profuser.alignment import tokenize

    joined = "\n\n".join(texts)
    tok = tokenize(tokenizer, joined)
    out = []
    for w in range(min(count, len(tok.ids) // length)):
        first, last = tok.offsets[w * length, 0], tok.offsets[(w + 1) * length - 1, 1]
        text = joined[first:last]
        if len(tokenize(tokenizer, text).ids) == length:  # a cut inside a merge can change the count
            out.append(text)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--lengths", type=int, nargs="*", default=[256, 1024, 4096, 16384])
    parser.add_argument("--dtw-max-length", type=int, default=4096, help="longer windows: offsets only (dtw is O(n·m) memory)")
    parser.add_argument("--windows", type=int, default=4, help="windows per length")
    parser.add_argument("--repeats", type=int, default=5, help="runs per dtw timing (minimum taken)")
    parser.add_argument("--offsets-repeats", type=int, default=25, help="runs per offsets timing (milliseconds each)")
    parser.add_argument("--loop-texts", type=int, default=32)
    parser.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))

    from profuser.alignment import CATEGORIES, AlignmentCounts, dataset_responses, tokenize, vocab_map
    from profuser.models import load_tokenizer
    from profuser.plugins import Engine

    engine = Engine()  # its plugins build the aligners and resolve the builtin: refs
    aligners = {name: engine.registry.build("aligners", name) for name in ("offsets", "dtw")}
    tokenizers = {key: load_tokenizer(ref, cache_dir=args.cache_dir, engine=engine) for key, ref in MODELS.items()}
    texts = dataset_responses(args.data)
    result = {"data": str(args.data), "texts": len(texts), "repeats": {"dtw": args.repeats, "offsets": args.offsets_repeats},
              "directions": {}}

    for target_key, source_key in (("smollm2", "gemma3"), ("gemma3", "smollm2")):
        target_tok, source_tok = tokenizers[target_key], tokenizers[source_key]
        vmap = vocab_map(source_tok, target_tok, cache_dir=args.cache_dir)
        t0 = time.perf_counter()
        pairs = [(tokenize(target_tok, t), tokenize(source_tok, t)) for t in texts]
        tokenize_s = time.perf_counter() - t0
        n_target = sum(len(t.ids) for t, _ in pairs)
        corpus = {}
        for name, aligner in aligners.items():
            reps = args.offsets_repeats if name == "offsets" else args.repeats
            seconds = best_time(aligner.align, pairs, reps)
            counts = AlignmentCounts()
            for t, s in pairs:
                counts.add(categories(vmap, t, s, *aligner.align(t, s)))
            corpus[name] = {"seconds": seconds, "tokens_per_second": n_target / seconds,
                            **{k: round(v, 4) for k, v in counts.shares().items()}}
        corpus["speedup"] = corpus["offsets"]["tokens_per_second"] / corpus["dtw"]["tokens_per_second"]

        lengths = {}
        for length in args.lengths:
            cut = windows(target_tok, texts, length, args.windows)
            if not cut:
                continue
            wpairs = [(tokenize(target_tok, t), tokenize(source_tok, t)) for t in cut]
            row = {"windows": len(cut)}
            for name, aligner in aligners.items():
                if name == "dtw" and length > args.dtw_max_length:
                    continue
                reps = args.offsets_repeats if name == "offsets" else args.repeats if length <= 1024 else 2
                seconds = best_time(aligner.align, wpairs, reps) / len(cut)
                row[name] = {"seconds_per_text": seconds, "us_per_token": 1e6 * seconds / length}
            if "dtw" in row:
                row["speedup"] = row["dtw"]["seconds_per_text"] / row["offsets"]["seconds_per_text"]
            lengths[str(length)] = row

        loop_pairs = pairs[: args.loop_texts]
        loop_tokens = sum(len(t.ids) for t, _ in loop_pairs)
        loop_s = best_time(fusellm_loop, loop_pairs, 1)
        result["directions"][f"{target_key}<-{source_key}"] = {
            "target_tokens": n_target,
            "source_tokens": sum(len(s.ids) for _, s in pairs),
            "mean_target_tokens_per_text": n_target / max(len(pairs), 1),
            "tokenize_seconds": tokenize_s,
            "vocab_exact_share": float((vmap.exact >= 0).mean()),
            "corpus": corpus,
            "lengths": lengths,
            "fusellm_loop": {"texts": len(loop_pairs), "target_tokens": loop_tokens,
                             "tokens_per_second": loop_tokens / loop_s},
        }
    result["categories"] = list(CATEGORIES)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
