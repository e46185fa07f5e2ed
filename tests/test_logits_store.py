"""The top-k logits store: round trip, zero-copy reads, resume after a kill, validation, size."""

from __future__ import annotations

import pickle

import numpy as np
import pyarrow as pa
import pytest

from profuser.components import SourceNLL
from profuser.errors import ArtifactError, ModelError, ProfuserError
from profuser.logits_store import LogitsReader, LogitsWriter

K = 10


def make_example(rng: np.random.Generator, i: int, n: int, vocab: int = 50_000) -> dict:
    """Arrays shaped like a real source's output on an n-token response (logits sorted descending)."""
    response = " ".join(f"w{i}_{j}" for j in range(n))
    starts = np.array([response.find(f"w{i}_{j}") for j in range(n)], dtype=np.int32)
    ends = starts + np.array([len(f"w{i}_{j}") for j in range(n)], dtype=np.int32)
    logits = -np.sort(-rng.normal(8, 3, (n, K)), axis=1).astype(np.float32)  # [n, k] descending
    return {
        "example_id": f"ex{i}", "response": response,
        "token_ids": rng.integers(0, vocab, n),
        "offsets": np.stack([starts, ends], axis=1),  # [n, 2]
        "nll": rng.exponential(2.0, n).astype(np.float32),
        "topk_ids": rng.integers(0, vocab, (n, K)),
        "topk_logits": logits,
        "logz": (logits[:, 0] + rng.random(n)).astype(np.float32),
    }


def write(out, examples, **kw):
    with LogitsWriter(out, K, model="src", **kw) as writer:
        for ex in examples:
            writer.add(**ex)
    return writer


@pytest.mark.parametrize("compression", ["zstd", None])
def test_round_trip(tmp_path, compression):
    rng = np.random.default_rng(0)
    examples = [make_example(rng, i, n) for i, n in enumerate([5, 1, 40, 17, 0, 33, 8])]
    # small shards and batches so that lookups cross shard and batch boundaries
    write(tmp_path, examples, compression=compression, shard_tokens=40, batch_tokens=15)
    assert len(list(tmp_path.glob("shard-*.arrow"))) > 1

    reader = LogitsReader(tmp_path)
    assert reader.top_k == K
    assert sorted(reader.ids) == sorted(e["example_id"] for e in examples)
    by_id = {e["example_id"]: e for e in examples}
    iterated = {ex.id: ex for ex in reader}
    assert set(iterated) == set(by_id)
    for example_id in reversed(reader.ids):  # random access, out of storage order
        got, want = reader.get(example_id), by_id[example_id]
        for ex in (got, iterated[example_id]):
            assert ex.response == want["response"]
            assert ex.token_ids.dtype == np.int32 and ex.topk_ids.dtype == np.int32
            assert ex.offsets.dtype == np.int32 and ex.offsets.shape == (len(want["nll"]), 2)
            assert ex.nll.dtype == np.float32 and ex.logz.dtype == np.float32
            assert ex.topk_logits.dtype == np.float16 and ex.topk_logits.shape == (len(want["nll"]), K)
            np.testing.assert_array_equal(ex.token_ids, want["token_ids"])
            np.testing.assert_array_equal(ex.offsets, want["offsets"])
            np.testing.assert_array_equal(ex.nll, want["nll"])
            np.testing.assert_array_equal(ex.logz, want["logz"])
            np.testing.assert_array_equal(ex.topk_ids, want["topk_ids"])
            np.testing.assert_array_equal(ex.topk_logits, want["topk_logits"].astype(np.float16))

    table = reader.nll_table()
    for example_id, want in by_id.items():
        assert table[example_id].n_tokens == len(want["nll"])
        assert table[example_id].n_bytes == len(want["response"].encode())
        assert table[example_id].nll_sum == pytest.approx(float(want["nll"].astype(np.float64).sum()), rel=1e-12)
    with pytest.raises(ArtifactError, match="'nope'"):
        reader.get("nope")


def test_uncompressed_reads_are_zero_copy(tmp_path):
    rng = np.random.default_rng(1)
    write(tmp_path, [make_example(rng, i, 30) for i in range(20)], compression=None, batch_tokens=100)
    reader = LogitsReader(tmp_path)
    assert reader.zero_copy
    before = pa.total_allocated_bytes()
    examples = list(reader) + [reader.get(i) for i in reader.ids]
    # nothing was decoded into Arrow's memory pool: every array is a view of the mapped file
    assert pa.total_allocated_bytes() == before
    for ex in examples:
        for array in (ex.token_ids, ex.offsets, ex.nll, ex.logz, ex.topk_ids, ex.topk_logits):
            assert not array.flags.owndata and not array.flags.writeable


def test_reader_pickles_by_reopening(tmp_path):
    rng = np.random.default_rng(11)
    write(tmp_path, [make_example(rng, i, 5) for i in range(3)])
    clone = pickle.loads(pickle.dumps(LogitsReader(tmp_path)))
    assert clone.ids == ["ex0", "ex1", "ex2"]
    np.testing.assert_array_equal(clone.get("ex2").topk_ids, LogitsReader(tmp_path).get("ex2").topk_ids)


def test_compressed_reads_are_numpy_views(tmp_path):
    """zstd shards decode once per record batch; examples are views of that batch, not copies."""
    rng = np.random.default_rng(2)
    write(tmp_path, [make_example(rng, i, 30) for i in range(6)], batch_tokens=1000)
    reader = LogitsReader(tmp_path)
    assert not reader.zero_copy
    a, b = reader.get("ex0"), reader.get("ex1")
    assert not a.topk_ids.flags.owndata and np.shares_memory(a.topk_ids.base, b.topk_ids.base)


def test_resume_skips_finished_shards(tmp_path):
    rng = np.random.default_rng(3)
    examples = [make_example(rng, i, 10) for i in range(9)]
    writer = LogitsWriter(tmp_path, K, model="src", shard_tokens=30)
    for ex in examples[:7]:  # 7 examples: two full shards (3 + 3 examples), one example buffered
        writer.add(**ex)
    del writer  # killed: the buffered example is lost, no summary was written
    (tmp_path / ".shard-00002.arrow.tmp123").write_bytes(b"half a shard")  # a shard being written at the kill
    assert not (tmp_path / "nll.parquet").exists()

    writer = LogitsWriter(tmp_path, K, model="src", shard_tokens=30)
    assert writer.done_ids == {f"ex{i}" for i in range(6)}
    assert not list(tmp_path.glob(".shard-*"))
    with pytest.raises(ProfuserError, match="'ex0' is already stored"):
        writer.add(**examples[0])
    for ex in examples:
        if ex["example_id"] not in writer:
            writer.add(**ex)
    summary = writer.close()
    assert summary["examples"] == 9 and summary["tokens"] == 90
    reader = LogitsReader(tmp_path)
    assert sorted(reader.ids) == sorted(e["example_id"] for e in examples)
    assert set(reader.nll_table()) == set(reader.ids)


def test_resume_with_another_top_k_is_refused(tmp_path):
    rng = np.random.default_rng(4)
    write(tmp_path, [make_example(rng, 0, 4)])
    with pytest.raises(ArtifactError, match="top-10.*top-5"):
        LogitsWriter(tmp_path, 5)


@pytest.mark.parametrize("field,bad", [("topk_logits", np.nan), ("logz", np.inf), ("nll", np.nan), ("topk_logits", np.inf)])
def test_non_finite_values_are_rejected(tmp_path, field, bad):
    rng = np.random.default_rng(5)
    ex = make_example(rng, 7, 6)
    ex[field] = ex[field].copy()
    ex[field].flat[4] = bad
    writer = LogitsWriter(tmp_path, K, model="gemma3-270m")
    with pytest.raises(ModelError) as info:
        writer.add(**ex)
    assert "ex7" in info.value.message and "gemma3-270m" in info.value.where


def test_minus_inf_in_top_k_is_an_empty_slot(tmp_path):
    rng = np.random.default_rng(6)
    ex = make_example(rng, 0, 3)
    ex["topk_logits"][:, -2:] = -np.inf
    write(tmp_path, [ex])
    assert np.isneginf(LogitsReader(tmp_path).get("ex0").topk_logits[:, -2:]).all()


def test_shape_and_range_errors_name_the_example(tmp_path):
    rng = np.random.default_rng(7)
    writer = LogitsWriter(tmp_path, K, model="src")
    ex = make_example(rng, 3, 5)
    with pytest.raises(ProfuserError, match=r"'ex3': topk_ids has shape \(5, 9\)"):
        writer.add(**{**ex, "topk_ids": ex["topk_ids"][:, :9]})
    with pytest.raises(ModelError, match="'ex3'.*float16 range"):
        writer.add(**{**ex, "topk_logits": ex["topk_logits"] * 1e4})
    with pytest.raises(ProfuserError, match="'ex3'.*outside the response"):
        writer.add(**{**ex, "offsets": ex["offsets"] + 1000})


def test_truncated_examples_count_only_covered_bytes(tmp_path):
    rng = np.random.default_rng(8)
    ex = make_example(rng, 0, 4)
    ex["response"] += " and é more text the tokens never reached"
    with LogitsWriter(tmp_path, K) as writer:
        writer.add(**ex, truncated=9)
    nll = LogitsReader(tmp_path).nll_table()["ex0"]
    assert nll.n_bytes == int(ex["offsets"][-1, 1])  # ASCII prefix: one byte per character


def test_empty_store_reads_as_empty(tmp_path):
    """A source that won no example in inference mode writes an empty, readable store."""
    LogitsWriter(tmp_path, K).close()
    reader = LogitsReader(tmp_path)
    assert reader.ids == [] and reader.top_k == K and list(reader) == [] and reader.nll_table() == {}
    with pytest.raises(ArtifactError, match="no logits shards"):
        LogitsReader(tmp_path / "missing")


def test_bytes_per_token_at_k10(tmp_path):
    """The budget is 64 bytes per token per source at k = 10; random data is the hard case for
    compression (real logits and ids repeat more), so this bounds real stores too."""
    rng = np.random.default_rng(9)
    summary = write(tmp_path, [make_example(rng, i, 200) for i in range(40)]).close()
    on_disk = sum(p.stat().st_size for p in tmp_path.glob("shard-*.arrow"))
    assert summary["tokens"] == 8000
    assert summary["bytes_per_token"] == on_disk / 8000
    assert summary["bytes_per_token"] <= 64


def test_nll_table_matches_source_nll_type(tmp_path):
    rng = np.random.default_rng(10)
    write(tmp_path, [make_example(rng, 0, 3)])
    value = LogitsReader(tmp_path).nll_table()["ex0"]
    assert isinstance(value, SourceNLL) and isinstance(value.n_tokens, int)


def _rss_file_kb() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("RssFile:"))


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="reads Linux's /proc")
def test_reading_a_compressed_store_does_not_map_it(tmp_path):
    """Every example of an ~8 MB compressed store read by id: the file-backed RSS stays flat (a
    memory-mapped shard keeps every page a read touched resident, ~7 kB per example at scale)."""
    rng = np.random.default_rng(0)
    write(tmp_path, (make_example(rng, i, 200) for i in range(800)))  # random values: zstd barely shrinks them
    stored = sum(p.stat().st_size for p in tmp_path.glob("shard-*.arrow"))
    assert stored > 5e6
    reader = LogitsReader(tmp_path, cache_batches=1)
    before = _rss_file_kb()
    total = sum(int(reader.get(f"ex{i}").topk_ids[:, 0].sum()) for i in range(800))
    assert total > 0
    assert (_rss_file_kb() - before) * 1024 < stored / 5
