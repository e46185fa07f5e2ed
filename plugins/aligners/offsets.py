"""``offsets``: align two tokenisations of one text through their byte spans, in linear time.

Fast tokenizers report each token's character span. Converted to UTF-8 byte spans, the tokens of
both sides tile the same byte string, so a target token corresponds to the source tokens whose
spans overlap its own: two ``searchsorted`` calls over the sorted span ends/starts, O(n + m).
Works for any fast tokenizer (byte-level BPE, SentencePiece with byte fallback, WordPiece):
whitespace markers (``Ġ``, ``▁``) never enter, because spans, not token strings, are compared.

Two details need more than the character spans:

* a byte-level BPE splits a multi-byte character into several tokens that all report the same
  character (SmolLM2: ``Ġæ`` (11, 13), ``Ŀ`` (12, 13), ``±`` (12, 13) for `` 東``). Where the spans
  of consecutive tokens overlap, the boundary is placed from the tokens' byte lengths
  (``<0xNN>`` is one byte, a byte-level symbol is one byte), so that byte tokens of both sides can
  match one to one;
* zero-width tokens (BOS, or an end-of-turn after the response, reported as (0, 0) or (len, len))
  overlap nothing; those at the same position are paired in order, extras get an empty range.
"""

from __future__ import annotations

import numpy as np

from profuser import hookimpl
from profuser.alignment import ProjectionParams, byte_level_alphabet
from profuser.components import Aligner, Tokenized


def _n_bytes(token: str) -> int:
    """UTF-8 bytes a token string stands for (only used inside split characters)."""
    if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        return 1
    if all(c in byte_level_alphabet() for c in token):
        return len(token)
    return len(token.replace("▁", " ").encode("utf-8"))


def byte_spans(tok: Tokenized) -> tuple[np.ndarray, np.ndarray]:
    """[n] UTF-8 byte start and end of every token in ``tok.text`` (start == end: zero-width)."""
    offsets = np.asarray(tok.offsets).reshape(-1, 2)  # [n, 2] characters
    cs, ce = offsets[:, 0], offsets[:, 1]
    if tok.text.isascii():  # one byte per character, no character split across tokens
        return cs, ce
    data = np.frombuffer(tok.text.encode("utf-8"), dtype=np.uint8)  # [bytes]
    # byte offset of each character (UTF-8 continuation bytes are 10xxxxxx), and of the end
    pos = np.append(((data & 0xC0) != 0x80).nonzero()[0], len(data))  # [chars + 1]
    bs, be = pos[cs], pos[ce]
    # consecutive tokens sharing a character (a byte-level BPE split it): rare, so a loop there only
    for t in (cs[1:] < ce[:-1]).nonzero()[0].tolist():
        u = t + 1
        cut = int(bs[t]) + _n_bytes(tok.tokens[t])
        if bs[t] < cut <= be[t] and pos[cs[u]] <= cut <= be[u]:
            be[t] = cut
            bs[u] = max(int(bs[u]), cut)
    return bs, be


def _rank_keys(positions: np.ndarray, scale: int) -> np.ndarray:
    """position * scale + (index among the tokens at that position), for order-preserving pairing."""
    order = np.argsort(positions, kind="stable")
    sorted_pos = positions[order]
    rank = np.empty(len(positions), dtype=np.int64)
    rank[order] = np.arange(len(positions)) - np.searchsorted(sorted_pos, sorted_pos, side="left")
    return positions * scale + rank


class OffsetsAligner(Aligner):
    """Linear-time alignment by byte spans (module docstring). Projection defaults: the ``prefix``
    vocabulary map and the ``chain`` rule for 1:n / n:1 spans (docs/alignment.md).

    Ranges: ``starts`` is non-decreasing; an empty range sits where the token falls between
    source tokens. Both spans are sorted (tokens are in text order), so for target token t the
    overlapping source tokens are ``[first source ending after t starts, first source starting at
    or after t ends)`` — clamped to be empty rather than negative where t covers no byte."""

    name = "offsets"

    class Params(ProjectionParams):
        pass

    def align(self, target: Tokenized, source: Tokenized) -> tuple[np.ndarray, np.ndarray]:
        if target.text != source.text:
            raise ValueError("target and source tokenise different texts")
        tb, te = byte_spans(target)  # [n]
        sb, se = byte_spans(source)  # [m]
        starts = se.searchsorted(tb, side="right").astype(np.int64)
        ends = np.maximum(sb.searchsorted(te, side="left"), starts)
        t_zero = te <= tb
        if t_zero.any():
            # zero-width target tokens overlap nothing; pair them in order with the zero-width
            # source tokens at the same position (BOS with BOS, end-of-turn with end-of-turn)
            t_zero = t_zero.nonzero()[0]
            ends[t_zero] = starts[t_zero]
            s_zero = (se <= sb).nonzero()[0]
            if len(s_zero):
                scale = len(tb) + len(sb) + 1
                t_key, s_key = _rank_keys(tb[t_zero], scale), _rank_keys(sb[s_zero], scale)
                order = np.argsort(s_key)
                at = np.clip(np.searchsorted(s_key[order], t_key), 0, len(s_key) - 1)
                hit = s_key[order][at] == t_key
                starts[t_zero[hit]] = s_zero[order][at[hit]]
                ends[t_zero[hit]] = starts[t_zero[hit]] + 1
        return starts, ends


@hookimpl
def profuser_register_aligners(register):
    register(OffsetsAligner)
