"""The align and build stages end to end on a tiny heterogeneous pair: target = the tiny Llama
(byte-level BPE, ChatML), sources = the tiny Gemma (SentencePiece-style, fallback template) and
the target itself; the sources' logits stores are synthetic (LogitsWriter, seeded arrays)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from pyarrow import ipc

from profuser.alignment import EXACT
from profuser.chat import encode_chat
from profuser.components import Record
from profuser.data import write_records
from profuser.errors import ArtifactError
from profuser.logits_store import LogitsWriter
from profuser.models import load_tokenizer
from profuser.pipeline import Runtime, Stage, StageContext
from profuser.plugins import Engine
from profuser.recipe import ModelSpec
from profuser.stages import align as align_stage
from profuser.stages import build as build_stage
from profuser.training.data import ExampleSet

K = 4
MAX_LENGTH = 128
RECORDS = [
    Record("a", "", "Say hello.", "Hello! How can I help you today?"),
    Record("b", "You are a helpful assistant.", "What is the capital of France?",
           "The capital of France is Paris. It is also its largest city, on the Seine."),
    Record("c", "", "Add two numbers in Python.", "def add(a, b):\n    return a + b"),
    Record("d", "", "Greet in Japanese.", "東京 says こんにちは 🙂 — café au lait, naïve résumé."),
    Record("e", "", "Name a pet.", "Cats."),
]
CHOSEN = {"a": "gemma", "b": "llama", "c": "gemma", "d": "gemma", "e": "llama"}


@pytest.fixture(scope="module")
def engine():
    return Engine(entrypoints=False)


@pytest.fixture
def setup(tmp_path, tiny_llama_dir, tiny_gemma_dir, engine):
    specs = {"llama": ModelSpec(ref=str(tiny_llama_dir)).identity(), "gemma": ModelSpec(ref=str(tiny_gemma_dir)).identity()}
    data = tmp_path / "data"
    data.mkdir()
    write_records(data / "train.parquet", RECORDS)
    select = tmp_path / "select"
    select.mkdir()
    ids = [r.id for r in RECORDS]
    pq.write_table(pa.table({"id": ids, "chosen": [CHOSEN[i] for i in ids], "scores": ["{}"] * len(ids),
                             "detail": ["{}"] * len(ids)}), select / "selection.parquet")
    return {"tmp": tmp_path, "specs": specs, "data": data, "select": select, "engine": engine}


def write_store(path, spec, records, responses=None, *, seed=0, max_length=256):
    """A logits store as the logits stage would write it, with seeded logits: the realised token is
    the top-1, nll = logz - its logit."""
    tokenizer = load_tokenizer(spec)
    rng = np.random.default_rng(seed)
    vocab = len(tokenizer)
    with LogitsWriter(path, K, model=spec["ref"]) as writer:
        for r in records:
            response = (responses or {}).get(r.id, r.response)
            enc = encode_chat(tokenizer, r.system, r.instruction, response, max_length=max_length)
            token_ids = np.asarray(enc.input_ids[enc.response_start:], dtype=np.int32)  # [n]
            n = len(token_ids)
            topk = np.stack([rng.choice(vocab, size=K, replace=False) for _ in range(n)]).astype(np.int32)  # [n, K]
            for i, t in enumerate(token_ids):  # realised token first, the others distinct from it
                others = [x for x in topk[i] if x != t][: K - 1]
                topk[i] = [t, *others]
            logits = -np.sort(-rng.normal(size=(n, K)), axis=1).astype(np.float16)  # descending
            logz = logits[:, 0].astype(np.float32) + np.float32(1.5)
            nll = logz - logits[:, 0].astype(np.float32)
            writer.add(r.id, response, token_ids, enc.response_offsets, nll, topk, logits, logz, truncated=enc.truncated)
    return path


def context(setup, kind, stage_id, config, inputs, out_name) -> StageContext:
    out = setup["tmp"] / out_name
    out.mkdir()
    return StageContext(stage=Stage(stage_id, kind, config, {}), inputs=inputs, out=out,
                        runtime=Runtime(progress=False, device="cpu", cache_dir=setup["tmp"] / "cache"),
                        engine=setup["engine"])


def run_align(setup, source, logits, *, mode="training", aligner="offsets", max_length=MAX_LENGTH, params=None,
              all_examples=False):
    config = {"mode": mode, "aligner": {"name": aligner, "params": params or {}}, "target": setup["specs"]["llama"],
              "source": setup["specs"][source], "source_key": source, "max_length": max_length}
    if all_examples:
        config["all_examples"] = True
    ctx = context(setup, "align", f"align/{mode}/{source}", config,
                  {"logits": logits, "select": setup["select"], "data": setup["data"]},
                  f"align-{mode}-{source}-{aligner}{'-all' if all_examples else ''}")
    return ctx.out, align_stage.run(ctx)


def run_build(setup, aligned, *, mode="training", max_length=MAX_LENGTH, all_teachers=False):
    config = {"mode": mode, "target": setup["specs"]["llama"], "max_length": max_length, "sources": list(aligned)}
    if all_teachers:
        config["all_teachers"] = True
    ctx = context(setup, "build", f"build/{mode}", config,
                  {"data": setup["data"], "select": setup["select"], **{f"align/{s}": p for s, p in aligned.items()}},
                  f"build-{mode}-{max_length}{'-all' if all_teachers else ''}")
    return ctx.out, build_stage.run(ctx)


def rows(path) -> dict[str, dict]:
    return {r["id"]: r for r in pq.read_table(path).to_pylist()}


def examples_table(out) -> pa.Table:
    """build's examples.arrow (an Arrow IPC file)."""
    return ipc.open_file(str(out / build_stage.EXAMPLES_FILE)).read_all()


def test_align_and_build_training_mode(setup):
    stores = {s: write_store(setup["tmp"] / f"logits-{s}", setup["specs"][s], RECORDS, seed=i)
              for i, s in enumerate(("gemma", "llama"))}
    aligned = {}
    for source in ("gemma", "llama"):
        aligned[source], metrics = run_align(setup, source, stores[source])
        report = json.loads((aligned[source] / "report.json").read_text())
        assert report == metrics
        assert report["examples"] == sum(c == source for c in CHOSEN.values())
        assert sum(v for k, v in report.items() if k.endswith("_share")) == pytest.approx(1.0)
        assert report["tokens_per_second"] > 0
    assert json.loads((aligned["llama"] / "report.json").read_text())["exact_share"] == 1.0  # the target itself
    gemma_report = json.loads((aligned["gemma"] / "report.json").read_text())
    assert 0.3 < gemma_report["exact_share"] < 1.0 and gemma_report["many_to_one_share"] > 0

    target_tok = load_tokenizer(setup["specs"]["llama"])
    from profuser.logits_store import LogitsReader

    by_id = {r.id: r for r in RECORDS}
    for source, path in aligned.items():
        got = rows(path / "aligned.parquet")
        assert list(got) == [r.id for r in RECORDS if CHOSEN[r.id] == source]  # data order
        reader = LogitsReader(stores[source])
        for example_id, row in got.items():
            r = by_id[example_id]
            enc = encode_chat(target_tok, r.system, r.instruction, r.response, max_length=MAX_LENGTH)
            assert row["target_ids"] == enc.input_ids[enc.response_start:]
            assert row["response"] == r.response and all(row["teacher_mask"])
            n = len(row["target_ids"])
            assert np.array(row["teacher_ids"]).shape == (n, K) and np.array(row["teacher_logits"]).shape == (n, K)
            if source == "llama":  # identity alignment: the source's own top-k, slot for slot
                ex = reader.get(example_id)
                assert row["category"] == [EXACT] * n
                for t in range(n):
                    assert dict(zip(row["teacher_ids"][t], row["teacher_logits"][t])) == pytest.approx(
                        dict(zip(ex.topk_ids[t].tolist(), ex.topk_logits[t].astype(np.float32).tolist())), abs=1e-3)

    out, metrics = run_build(setup, aligned)
    table = examples_table(out)
    assert table.schema.equals(build_stage.EXAMPLES_SCHEMA)
    assert table["id"].to_pylist() == [r.id for r in RECORDS]  # data order
    assert metrics["examples"] == len(RECORDS) and metrics["teacher_share"] == 1.0
    for example in table.to_pylist():
        r = by_id[example["id"]]
        enc = encode_chat(target_tok, r.system, r.instruction, r.response, max_length=MAX_LENGTH)
        start = enc.response_start
        assert example["mode"] == "training"
        assert example["input_ids"] == enc.input_ids
        assert example["labels"] == [-100] * start + enc.input_ids[start:]
        # teacher rows at the labelled positions only: the response's
        assert example["teacher_mask"] == [True] * (len(enc.input_ids) - start)
        src = rows(aligned[CHOSEN[r.id]] / "aligned.parquet")[r.id]
        assert example["teacher_ids"] == src["teacher_ids"]
        assert example["teacher_logits"] == src["teacher_logits"]
        assert example["gt_length"] == len(target_tok(r.response, add_special_tokens=False)["input_ids"])


def test_dtw_aligner_runs_in_the_stage_with_fusellm_projection(setup):
    store = write_store(setup["tmp"] / "logits-gemma", setup["specs"]["gemma"], RECORDS)
    _, offsets_report = run_align(setup, "gemma", store)
    out_dtw, dtw_report = run_align(setup, "gemma", store, aligner="dtw")
    assert dtw_report["projection"] == {"vocab": "exact", "spans": "one_hot", "fallback": "one_hot"}
    assert offsets_report["exact_share"] >= dtw_report["exact_share"]
    for row in rows(out_dtw / "aligned.parquet").values():  # FuseLLM: every non-exact token is one-hot
        for cat, logits in zip(row["category"], row["teacher_logits"]):
            if cat != EXACT:
                assert np.isfinite(logits).sum() == 1


def test_inference_mode_uses_the_chosen_response(setup):
    generated = {r.id: f"My own answer to {r.instruction!r}: 42 🙂" for r in RECORDS}
    stores = {s: write_store(setup["tmp"] / f"logits-inf-{s}", setup["specs"][s],
                             [r for r in RECORDS if CHOSEN[r.id] == s], generated)
              for s in ("gemma", "llama")}
    aligned = {s: run_align(setup, s, stores[s], mode="inference")[0] for s in stores}
    out, _ = run_build(setup, aligned, mode="inference")
    target_tok = load_tokenizer(setup["specs"]["llama"])
    for example in examples_table(out).to_pylist():
        r = next(r for r in RECORDS if r.id == example["id"])
        enc = encode_chat(target_tok, r.system, r.instruction, generated[r.id], max_length=MAX_LENGTH)
        assert example["mode"] == "inference" and example["input_ids"] == enc.input_ids
        assert example["gt_length"] == len(target_tok(r.response, add_special_tokens=False)["input_ids"])


def test_build_refuses_a_tokenisation_other_than_the_aligned_one(setup):
    stores = {s: write_store(setup["tmp"] / f"logits-{s}", setup["specs"][s], RECORDS) for s in ("gemma", "llama")}
    aligned = {s: run_align(setup, s, stores[s])[0] for s in stores}
    with pytest.raises(ArtifactError, match="example 'b'.*aligned"):  # 'b' is the first one truncated at 40
        run_build(setup, aligned, max_length=40)


def test_align_names_a_won_example_missing_from_the_store(setup):
    store = write_store(setup["tmp"] / "logits-gemma", setup["specs"]["gemma"], [r for r in RECORDS if r.id != "c"])
    with pytest.raises(ArtifactError, match="example 'c'.*gemma"):
        run_align(setup, "gemma", store)


def test_align_report_on_texts_and_on_a_dataset_file(tmp_path, tiny_llama_dir, tiny_gemma_dir):
    from profuser.alignment import align_report

    llama, gemma = ModelSpec(ref=str(tiny_llama_dir)), ModelSpec(ref=str(tiny_gemma_dir))
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps({"instruction": r.instruction, "input": "", "output": r.response})
                              for r in RECORDS), encoding="utf-8")
    report = align_report(gemma, llama, path, "offsets", engine=Engine(entrypoints=False), cache_dir=tmp_path / "cache")
    assert report["texts"] == len(RECORDS) and report["tokens_per_second"] > 0
    shares = ("exact_share", "one_to_many_share", "many_to_one_share", "soft_share", "fallback_share")
    assert sum(report[k] for k in shares) == pytest.approx(1.0)
    assert 0.3 < report["exact_share"] < 1.0
    same = align_report(llama, llama, [r.response for r in RECORDS], "dtw", engine=Engine(entrypoints=False), cache_dir=tmp_path / "cache")
    assert same["exact_share"] == 1.0 and same["target_tokens"] == same["source_tokens"]


def dense_layout(table: pa.Table, path) -> None:
    """The examples as build version 1 wrote them (a teacher row at every position, empty on the
    prompt: id 0, logit -inf, mask False), as parquet."""
    out = []
    for example in table.to_pylist():
        start = example["labels"].count(-100)
        k = len(example["teacher_ids"][0])
        out.append({**example, "teacher_ids": [[0] * k] * start + example["teacher_ids"],
                    "teacher_logits": [[-np.inf] * k] * start + example["teacher_logits"],
                    "teacher_mask": [False] * start + example["teacher_mask"]})
    pq.write_table(pa.Table.from_pylist(out, schema=table.schema), path)


@pytest.mark.parametrize("max_length", [MAX_LENGTH, 24])
def test_collated_batches_equal_those_of_the_dense_layout(setup, max_length):
    stores = {s: write_store(setup["tmp"] / f"logits-{s}", setup["specs"][s], RECORDS, seed=i)
              for i, s in enumerate(("gemma", "llama"))}
    aligned = {s: run_align(setup, s, stores[s])[0] for s in stores}
    out, _ = run_build(setup, aligned)
    dense_layout(examples_table(out), setup["tmp"] / "dense.parquet")
    sparse = ExampleSet.load({"training": out / build_stage.EXAMPLES_FILE}, max_length)
    dense = ExampleSet.load({"training": setup["tmp"] / "dense.parquet"}, max_length)
    assert len(sparse) == len(dense) == len(RECORDS)
    assert (sparse.rows("training") == dense.rows("training")).all()
    for rows_ in ([0, 1, 2, 3, 4], [4, 1], [2, 2, 0]):  # several micro-batches, repeats, other orders
        got = sparse.collate(np.array(rows_), np.ones(len(rows_)), pad_id=7)
        want = dense.collate(np.array(rows_), np.ones(len(rows_)), pad_id=7)
        assert got.keys() == want.keys()
        for key, value in want.items():
            if isinstance(value, torch.Tensor):
                assert value.dtype == got[key].dtype and torch.equal(value, got[key]), key
            else:
                assert value == got[key], key
        assert not got["teacher_mask"][got["labels"] == -100].any()


def test_build_names_a_selected_example_its_source_did_not_align(setup):
    stores = {s: write_store(setup["tmp"] / f"logits-{s}", setup["specs"][s], RECORDS) for s in ("gemma", "llama")}
    aligned = {s: run_align(setup, s, stores[s])[0] for s in stores}
    ids = [r.id for r in RECORDS]
    pq.write_table(pa.table({"id": ids, "chosen": ["llama" if i == "a" else CHOSEN[i] for i in ids],
                             "scores": ["{}"] * len(ids), "detail": ["{}"] * len(ids)}), setup["select"] / "selection.parquet")
    with pytest.raises(ArtifactError, match="example 'a' was won by 'llama'.*no row"):
        run_build(setup, aligned)


def test_align_reads_a_length_sorted_store_in_storage_order(setup, monkeypatch):
    """The logits stage stores each chunk of prompts longest first: align's rows are the same as
    from a store in data order, and each record batch of the store is decoded once."""
    from functools import partial

    from profuser import logits_store
    from profuser.logits_store import LogitsReader

    plain = write_store(setup["tmp"] / "logits-plain", setup["specs"]["gemma"], RECORDS, seed=3)
    reader = LogitsReader(plain)
    shuffled = setup["tmp"] / "logits-shuffled"
    with LogitsWriter(shuffled, K, model="gemma", batch_tokens=40) as writer:
        for example_id in ("e", "b", "a", "d", "c"):  # an order other than the data's
            ex = reader.get(example_id)
            writer.add(example_id, ex.response, ex.token_ids, ex.offsets, ex.nll, ex.topk_ids, ex.topk_logits, ex.logz)
    layout = LogitsReader(shuffled)
    batches = len({layout.position(r.id)[:2] for r in RECORDS})
    assert batches == 3  # (e, b, a), (d), (c): data order with a one-batch cache would decode 4
    ids = [r.id for r in RECORDS]  # every example won by gemma
    pq.write_table(pa.table({"id": ids, "chosen": ["gemma"] * len(ids)}), setup["select"] / "selection.parquet")

    decoded = []
    monkeypatch.setattr(logits_store, "LogitsReader", partial(logits_store.LogitsReader, cache_batches=1))
    real_batch = logits_store._Batch
    monkeypatch.setattr(logits_store, "_Batch", lambda *a: decoded.append(1) or real_batch(*a))
    expected, _ = run_align(setup, "gemma", plain)
    decoded.clear()
    monkeypatch.setattr(align_stage, "CHUNK_RECORDS", len(RECORDS))
    setup["tmp"] = setup["tmp"] / "again"
    setup["tmp"].mkdir()
    got, _ = run_align(setup, "gemma", shuffled)
    assert pq.read_table(got / "aligned.parquet").equals(pq.read_table(expected / "aligned.parquet"))
    assert len(decoded) == batches


def test_every_source_aligned_on_every_example_for_the_all_teachers_need(setup):
    """all_examples / all_teachers (a loss such as multi_teacher_kl): each source aligned on every
    example, build's [n][S][k] columns hold them in recipe order, the chosen one's equal to the
    usual teacher columns, and collate puts them at the labelled positions."""
    ids = [r.id for r in RECORDS]
    scores = {i: json.dumps({"gemma": 1.0 + j, "llama": 2.0} if i != "e" else {"llama": 0.5}) for j, i in enumerate(ids)}
    pq.write_table(pa.table({"id": ids, "chosen": [CHOSEN[i] for i in ids], "scores": [scores[i] for i in ids],
                             "detail": ["{}"] * len(ids)}), setup["select"] / "selection.parquet")
    sources = ("llama", "gemma")  # recipe order, not sorted
    stores = {s: write_store(setup["tmp"] / f"logits-{s}", setup["specs"][s], RECORDS, seed=i) for i, s in enumerate(sources)}
    aligned = {}
    for source in sources:
        aligned[source], report = run_align(setup, source, stores[source], all_examples=True)
        assert report["examples"] == len(RECORDS)
        assert list(rows(aligned[source] / "aligned.parquet")) == ids  # every example, data order
    plain_aligned = {s: run_align(setup, s, stores[s])[0] for s in sources}
    plain, _ = run_build(setup, plain_aligned)
    out, _ = run_build(setup, aligned, all_teachers=True)
    table = examples_table(out)
    assert table.schema.names == [*build_stage.EXAMPLES_SCHEMA.names, "all_teacher_ids", "all_teacher_logits",
                                  "all_teacher_mask", "all_teacher_scores"]
    assert table.select(build_stage.EXAMPLES_SCHEMA.names).equals(examples_table(plain))  # the usual columns unchanged
    for example in table.to_pylist():
        n = len(example["teacher_mask"])
        assert np.array(example["all_teacher_ids"]).shape == (n, 2, K)
        assert np.array(example["all_teacher_mask"]).shape == (n, 2)
        for s_index, source in enumerate(sources):
            src = rows(aligned[source] / "aligned.parquet")[example["id"]]
            assert [t[s_index] for t in example["all_teacher_ids"]] == src["teacher_ids"]
            assert [t[s_index] for t in example["all_teacher_logits"]] == src["teacher_logits"]
            assert [m[s_index] for m in example["all_teacher_mask"]] == src["teacher_mask"]
        chosen = sources.index(CHOSEN[example["id"]])
        assert [t[chosen] for t in example["all_teacher_ids"]] == example["teacher_ids"]
        want = json.loads(scores[example["id"]])
        assert example["all_teacher_scores"] == pytest.approx([want.get(s, np.nan) for s in sources], nan_ok=True)

    data = ExampleSet.load({"training": out / build_stage.EXAMPLES_FILE}, MAX_LENGTH, frozenset({"all_teachers"}))
    batch = data.collate(np.array([4, 1, 0]), np.ones(3), pad_id=7)
    b, t = batch["input_ids"].shape
    assert batch["all_teacher_ids"].shape == (b, t, 2, K) and batch["all_teacher_logits"].shape == (b, t, 2, K)
    assert batch["all_teacher_mask"].shape == (b, t, 2) and batch["all_teacher_scores"].shape == (b, 2)
    assert torch.isnan(batch["all_teacher_scores"][0, 1]) and batch["all_teacher_scores"][0, 0] == 0.5  # 'e': llama only
    for row, example_id in enumerate(batch["ids"]):  # the chosen source's slice is the usual teacher
        chosen = sources.index(CHOSEN[example_id])
        assert torch.equal(batch["all_teacher_ids"][row, :, chosen], batch["teacher_ids"][row])
        assert torch.equal(batch["all_teacher_logits"][row, :, chosen], batch["teacher_logits"][row])
        assert torch.equal(batch["all_teacher_mask"][row, :, chosen], batch["teacher_mask"][row])
    assert not batch["all_teacher_mask"][batch["labels"] == -100].any()
    assert batch["all_teacher_mask"].all(-1).sum() > 0  # positions where both sources teach
    plain_batch = ExampleSet.load({"training": out / build_stage.EXAMPLES_FILE}, MAX_LENGTH).collate(
        np.array([4, 1, 0]), np.ones(3), pad_id=7)
    assert not any(key.startswith("all_teacher") for key in plain_batch)  # only for a loss that needs them


def test_all_teachers_build_refuses_sources_aligned_only_on_their_wins(setup):
    stores = {s: write_store(setup["tmp"] / f"logits-{s}", setup["specs"][s], RECORDS) for s in ("gemma", "llama")}
    aligned = {s: run_align(setup, s, stores[s])[0] for s in stores}  # without all_examples
    with pytest.raises(ArtifactError, match="example 'a' is selected but align/training/llama has no row"):
        run_build(setup, aligned, all_teachers=True)
