"""Aligners (offsets, dtw), vocabulary maps and the projection of source top-k onto target tokens.

Property tests run both aligners on arbitrary unicode text with the two tiny tokenizer families
(byte-level BPE like SmolLM2, SentencePiece-style with byte fallback like Gemma); projection
tests use small constructed vocabularies where every expected number can be written down.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from profuser_plugins.aligners.dtw import DTWAligner, normalise
from profuser_plugins.aligners.offsets import OffsetsAligner, byte_spans

from profuser.alignment import (
    EXACT,
    FALLBACK,
    MANY_TO_ONE,
    ONE_TO_MANY,
    SOFT,
    ProjectionParams,
    VocabMap,
    classify,
    project,
    tokenize,
    vocab_map,
    vocab_table,
)
from profuser.components import Tokenized
from profuser.plugins import Engine
from profuser.testing import tiny_tokenizer

tok = functools.cache(tiny_tokenizer)
table = functools.cache(lambda name: vocab_table(tok(name)))
PAIRS = [("llama", "gemma"), ("gemma", "llama")]

# arbitrary unicode, mixed with what tokenizers find hard: emoji (ZWJ sequences too), CJK,
# combining marks, whitespace runs, zero-width characters, ligatures
HARD = st.sampled_from(["🙂", "🚀", "👩\u200d👩\u200d👧", "東京", "北", "é", "e\u0301", " ", "  ", "   ", "\n", "\n\n",
                        "\t", " \n ", "ß", "\u200b", "ﬁ", "\x00", "\r\n", "Ġ", "the", " quick", "fox", "Hello", "!"])
TEXTS = st.lists(st.one_of(st.text(max_size=10), HARD), max_size=24).map("".join)
PROPS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def maps(source: str, target: str, cache_dir) -> VocabMap:
    return vocab_map(tok(source), tok(target), cache_dir=cache_dir)


def categories(target: Tokenized, source: Tokenized, starts, ends, vmap: VocabMap) -> np.ndarray:
    s0 = np.clip(starts, 0, max(len(source.ids) - 1, 0))
    same = (ends - starts == 1) & (vmap.lookup(source.ids[s0], "exact") == target.ids) if len(source.ids) else \
        np.zeros(len(target.ids), dtype=bool)
    return classify(starts, ends, len(source.ids), same)


def check_ranges(starts, ends, n: int, m: int) -> None:
    assert starts.shape == ends.shape == (n,)
    assert ((0 <= starts) & (starts <= ends) & (ends <= m)).all()
    assert (np.diff(starts) >= 0).all()
    full = ends > starts
    assert (np.diff(ends[full]) >= 0).all()


# --- offsets ------------------------------------------------------------------------------------


@PROPS
@given(text=TEXTS)
def test_byte_spans_tile_the_text_and_match_the_token_bytes(text):
    data = text.encode("utf-8")
    for name in ("llama", "gemma"):
        t = tokenize(tok(name), text)
        bs, be = byte_spans(t)
        real = be > bs
        # in text order, contiguous, covering every byte: the offsets cover the text
        assert bs[real].tolist() == [0, *be[real][:-1].tolist()] if real.any() else data == b""
        assert not real.any() or be[real][-1] == len(data)
        if "▁" not in text:  # a literal ▁ is a space to SentencePiece
            pieces = table(name).pieces
            for i in np.flatnonzero(real):
                assert pieces[t.ids[i]] == data[bs[i]:be[i]], (name, t.tokens[i])


@PROPS
@given(text=TEXTS, bos=st.booleans())
def test_offsets_ranges_are_monotone_in_bounds_and_cover_each_target_token(text, bos):
    aligner = OffsetsAligner()
    for target_name, source_name in PAIRS:
        target = tokenize(tok(target_name), text, add_special_tokens=bos)
        source = tokenize(tok(source_name), text, add_special_tokens=bos)
        starts, ends = aligner.align(target, source)
        check_ranges(starts, ends, len(target.ids), len(source.ids))
        tb, te = byte_spans(target)
        sb, se = byte_spans(source)
        for t in np.flatnonzero(te > tb):  # every byte of a target token is under its source range
            assert ends[t] > starts[t]
            assert sb[starts[t]] <= tb[t] and se[ends[t] - 1] >= te[t]
            inner = slice(starts[t], ends[t])
            assert ((sb[inner] < te[t]) & (se[inner] > tb[t]) | (se[inner] == sb[inner])).all()


@PROPS
@given(text=TEXTS)
def test_identical_tokenizers_align_everything_exactly(text, tmp_path_factory):
    cache = tmp_path_factory.getbasetemp() / "maps"
    for name in ("llama", "gemma"):
        t = tokenize(tok(name), text, add_special_tokens=True)
        vmap = maps(name, name, cache)
        for aligner in (OffsetsAligner(), DTWAligner()):
            starts, ends = aligner.align(t, t)
            assert (categories(t, t, starts, ends, vmap) == EXACT).all(), (name, aligner.name)


def test_emoji_split_into_bytes_matches_byte_tokens_one_to_one(tmp_path):
    # llama: 'ĠðŁ' 'Ļ' 'Ĥ' (space + 2 bytes, then 1 + 1); gemma: '▁' '<0xF0>' '<0x9F>' '<0x99>' '<0x82>'
    text = "Hi 🙂"
    llama, gemma = tokenize(tok("llama"), text), tokenize(tok("gemma"), text)
    assert llama.tokens[-3:] == ["ĠðŁ", "Ļ", "Ĥ"]
    assert gemma.tokens[-5:] == ["▁", "<0xF0>", "<0x9F>", "<0x99>", "<0x82>"]
    assert len({tuple(o) for o in llama.offsets[-2:].tolist()}) == 1  # the same character offsets...
    starts, ends = OffsetsAligner().align(gemma, llama)
    cat = categories(gemma, llama, starts, ends, maps("llama", "gemma", tmp_path))
    n = len(llama.ids)
    # ▁, F0, 9F lie inside 'ĠðŁ' (n:1); 99 <-> 'Ļ' and 82 <-> 'Ĥ' exactly
    assert list(zip(starts[-5:], ends[-5:])) == [(n - 3, n - 2)] * 3 + [(n - 2, n - 1), (n - 1, n)]
    assert cat[-5:].tolist() == [MANY_TO_ONE] * 3 + [EXACT, EXACT]


def test_zero_width_tokens_pair_by_position_and_order():
    # BOS on the target only; an end-of-turn on both sides (zero-width at the end, as encode_chat reports)
    text = "ab cd"
    target = Tokenized(text, np.array([1, 10, 11, 2, 3]), np.array([[0, 0], [0, 2], [2, 5], [5, 5], [5, 5]]),
                       ["<bos>", "ab", "▁cd", "<eos>", "\n"])
    source = Tokenized(text, np.array([20, 21, 22, 9]), np.array([[0, 1], [1, 2], [2, 5], [5, 5]]),
                       ["a", "b", "Ġcd", "<|im_end|>"])
    starts, ends = OffsetsAligner().align(target, source)
    assert starts.tolist() == [0, 0, 2, 3, 4]
    assert ends.tolist() == [0, 2, 3, 4, 4]


def test_offsets_rejects_different_texts():
    a = Tokenized("ab", np.array([1]), np.array([[0, 2]]), ["ab"])
    b = Tokenized("ac", np.array([1]), np.array([[0, 2]]), ["ac"])
    with pytest.raises(ValueError, match="different texts"):
        OffsetsAligner().align(a, b)


# --- dtw ----------------------------------------------------------------------------------------


def dtw_reference(a: list[str], b: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """FuseLLM's loops, written out: the cumulative matrix and each b-token's a-range."""
    from rapidfuzz.distance import Levenshtein

    m, n = len(a), len(b)
    D = np.full((m + 1, n + 1), np.inf)
    D[0, 0] = 0
    for i in range(m):
        for j in range(n):
            D[i + 1, j + 1] = Levenshtein.distance(a[i], b[j]) + min(D[i, j + 1], D[i + 1, j], D[i, j])
    return D[1:, 1:]


@PROPS
@given(text=TEXTS)
def test_dtw_matches_the_reference_loops_and_covers_every_token(text):
    from profuser_plugins.aligners.dtw import dtw_matrix

    for target_name, source_name in PAIRS:
        target, source = tokenize(tok(target_name), text), tokenize(tok(source_name), text)
        starts, ends = DTWAligner().align(target, source)
        n, m = len(target.ids), len(source.ids)
        check_ranges(starts, ends, n, m)
        if n and m:
            a, b = [normalise(t) for t in source.tokens], [normalise(t) for t in target.tokens]
            from rapidfuzz.distance import Levenshtein
            from rapidfuzz.process import cdist

            if n * m <= 2500:  # the reference is a Python double loop
                np.testing.assert_array_equal(dtw_matrix(cdist(a, b, scorer=Levenshtein.distance)), dtw_reference(a, b))
            # a warping path: every token on both sides is visited, steps of at most one
            assert (ends > starts).all() and starts[0] == 0 and ends[-1] == m
            assert ((starts[1:] == ends[:-1]) | (starts[1:] == ends[:-1] - 1)).all()


def test_dtw_normalises_markers_and_byte_tokens():
    assert normalise("Ġthe") == normalise("▁the") == "the"
    assert normalise("<0x0A>") == normalise("Ċ") == "\n"
    assert normalise("##ing") == "ing"


# --- vocabulary maps ----------------------------------------------------------------------------


def test_vocab_map_normalises_markers_bytes_and_roles(tmp_path):
    vmap = maps("gemma", "llama", tmp_path)
    g, l_ = tok("gemma"), tok("llama")
    gid, lid = g.convert_tokens_to_ids, l_.convert_tokens_to_ids
    assert vmap.lookup(np.array([gid("▁the")]), "exact")[0] == lid("Ġthe")
    assert vmap.lookup(np.array([gid("<0xF0>")]), "exact")[0] == lid("ð")
    assert vmap.lookup(np.array([gid("<0x0A>")]), "exact")[0] == lid("Ċ")
    assert vmap.lookup(np.array([g.eos_token_id]), "exact")[0] == l_.eos_token_id  # by role
    assert vmap.lookup(np.array([gid("<start_of_turn>"), -5, 10**9]), "exact").tolist() == [-1, -1, -1]


def test_prefix_map_is_the_longest_target_prefix(tmp_path):
    vmap = maps("gemma", "llama", tmp_path)
    source, target = table("gemma"), table("llama")
    target_ids = {p: i for i, p in enumerate(target.pieces) if p is not None}
    checked = 0
    for i in np.flatnonzero((vmap.exact < 0) & (vmap.prefix >= 0)):
        piece, got = source.pieces[i], target.pieces[vmap.prefix[i]]
        assert piece.startswith(got) and len(got) < len(piece)
        assert not any(piece[:n] in target_ids for n in range(len(got) + 1, len(piece)))
        checked += 1
    assert checked > 10


def test_soft_map_is_the_nearest_by_edit_distance_and_cached(tmp_path):
    from rapidfuzz.distance import Levenshtein

    vmap = maps("gemma", "llama", tmp_path)
    source, target = table("gemma"), table("llama")
    ids = np.flatnonzero((vmap.exact < 0) & np.array([p is not None for p in source.pieces]))[:5]
    soft = vmap.lookup(ids, "soft")
    for i, j in zip(ids, soft):
        query = source.pieces[i].decode("latin-1")
        nearest = min(Levenshtein.distance(query, p.decode("latin-1")) for p in target.pieces if p is not None)
        assert Levenshtein.distance(query, target.pieces[j].decode("latin-1")) == nearest
    vmap.save()
    again = maps("gemma", "llama", tmp_path)  # from disk: the soft entries came along
    assert again.soft[ids].tolist() == soft.tolist()
    assert (again.exact == vmap.exact).all()


def test_vocab_map_cache_is_keyed_by_both_tokenizers_and_survives_damage(tmp_path):
    first = maps("gemma", "llama", tmp_path)
    files = sorted((tmp_path / "vocab-maps").glob("*.npz"))
    assert len(files) == 1 and first.path == files[0]
    maps("llama", "gemma", tmp_path)
    assert len(list((tmp_path / "vocab-maps").glob("*.npz"))) == 2
    files[0].write_bytes(b"not an npz")
    rebuilt = maps("gemma", "llama", tmp_path)
    assert (rebuilt.exact == first.exact).all()


# --- classification and projection on constructed cases ----------------------------------------

# source vocabulary 0..5, target vocabulary 0..9
EXACT_MAP = np.array([-1, 9, 7, 8, -1, 8], dtype=np.int32)  # 3 and 5 both map to 8 (duplicates)
PREFIX_MAP = np.array([6, 9, 7, 8, 6, 8], dtype=np.int32)


def toy_map() -> VocabMap:
    return VocabMap("src", "tgt", EXACT_MAP.copy(), PREFIX_MAP.copy(), EXACT_MAP.copy(), target_size=10)


def source_dist(token_ids, topk_ids, topk_logits, logz):
    """nll consistent with the logits: nll = logz - logit(actual) where the actual is in the top-k."""
    topk_ids, topk_logits = np.array(topk_ids), np.array(topk_logits, dtype=np.float16)
    logz = np.array(logz, dtype=np.float32)
    nll = np.array([logz[i] - topk_logits[i][list(topk_ids[i]).index(t)] for i, t in enumerate(token_ids)], dtype=np.float32)
    return np.array(token_ids), topk_ids, topk_logits, logz, nll


def teacher_dict(teacher, row) -> dict[int, float]:
    return {int(i): float(v) for i, v in zip(teacher.ids[row], teacher.logits[row]) if np.isfinite(v)}


def test_one_to_one_maps_topk_drops_unmappable_and_merges_duplicates():
    src = source_dist([2], [[2, 3, 5, 4]], [[5.0, 4.0, 4.0, 3.0]], [6.0])
    t = project(np.array([7]), *src, np.array([0]), np.array([1]), toy_map(),
                ProjectionParams(vocab="exact"))
    assert t.category.tolist() == [EXACT]
    got = teacher_dict(t, 0)
    assert got.keys() == {7, 8}  # 4 has no exact target
    assert got[7] == pytest.approx(5.0) and got[8] == pytest.approx(4.0 + np.log(2), abs=1e-3)
    assert t.ids[0, 0] == 7 and np.isneginf(t.logits[0, 2:]).all() and t.mask.all()
    # the prefix map keeps 4 (as target 6)
    t = project(np.array([7]), *src, np.array([0]), np.array([1]), toy_map(), ProjectionParams())
    assert teacher_dict(t, 0)[6] == pytest.approx(3.0)


def test_one_to_many_gives_the_target_token_the_source_path_probability():
    # target token 7 covers source tokens [2, 1]: p = p(2) * p(1 | 2)
    src = source_dist([2, 1], [[2, 1, 0, 4], [1, 3, 0, 4]], [[5.0, 3.0, 2.0, 1.0], [4.0, 1.0, 0.0, -1.0]], [6.0, 4.5])
    t = project(np.array([7]), *src, np.array([0]), np.array([2]), toy_map(), ProjectionParams(vocab="exact"))
    assert t.category.tolist() == [ONE_TO_MANY]
    path = 6.0 - (src[4][0] + src[4][1])  # logz(first) - (nll(2) + nll(1))
    assert teacher_dict(t, 0) == pytest.approx({7: path, 9: 3.0})
    # FuseLLM's rule: one-hot on the target token
    t = project(np.array([7]), *src, np.array([0]), np.array([2]), toy_map(), ProjectionParams(spans="one_hot"))
    assert teacher_dict(t, 0) == {7: 0.0}


def test_many_to_one_head_takes_the_distribution_the_rest_one_hot():
    # target tokens 7, 8 lie inside source token 0 (no exact target: the realised token goes to the head)
    src = source_dist([0], [[0, 1, 2, 4]], [[5.0, 4.0, 2.0, 1.0]], [6.0])
    t = project(np.array([7, 8]), *src, np.array([0, 0]), np.array([1, 1]), toy_map(),
                ProjectionParams(vocab="exact"))
    assert t.category.tolist() == [MANY_TO_ONE, MANY_TO_ONE]
    assert teacher_dict(t, 0) == pytest.approx({7: 5.0 + np.log1p(np.exp(-3.0)), 9: 4.0})  # 2 -> 7 adds to the path
    assert teacher_dict(t, 1) == {8: 0.0}


def test_fallback_is_one_hot_or_masked_and_mismatched_text_falls_back():
    src = source_dist([2, 3], [[2, 3, 0, 4], [3, 2, 0, 4]], [[5.0, 4.0, 0.0, -1.0], [5.0, 4.0, 0.0, -1.0]], [6.0, 6.0])
    # token 0: nothing corresponds; token 1: one source token whose text (8) is not the target's (9)
    starts, ends = np.array([0, 1]), np.array([0, 2])
    t = project(np.array([7, 9]), *src, starts, ends, toy_map())
    assert t.category.tolist() == [FALLBACK, FALLBACK]
    assert teacher_dict(t, 0) == {7: 0.0} and teacher_dict(t, 1) == {9: 0.0} and t.mask.all()
    t = project(np.array([7, 9]), *src, starts, ends, toy_map(), ProjectionParams(fallback="mask"))
    assert not t.mask.any() and np.isneginf(t.logits).all()
    # the soft map pairs 3 with 9: projected, counted apart
    vmap = toy_map()
    vmap.soft[3] = 9
    t = project(np.array([7, 9]), *src, starts, ends, vmap, ProjectionParams(vocab="soft"))
    assert t.category.tolist() == [FALLBACK, SOFT]
    assert teacher_dict(t, 1)[9] == pytest.approx(5.0)


def test_classify_crossing_boundaries_is_fallback():
    # target "ab|cd" over source "a|bc|d": ranges overlap, neither 1:n nor n:1
    cat = classify(np.array([0, 1]), np.array([2, 3]), 3, np.zeros(2, dtype=bool))
    assert cat.tolist() == [FALLBACK, FALLBACK]


def test_projection_on_real_alignment_keeps_k_slots_and_sorted_logits(tmp_path):
    text = "Hello! 東京 🙂 naïve résumé, the quick brown fox."
    target, source = tokenize(tok("llama"), text), tokenize(tok("gemma"), text)
    rng = np.random.default_rng(0)
    m, k = len(source.ids), 5
    topk = rng.integers(0, len(tok("gemma")), size=(m, k))
    topk[:, 0] = source.ids
    logits = np.sort(rng.normal(size=(m, k)).astype(np.float16), axis=1)[:, ::-1]
    logz = logits.astype(np.float32).max(1) + 1.0
    nll = logz - logits[:, 0].astype(np.float32)
    starts, ends = OffsetsAligner().align(target, source)
    t = project(target.ids, source.ids, topk, logits, logz, nll, starts, ends, maps("gemma", "llama", tmp_path))
    assert t.ids.shape == t.logits.shape == (len(target.ids), k)
    finite = np.where(np.isfinite(t.logits), t.logits, -1e9)
    assert (np.diff(finite, axis=1) <= 0).all()
    for row in range(len(target.ids)):  # no id twice among the used slots
        used = t.ids[row][np.isfinite(t.logits[row])]
        assert len(set(used.tolist())) == len(used)
    assert t.mask.all() and (t.ids[:, 0] >= 0).all()


def test_aligners_are_registered():
    registry = Engine(entrypoints=False).registry
    assert {"offsets", "dtw"} <= set(registry.names("aligners"))
    assert registry.build("aligners", "dtw").params.model_dump() == {"vocab": "exact", "spans": "one_hot", "fallback": "one_hot"}
    assert registry.build("aligners", "offsets", {"vocab": "soft"}).params.vocab == "soft"


@pytest.mark.slow
def test_real_smollm2_and_gemma3_tokenizers(tmp_path):
    """The packaged models' tokenizers (first use dequantises the GGUF files: about a minute)."""
    from profuser.models import load_tokenizer

    smol = load_tokenizer("builtin:smollm2-135m-instruct", engine=Engine())
    gemma = load_tokenizer("builtin:gemma3-270m", engine=Engine())
    text = "Step 1: translate 東京 (Tokyo) 🙂 — naïve résumé.\n\n  The capital of France is Paris."
    target, source = tokenize(smol, text), tokenize(gemma, text, add_special_tokens=True)
    assert "Ġæ" in target.tokens  # 東 split into bytes with overlapping character offsets
    vmap = vocab_map(gemma, smol, cache_dir=tmp_path)
    offsets = categories(target, source, *OffsetsAligner().align(target, source), vmap)
    dtw = categories(target, source, *DTWAligner().align(target, source), vmap)
    assert (offsets == EXACT).mean() >= (dtw == EXACT).mean()
    # SmolLM2's five byte tokens of " 東京" lie inside Gemma's one token; plain English matches 1:1
    first = target.tokens.index("Ġæ")
    assert target.tokens[first:first + 5] == ["Ġæ", "Ŀ", "±", "äº", "¬"]
    assert (offsets[first:first + 5] == MANY_TO_ONE).all()
    # "\n\n  The": Gemma '\n\n' '▁▁' 'The' vs SmolLM2 ... 'ĠThe': crossing boundaries, a fallback
    tail = target.tokens.index("ĠThe")
    assert offsets[tail] == FALLBACK and (offsets[tail + 1:] == EXACT).all()
    tb, te = byte_spans(target)
    assert (tb[1:] == te[:-1]).all() and te[-1] == len(text.encode())
