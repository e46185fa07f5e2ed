"""Token alignment: vocabulary maps between tokenizers, and the projection of a source model's
top-k distributions onto the target's tokens and vocabulary.

An aligner (``plugins/aligners/``) says which source tokens correspond to each target token of the
same text (a contiguous range ``[starts[t], ends[t])``). This module turns that into a teacher on
the target's positions (see docs/alignment.md for the rules and why):

* every target token gets a **category** from its range: ``exact`` (one source token, not shared,
  identical text), ``one_to_many`` (a target token covering several source tokens, none shared),
  ``many_to_one`` (several target tokens inside one source token), ``soft`` (one source token with a
  different text that the edit-distance map pairs with the target token; only with ``vocab: soft``)
  and ``fallback`` (no source token, crossing boundaries, or one source token with another text);
* ``project`` builds the teacher per category: the source's top-k mapped into target ids where a
  source distribution starts where the target token starts, one-hot on the target token elsewhere.

Vocabulary maps compare what tokens *stand for*: the bytes of text they decode to (byte-level
``Ġ``/``Ċ`` symbols, SentencePiece ``▁`` and ``<0xNN>`` byte fallback, WordPiece ``##`` undone),
so ``Ġthe`` (byte-level BPE) and ``▁the`` (SentencePiece) are the same token. They are computed
once per tokenizer pair and cached on disk under the model cache, keyed by both tokenizers' hashes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .components import StrictModel, Tokenized

__all__ = [
    "CATEGORIES",
    "EXACT",
    "FALLBACK",
    "MANY_TO_ONE",
    "ONE_TO_MANY",
    "SOFT",
    "AlignmentCounts",
    "FallbackRule",
    "ProjectionParams",
    "SpanRule",
    "Teacher",
    "VocabMap",
    "VocabRule",
    "VocabTable",
    "align_report",
    "byte_level_alphabet",
    "classify",
    "dataset_responses",
    "project",
    "tokenize",
    "tokenizer_hash",
    "vocab_map",
    "vocab_table",
]

# target-token categories (int8 codes, stored per token in aligned.parquet)
EXACT, ONE_TO_MANY, MANY_TO_ONE, SOFT, FALLBACK = 0, 1, 2, 3, 4
CATEGORIES = ("exact", "one_to_many", "many_to_one", "soft", "fallback")

MAP_FORMAT = "2"  # bump when the cached map's meaning changes

VocabRule = Literal["exact", "prefix", "soft"]
SpanRule = Literal["chain", "one_hot"]
FallbackRule = Literal["one_hot", "mask"]


class ProjectionParams(StrictModel):
    """How aligned source distributions become target teachers; every aligner's params include these.

    ``vocab``: how a source candidate id becomes a target id — ``exact`` (same text, else dropped),
    ``prefix`` (same text, else the longest target token its text starts with: the target's first
    piece of that text), ``soft`` (same text, else the nearest target token by edit distance, as
    FuseLLM's soft vocabulary alignment). ``spans``: 1:n and n:1 targets get the source's
    distribution (``chain``, docs/alignment.md) or a one-hot on the target token (``one_hot``,
    FuseLLM). ``fallback``: targets without a correspondence get a one-hot on the target token
    (``one_hot``, FuseLLM) or no teacher at all (``mask``: SFT only there)."""

    vocab: VocabRule = "prefix"
    spans: SpanRule = "chain"
    fallback: FallbackRule = "one_hot"


# --- a tokenizer's vocabulary as bytes ----------------------------------------------------------


@functools.cache
def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet: printable symbol -> the byte it stands for (imports transformers
    on first use, not when the plugins load)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {symbol: byte for byte, symbol in bytes_to_unicode().items()}
_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def tokenizer_name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def tokenizer_hash(tokenizer) -> str:
    """SHA-256 of the fast tokenizer's full definition (vocabulary, merges, normaliser, specials)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"{tokenizer_name(tokenizer)}: alignment needs a fast tokenizer (offsets)")
    digest = hashlib.sha256(backend.to_str().encode())
    digest.update(json.dumps(_roles(tokenizer), sort_keys=True).encode())
    return digest.hexdigest()


def _roles(tokenizer) -> dict[str, int]:
    roles = {}
    for role in ("eos", "bos", "unk", "pad"):  # eos first: its mapping wins when ids coincide
        token_id = getattr(tokenizer, f"{role}_token_id", None)
        if token_id is not None:
            roles[role] = int(token_id)
    return roles


def _decoder_steps(decoder: dict | None) -> list[dict]:
    if not decoder:
        return []
    if decoder.get("type") == "Sequence":
        return [step for sub in decoder.get("decoders", []) for step in _decoder_steps(sub)]
    return [decoder]


def _piece_function(backend_json: dict):
    """token string -> the bytes it decodes to, from the tokenizer's decoder definition."""
    steps = _decoder_steps(backend_json.get("decoder"))
    kinds = {s.get("type") for s in steps}
    replaces = []
    for step in steps:
        if step.get("type") == "Replace" and "String" in (step.get("pattern") or {}):
            replaces.append((step["pattern"]["String"], step.get("content", "")))
        elif step.get("type") == "Metaspace":
            replaces.append((step.get("replacement", "▁"), " "))
    wordpiece = next((s.get("prefix", "##") for s in steps if s.get("type") == "WordPiece"), None)
    suffix = next((s.get("suffix") for s in steps if s.get("type") == "BPEDecoder"), None)

    byte_level = byte_level_alphabet()

    def piece(token: str) -> bytes:
        if "ByteFallback" in kinds:
            m = _BYTE_FALLBACK.match(token)
            if m:
                return bytes([int(m.group(1), 16)])
        if "ByteLevel" in kinds and all(c in byte_level for c in token):
            return bytes(byte_level[c] for c in token)
        for old, new in replaces:
            token = token.replace(old, new)
        if wordpiece is not None and token.startswith(wordpiece):
            token = token[len(wordpiece):]
        if suffix and token.endswith(suffix):
            token = token[: -len(suffix)] + " "
        return token.encode("utf-8")

    return piece


@dataclass
class VocabTable:
    """One tokenizer's vocabulary as text bytes: ``pieces[id]`` (None for special tokens)."""

    name: str
    hash: str
    pieces: list[bytes | None]  # [V]
    byte_fallback: np.ndarray  # [V] bool: <0xNN> tokens (a plain token with the same bytes is preferred)
    roles: dict[str, int]  # bos/eos/unk/pad -> id
    specials: dict[str, int]  # special token string -> id

    @property
    def size(self) -> int:
        return len(self.pieces)


def vocab_table(tokenizer) -> VocabTable:
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = tokenizer.get_vocab()
    size = max(vocab.values()) + 1
    tokens: list[str | None] = [None] * size
    for token, token_id in vocab.items():
        tokens[token_id] = token
    special = {int(t["id"]) for t in backend.get("added_tokens", []) if t.get("special")}
    special |= {int(i) for i in tokenizer.all_special_ids}
    piece = _piece_function(backend)
    pieces = [None if (t is None or i in special) else piece(t) for i, t in enumerate(tokens)]
    fallback = np.array([t is not None and bool(_BYTE_FALLBACK.match(t)) for t in tokens], dtype=bool)
    specials = {tokens[i]: i for i in sorted(special) if i < size and tokens[i] is not None}
    return VocabTable(tokenizer_name(tokenizer), tokenizer_hash(tokenizer), pieces, fallback, _roles(tokenizer), specials)


# --- vocabulary maps ----------------------------------------------------------------------------


@dataclass
class VocabMap:
    """Source id -> target id, -1 where none. ``exact``: the target token with the same bytes (or the
    same role: bos/eos/unk/pad); ``prefix``: ``exact``, else the longest target token whose bytes
    start the source token's; ``soft``: ``exact``, else the nearest target token by edit distance
    over bytes, computed on demand (-2 = not computed yet) and saved with ``save()``."""

    source: str
    target: str
    exact: np.ndarray  # [V_src] int32
    prefix: np.ndarray  # [V_src] int32
    soft: np.ndarray  # [V_src] int32
    target_size: int
    path: Path | None = None
    _tokenizers: tuple[Any, Any] | None = field(default=None, repr=False)  # (source, target), for soft lookups
    _tables: tuple[VocabTable, VocabTable] | None = field(default=None, repr=False)
    _choices: tuple[list[str], np.ndarray] | None = field(default=None, repr=False)
    _dirty: bool = field(default=False, repr=False)

    def lookup(self, ids: np.ndarray, how: VocabRule) -> np.ndarray:
        """Target ids for source ``ids`` (any shape); -1 where the map has none (or out of range)."""
        ids = np.asarray(ids)
        inside = (ids >= 0) & (ids < len(self.exact))
        safe = np.where(inside, ids, 0)
        if how == "exact":
            out = self.exact[safe]
        elif how == "prefix":
            out = self.prefix[safe]
        elif how == "soft":
            missing = np.unique(safe[inside & (self.soft[safe] == -2)])
            if len(missing):
                self._fill_soft(missing)
            out = self.soft[safe]
        else:
            raise ValueError(f"unknown vocabulary map {how!r} (exact, prefix or soft)")
        return np.where(inside, out, -1).astype(np.int32)

    def _fill_soft(self, ids: np.ndarray) -> None:
        from rapidfuzz.distance import Levenshtein
        from rapidfuzz.process import cdist

        if self._tables is None:
            if self._tokenizers is None:
                raise RuntimeError("soft lookups need the tokenizers: build the map with vocab_map()")
            self._tables = (vocab_table(self._tokenizers[0]), vocab_table(self._tokenizers[1]))
        source, target = self._tables
        if self._choices is None:  # target pieces as latin-1 strings: edit distance over bytes
            ids_t = np.array([i for i, p in enumerate(target.pieces) if p], dtype=np.int32)
            self._choices = ([target.pieces[i].decode("latin-1") for i in ids_t], ids_t)
        choices, choice_ids = self._choices
        queries = [(i, source.pieces[i]) for i in ids.tolist()]
        for i, piece in queries:
            if piece is None or not choices:
                self.soft[i] = -1
        queries = [(i, piece.decode("latin-1")) for i, piece in queries if piece is not None and choices]
        for at in range(0, len(queries), 64):  # [64, V_tgt] distances at a time: bounded memory
            batch = queries[at : at + 64]
            dist = cdist([q for _, q in batch], choices, scorer=Levenshtein.distance, dtype=np.int32, workers=-1)
            self.soft[[i for i, _ in batch]] = choice_ids[dist.argmin(axis=1)]  # first nearest, as FuseLLM's min()
        self._dirty = True

    def save(self) -> None:
        """Write the soft entries computed so far back to the disk cache (atomic replace)."""
        if self._dirty and self.path is not None:
            _save_npz(self.path, exact=self.exact, prefix=self.prefix, soft=self.soft)
            self._dirty = False


def _save_npz(path: Path, **arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    os.replace(tmp, path)


def _target_index(target: VocabTable) -> dict[bytes, int]:
    """bytes -> target id; a plain token beats a <0xNN> byte token, then the lowest id wins."""
    index: dict[bytes, int] = {}
    order = sorted(range(target.size), key=lambda i: (not target.byte_fallback[i], -i))
    for i in order:  # later assignments win
        if target.pieces[i] is not None:
            index[target.pieces[i]] = i
    return index


def _build_maps(source: VocabTable, target: VocabTable) -> tuple[np.ndarray, np.ndarray]:
    index = _target_index(target)
    exact = np.array([index.get(p, -1) if p else -1 for p in source.pieces], dtype=np.int32)
    # special tokens pair by identical string, else by role (the source's EOS -> the target's EOS)
    for token, source_id in source.specials.items():
        if token in target.specials:
            exact[source_id] = target.specials[token]
    for role, source_id in source.roles.items():
        if role in target.roles and exact[source_id] < 0:
            exact[source_id] = target.roles[role]
    longest = max((len(p) for p in index), default=0)
    prefix = exact.copy()
    for source_id in np.flatnonzero(exact < 0).tolist():
        piece = source.pieces[source_id]
        if not piece:
            continue
        for n in range(min(len(piece) - 1, longest), 0, -1):
            hit = index.get(piece[:n])
            if hit is not None:
                prefix[source_id] = hit
                break
    return exact, prefix


def vocab_map(source_tokenizer, target_tokenizer, *, cache_dir: str | Path | None = None) -> VocabMap:
    """The map from the source's vocabulary to the target's, from the disk cache when there
    (``<cache>/vocab-maps/<source hash>-<target hash>.npz``), else built (seconds) and cached."""
    from .models.cache import default_cache_dir

    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    source_hash, target_hash = tokenizer_hash(source_tokenizer), tokenizer_hash(target_tokenizer)
    path: Path | None = root / "vocab-maps" / f"{MAP_FORMAT}-{source_hash[:16]}-{target_hash[:16]}.npz"
    arrays, tables = None, None
    if path.is_file():
        try:
            with np.load(path) as data:
                arrays = {k: data[k].copy() for k in ("exact", "prefix", "soft")}
        except (OSError, ValueError, KeyError):  # a damaged cache entry is rebuilt
            arrays = None
    if arrays is None:
        tables = (vocab_table(source_tokenizer), vocab_table(target_tokenizer))
        exact, prefix = _build_maps(*tables)
        arrays = {"exact": exact, "prefix": prefix, "soft": np.where(exact >= 0, exact, -2).astype(np.int32)}
        try:
            _save_npz(path, **arrays)
        except OSError:  # a read-only cache only costs the rebuild next time
            path = None
    target_size = max(target_tokenizer.get_vocab().values()) + 1
    return VocabMap(tokenizer_name(source_tokenizer), tokenizer_name(target_tokenizer), arrays["exact"], arrays["prefix"],
                    arrays["soft"], target_size, path=path, _tokenizers=(source_tokenizer, target_tokenizer), _tables=tables)


# --- tokenisation -------------------------------------------------------------------------------


def tokenize(tokenizer, text: str, *, add_special_tokens: bool = False) -> Tokenized:
    """``text`` in one tokenizer, with character offsets (special tokens get (0, 0))."""
    # verbose=False: texts longer than the model context are fine here (nothing runs the model)
    enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True, verbose=False)
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)  # [n, 2]
    return Tokenized(text, ids, offsets, tokenizer.convert_ids_to_tokens(enc["input_ids"]))


# --- categories ---------------------------------------------------------------------------------


def _coverage(starts: np.ndarray, ends: np.ndarray, n_source: int) -> np.ndarray:
    """[n_source] how many of the given ranges contain each source token."""
    delta = np.zeros(n_source + 1, dtype=np.int64)
    np.add.at(delta, starts, 1)
    np.add.at(delta, ends, -1)
    return np.cumsum(delta[:-1])


def classify(starts: np.ndarray, ends: np.ndarray, n_source: int, same_text: np.ndarray,
             soft_pair: np.ndarray | None = None) -> np.ndarray:
    """[n] int8 category of each target token (module docstring). ``same_text`` [n] bool: the
    source token at ``starts[t]`` maps exactly onto target token t; ``soft_pair`` [n] bool: it
    maps there through the soft map."""
    starts = np.asarray(starts, dtype=np.int64)
    ends = np.asarray(ends, dtype=np.int64)
    width = ends - starts
    cat = np.full(len(starts), FALLBACK, dtype=np.int8)
    if n_source == 0 or len(starts) == 0:
        return cat
    cover = _coverage(starts, ends, n_source)  # [m] targets per source token
    wide = width > 1
    cover_wide = _coverage(starts[wide], ends[wide], n_source)  # [m] 1:n-style targets per source token
    single = width == 1
    s = np.clip(starts, 0, n_source - 1)
    alone = single & (cover[s] == 1)
    cat[alone & same_text] = EXACT
    if soft_pair is not None:
        cat[alone & ~same_text & soft_pair] = SOFT
    cat[single & (cover[s] > 1) & (cover_wide[s] == 0)] = MANY_TO_ONE
    # 1:n: every covered source token belongs to this target token alone
    exclusive = np.concatenate([[0], np.cumsum(cover == 1)])
    cat[wide & (exclusive[ends] - exclusive[starts] == width)] = ONE_TO_MANY
    return cat


@dataclass
class AlignmentCounts:
    """Target tokens per category, summed over examples."""

    counts: np.ndarray = field(default_factory=lambda: np.zeros(len(CATEGORIES), dtype=np.int64))

    def add(self, categories: np.ndarray) -> None:
        self.counts += np.bincount(np.asarray(categories, dtype=np.int64), minlength=len(CATEGORIES))

    @property
    def tokens(self) -> int:
        return int(self.counts.sum())

    def shares(self) -> dict[str, float]:
        total = max(self.tokens, 1)
        return {f"{name}_share": float(c) / total for name, c in zip(CATEGORIES, self.counts)}


# --- projection ---------------------------------------------------------------------------------


@dataclass
class Teacher:
    """The teacher on n target tokens: ``ids`` [n, k] int32 target ids, ``logits`` [n, k] float32
    raw logits (-inf = unused slot), ``mask`` [n] bool, ``category`` [n] int8, ``logz`` [n] float32
    the log-partition of those raw logits (the source's over its whole vocabulary; 0 for a one-hot
    row, NaN without a teacher), so ``logits - logz`` are log-probabilities."""

    ids: np.ndarray
    logits: np.ndarray
    mask: np.ndarray
    category: np.ndarray
    logz: np.ndarray | None = None


def project(target_ids: np.ndarray, source_ids: np.ndarray, topk_ids: np.ndarray, topk_logits: np.ndarray,
            logz: np.ndarray, nll: np.ndarray, starts: np.ndarray, ends: np.ndarray, vmap: VocabMap,
            params: ProjectionParams | None = None) -> Teacher:
    """Project a source's top-k distributions onto the target tokens of the same text.

    Shapes: ``target_ids`` [n]; ``source_ids``, ``logz``, ``nll`` [m]; ``topk_ids``, ``topk_logits``
    [m, k] (row i: the distribution that predicts source token i); ``starts``, ``ends`` [n] the
    aligner's ranges. The teacher keeps k slots per target token. Rules (docs/alignment.md):

    * ``exact``/``soft``/``one_to_many`` and the first target token of a ``many_to_one`` group take
      the distribution at the first source token of their range, candidates mapped with
      ``params.vocab`` (unmappable ones dropped, duplicates merged by adding probabilities); the
      realised source path goes to the target's own token with its probability: the product of the
      source's probabilities of the covered tokens (``logz - sum(nll)`` as a raw logit);
    * the other tokens of a ``many_to_one`` group and ``fallback`` tokens: one-hot on the target
      token (``fallback: mask`` leaves fallback tokens without a teacher).
    """
    params = params or ProjectionParams()
    target_ids = np.asarray(target_ids, dtype=np.int64)
    source_ids = np.asarray(source_ids, dtype=np.int64)
    starts = np.asarray(starts, dtype=np.int64)
    ends = np.asarray(ends, dtype=np.int64)
    n, m, k = len(target_ids), len(source_ids), topk_ids.shape[1]
    s0 = np.clip(starts, 0, max(m - 1, 0))  # [n] first source token of each range
    if m:
        src_exact = vmap.lookup(source_ids[s0], "exact")
        same_text = (ends - starts == 1) & (src_exact == target_ids)
        soft_pair = (vmap.lookup(source_ids[s0], "soft") == target_ids) if params.vocab == "soft" else None
    else:
        same_text, soft_pair = np.zeros(n, dtype=bool), None
    cat = classify(starts, ends, m, same_text, soft_pair)

    head = np.r_[True, (starts[1:] != starts[:-1]) | (ends[1:] != ends[:-1])] if n else np.zeros(0, dtype=bool)
    anchored = (cat == EXACT) | (cat == SOFT)
    if params.spans == "chain":
        anchored |= (cat == ONE_TO_MANY) | ((cat == MANY_TO_ONE) & head)

    out_ids = np.zeros((n, k), dtype=np.int32)
    out_logits = np.full((n, k), -np.inf, dtype=np.float32)
    # one-hot on the target token everywhere first; anchored rows are overwritten below
    out_ids[:, 0] = target_ids
    out_logits[:, 0] = 0.0
    mask = np.ones(n, dtype=bool)
    out_logz = np.zeros(n, dtype=np.float32)  # a one-hot at logit 0 has log-partition 0
    if params.fallback == "mask":
        off = cat == FALLBACK
        mask[off] = False
        out_logits[off, 0] = -np.inf
        out_ids[off, 0] = 0
        out_logz[off] = np.nan

    rows = np.flatnonzero(anchored)
    if len(rows):
        a = starts[rows]  # [r] anchor source positions
        cand = np.asarray(topk_ids[a], dtype=np.int64)  # [r, k]
        cand_logits = np.asarray(topk_logits[a], dtype=np.float32)  # [r, k]
        mapped = vmap.lookup(cand, params.vocab).astype(np.int64)  # [r, k]
        mapped[cand == source_ids[a][:, None]] = -1  # the realised token is added below, as a path
        csum = np.concatenate([[0.0], np.cumsum(np.asarray(nll, dtype=np.float64))])
        path_logit = np.asarray(logz, dtype=np.float64)[a] - (csum[ends[rows]] - csum[a])  # [r]
        all_ids = np.concatenate([mapped, target_ids[rows][:, None]], axis=1)  # [r, k + 1]
        all_logits = np.concatenate([cand_logits, path_logit.astype(np.float32)[:, None]], axis=1)
        ids_r, logits_r = _merge_topk(all_ids, all_logits, k, max(vmap.target_size, int(target_ids.max()) + 1))
        out_ids[rows] = ids_r
        out_logits[rows] = logits_r
        out_logz[rows] = np.asarray(logz, dtype=np.float32)[a]
    return Teacher(out_ids, out_logits, mask, cat, out_logz)


def _merge_topk(ids: np.ndarray, logits: np.ndarray, k: int, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``ids``/``logits`` [r, w]: drop invalid slots (id < 0, logit -inf), merge equal
    ids (log-sum-exp: their probabilities add), keep the k largest, descending. -> [r, k] each."""
    r, w = ids.shape
    row = np.repeat(np.arange(r, dtype=np.int64), w)
    flat_ids, flat_logits = ids.reshape(-1), logits.reshape(-1)
    valid = (flat_ids >= 0) & np.isfinite(flat_logits)
    key = row[valid] * vocab + flat_ids[valid]
    order = np.argsort(key, kind="stable")
    key, vals = key[order], flat_logits[valid][order]
    out_ids = np.zeros((r, k), dtype=np.int32)
    out_logits = np.full((r, k), -np.inf, dtype=np.float32)
    if not len(key):
        return out_ids, out_logits
    first = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])  # start of each (row, id) group
    merged = np.logaddexp.reduceat(vals, first)
    g_row, g_id = key[first] // vocab, key[first] % vocab
    order = np.lexsort((-merged, g_row))  # by row, then logit descending
    g_row, g_id, merged = g_row[order], g_id[order], merged[order]
    rank = np.arange(len(g_row)) - np.searchsorted(g_row, g_row, side="left")
    keep = rank < k
    out_ids[g_row[keep], rank[keep]] = g_id[keep]
    out_logits[g_row[keep], rank[keep]] = merged[keep]
    return out_ids, out_logits


# --- report -------------------------------------------------------------------------------------


def dataset_responses(path: Path) -> list[str]:
    """The responses of a dataset file in any format the ``file`` dataset source reads."""
    from .components import Record
    from .data import RowFormatParams, data_files, read_rows, rows_to_records

    texts = []
    for file in data_files(Path(path).expanduser()):
        texts += [r.response for r in rows_to_records(read_rows(file), RowFormatParams()) if isinstance(r, Record)]
    return texts


def align_report(source_spec: Any, target_spec: Any, texts: Iterable[str] | str | Path, aligner_name: str = "offsets",
                 *, engine: Any, cache_dir: str | Path | None = None, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """Align ``texts`` (strings, or a dataset file whose responses are used) between two models'
    tokenizers and report speed and category shares. ``tokens_per_second`` counts target tokens
    over the aligner's own time (tokenisation excluded, reported apart). ``engine``
    (``profuser.plugins.Engine``) builds the aligner and resolves ``builtin:`` models."""
    from .models import load_tokenizer

    if isinstance(texts, (str, Path)):
        texts = dataset_responses(Path(texts))
    texts = list(texts)
    aligner = engine.registry.build("aligners", aligner_name, params or {})
    source_tok = load_tokenizer(source_spec, cache_dir=cache_dir, engine=engine)
    target_tok = load_tokenizer(target_spec, cache_dir=cache_dir, engine=engine)
    vmap = vocab_map(source_tok, target_tok, cache_dir=cache_dir)
    t0 = time.perf_counter()
    pairs = [(tokenize(target_tok, t), tokenize(source_tok, t)) for t in texts]
    tokenize_s = time.perf_counter() - t0
    counts = AlignmentCounts()
    align_s = 0.0
    for target, source in pairs:
        t0 = time.perf_counter()
        starts, ends = aligner.align(target, source)
        align_s += time.perf_counter() - t0
        s0 = np.clip(starts, 0, max(len(source.ids) - 1, 0))
        same = (ends - starts == 1) & (vmap.lookup(source.ids[s0], "exact") == target.ids) if len(source.ids) else \
            np.zeros(len(target.ids), dtype=bool)
        counts.add(classify(starts, ends, len(source.ids), same))
    return {
        "aligner": aligner_name,
        "source": vmap.source,
        "target": vmap.target,
        "texts": len(texts),
        "target_tokens": counts.tokens,
        "source_tokens": int(sum(len(s.ids) for _, s in pairs)),
        "align_seconds": align_s,
        "tokenize_seconds": tokenize_s,
        "tokens_per_second": counts.tokens / align_s if align_s > 0 else float("inf"),
        "vocab_exact_share": float((vmap.exact >= 0).mean()),
        **counts.shares(),
    }
