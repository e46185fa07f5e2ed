"""``dtw``: FuseLLM's token alignment — dynamic time warping over token edit distance, O(n·m).

The paper (§4.1) aligns tokens "following prior work" (FuseLLM, Wan et al. 2024): the source and
target token strings, whitespace markers removed, are aligned by DTW with the Levenshtein distance
as the local cost; every target token gets the source tokens the warping path visits in its
column. This keeps FuseLLM's path and tie-breaking (diagonal, then source step, then target step)
but computes it with whole-row numpy operations instead of a Python double loop: the cost matrix
comes from ``rapidfuzz.process.cdist``, and each DP row is a min-plus scan solved in closed form
(``x_j = C_j + min_{k<=j}(u_k - C_{k-1})``). Quadratic time and memory remain: it is the baseline
the linear ``offsets`` aligner is measured against (docs/benchmarks.md).

Token strings are normalised as FuseLLM does (``Ġ``/``▁`` removed), plus byte-level newline/tab
symbols and ``<0xNN>`` byte tokens turned into the characters they stand for, so that the two
tokenizer families it did not know compare at all. Projection defaults reproduce FuseLLM: the
``exact`` vocabulary map, one-hot for 1:n / n:1 spans and for mismatches.
"""

from __future__ import annotations

import re

import numpy as np

from profuser import hookimpl
from profuser.alignment import ProjectionParams, SpanRule, VocabRule
from profuser.components import Aligner, Tokenized

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_SYMBOLS = str.maketrans({"Ġ": "", "▁": "", "Ċ": "\n", "ĉ": "\t", "č": "\r"})


def normalise(token: str) -> str:
    """A token string as FuseLLM compares it: whitespace markers dropped."""
    m = _BYTE_TOKEN.match(token)
    if m:
        return chr(int(m.group(1), 16))
    return token.removeprefix("##").translate(_SYMBOLS)


def dtw_matrix(cost: np.ndarray) -> np.ndarray:
    """[m, n] cumulative DTW cost: D[i, j] = cost[i, j] + min(D[i-1, j], D[i, j-1], D[i-1, j-1])."""
    m, n = cost.shape
    D = np.empty((m, n), dtype=np.float64)
    u = np.empty(n, dtype=np.float64)  # [n] best way into row i from row i-1 (up or diagonal)
    shifted = np.empty(n, dtype=np.float64)
    for i in range(m):
        row = cost[i].astype(np.float64)
        csum = np.cumsum(row)  # C_j
        if i == 0:
            u.fill(np.inf)
            u[0] = 0.0
        else:
            shifted[0] = np.inf
            shifted[1:] = D[i - 1, :-1]
            np.minimum(D[i - 1], shifted, out=u)
        # x_j = c_j + min(x_{j-1}, u_j)  <=>  x_j = C_j + min_{k<=j} (u_k - C_{k-1})
        np.subtract(u, csum - row, out=shifted)
        np.minimum.accumulate(shifted, out=shifted)
        np.add(csum, shifted, out=D[i])
    return D


def warping_path(D: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The path from (m-1, n-1) back to (0, 0), FuseLLM's tie-break; returns (rows, cols), forward."""
    i, j = D.shape[0] - 1, D.shape[1] - 1
    rows, cols = [i], [j]
    inf = np.inf
    while i > 0 or j > 0:
        diag = D[i - 1, j - 1] if i > 0 and j > 0 else inf
        up = D[i - 1, j] if i > 0 else inf
        left = D[i, j - 1] if j > 0 else inf
        if diag <= up and diag <= left:
            i, j = i - 1, j - 1
        elif up <= left:
            i -= 1
        else:
            j -= 1
        rows.append(i)
        cols.append(j)
    return np.array(rows[::-1], dtype=np.int64), np.array(cols[::-1], dtype=np.int64)


class DTWAligner(Aligner):
    """FuseLLM's DTW alignment (module docstring); projection defaults reproduce FuseLLM."""

    name = "dtw"

    class Params(ProjectionParams):
        vocab: VocabRule = "exact"
        spans: SpanRule = "one_hot"

    def align(self, target: Tokenized, source: Tokenized) -> tuple[np.ndarray, np.ndarray]:
        from rapidfuzz.distance import Levenshtein
        from rapidfuzz.process import cdist

        n, m = len(target.tokens), len(source.tokens)
        starts = np.zeros(n, dtype=np.int64)
        ends = np.zeros(n, dtype=np.int64)
        if n == 0 or m == 0:
            return starts, ends
        a = [normalise(t) for t in source.tokens]
        b = [normalise(t) for t in target.tokens]
        cost = cdist(a, b, scorer=Levenshtein.distance, dtype=np.int32)  # [m, n]
        rows, cols = warping_path(dtw_matrix(cost))
        # the path is monotone: each target column's source rows are contiguous
        starts.fill(m)
        np.minimum.at(starts, cols, rows)
        np.maximum.at(ends, cols, rows + 1)
        return starts, ends


@hookimpl
def profuser_register_aligners(register):
    register(DTWAligner)
