"""Comparison tables and files from fixed results; a run report from a fabricated run directory."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from profuser.errors import ArtifactError
from profuser.report import comparison_table, summarise_variants, write_comparison, write_run_report

BASE = {"mmlu": 0.5117, "hellaswag": 0.7736, "arc_challenge": 0.5375, "winogrande": 0.7230, "gsm8k": 0.1580,
        "truthfulqa_mc2": 0.5037}


def entries() -> list[dict]:
    return [
        {"variant": "vicuna", "scores": dict(BASE), "baseline": True},
        {"variant": "ProFuser", "seed": 1, "recipe": "recipes/profuser.yaml", "wall_seconds": 100.0,
         "stages_ran": ["train", "evaluate/fused"], "stages_reused": ["data", "select/training"],
         "scores": {**BASE, "mmlu": 0.52, "gsm8k": 0.18}},
        {"variant": "ProFuser", "seed": 2, "recipe": "recipes/profuser.yaml", "wall_seconds": 140.0,
         "stages_ran": ["train", "evaluate/fused"], "stages_reused": ["data", "select/training"],
         "scores": {**BASE, "mmlu": 0.53, "gsm8k": 0.19}},
        # in reversed order on purpose: columns follow Table 1 whatever the dict order
        {"variant": "SFT", "scores": dict(reversed(list({**BASE, "hellaswag": 0.80, "gsm8k": 0.10}.items())))},
    ]


def test_comparison_table():
    table = comparison_table(entries()).splitlines()
    assert table[0] == "| Model | MMLU | HellaSwag | ARC | Winogrande | GSM8K | TruthfulQA | Average |"
    assert table[1] == "| --- |" + " ---: |" * 7
    # averages over the six columns: vicuna 53.46 as in the paper's Table 1; nothing is bold: ties
    # never are, and without per-example values no lead can be shown to be significant
    assert table[2] == "| vicuna | 51.17 | 77.36 | 53.75 | 72.30 | 15.80 | 50.37 | 53.46 |"
    # two seeds: mean ± sample std (0.52, 0.53 -> 52.50 ± 0.71); std 0 is shown, not hidden;
    # the average is per seed (53.96, 54.30), then mean ± std
    assert table[3] == ("| ProFuser | 52.50 ± 0.71 | 77.36 ± 0.00 | 53.75 ± 0.00 | 72.30 ± 0.00 | "
                        "18.50 ± 0.71 | 50.37 ± 0.00 | 54.13 ± 0.24 |")
    assert table[4] == "| SFT | 51.17 | 80.00 | 53.75 | 72.30 | 10.00 | 50.37 | 52.93 |"
    assert "**" not in "\n".join(table)


def test_missing_scores_and_fractions():
    rows = [{"variant": "a", "scores": {"gsm8k": 0.25, "mmlu": 0.5}}, {"variant": "b|c", "scores": {"gsm8k": 0.5}}]
    table = comparison_table(rows, percent=False, digits=3).splitlines()
    assert table[0] == "| Model | MMLU | GSM8K | Average |"
    assert table[2] == "| a | 0.500 | 0.250 | 0.375 |"
    assert table[3] == "| b\\|c | – | 0.500 | – |"  # no average over fewer columns


def test_summarise_variants():
    by_name = {v["variant"]: v for v in summarise_variants(entries())}
    pf = by_name["ProFuser"]
    assert pf["runs"] == 2 and pf["seeds"] == [1, 2] and pf["recipe"] == "recipes/profuser.yaml"
    assert pf["wall_seconds"] == 120.0 and pf["stages_ran"] == ["train", "evaluate/fused"]
    assert pf["scores"]["mmlu"] == pytest.approx(0.525) and pf["std"]["mmlu"] == pytest.approx(0.00707107, rel=1e-5)
    assert by_name["vicuna"]["baseline"] and by_name["vicuna"]["std"]["mmlu"] is None
    with pytest.raises(ValueError, match="without a 'variant'"):
        summarise_variants([{"scores": {}}])


def write_metrics(path: Path, losses: list[tuple[str, float]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"step": i + 1, "phase": phase, "loss": loss, "lr": 1e-5}) + "\n"
                            for i, (phase, loss) in enumerate(losses)))
    return path


def write_selection(path: Path, chosen: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    scores = json.dumps({"llama": 1.0, "gemma": 2.0})
    pq.write_table(pa.table({"id": [str(i) for i in range(len(chosen))], "chosen": chosen,
                             "scores": [scores] * len(chosen), "detail": ["{}"] * len(chosen)}), path)
    return path


def test_write_comparison(tmp_path):
    rows = entries()
    selection = write_selection(tmp_path / "sel" / "selection.parquet", ["llama", "gemma", "gemma", "gemma"])
    for i, entry in enumerate(rows[1:3]):
        entry["metrics_path"] = str(write_metrics(tmp_path / f"m{i}.jsonl", [("inference", 2.0), ("training", 1.5)]))
        entry["selections"] = {"training": str(selection)}
    written = write_comparison(rows, tmp_path / "out", title="Ablations")
    for name in ("md", "csv", "json", "scores_png", "loss_png", "advantage_shares"):
        assert written[name].is_file() and written[name].stat().st_size > 0, name
    assert written["scores_png"].read_bytes()[:4] == b"\x89PNG"

    md = written["md"].read_text()
    assert md.startswith("# Ablations\n\n| Model | MMLU |") and comparison_table(rows) in md
    assert "| ProFuser | recipes/profuser.yaml | 2 | 1, 2 | 2.0 min | – | 2 | 2 |" in md
    assert "Selection of ProFuser:" in md and "| gemma | 75.0% |" in md
    assert "![Training loss](loss.png)" in md

    with open(written["csv"], newline="") as fh:
        csv_rows = list(csv.DictReader(fh))
    assert [r["variant"] for r in csv_rows] == ["vicuna", "ProFuser", "SFT"]
    assert float(csv_rows[1]["mmlu"]) == pytest.approx(0.525) and csv_rows[0]["mmlu_std"] == ""

    data = json.loads(written["json"].read_text())
    assert data["tasks"] == ["mmlu", "hellaswag", "arc_challenge", "winogrande", "gsm8k", "truthfulqa_mc2"]
    pf = data["variants"][1]
    assert pf["variant"] == "ProFuser" and pf["stages_reused"] == ["data", "select/training"]
    assert pf["average"] == pytest.approx((0.525 + 0.7736 + 0.5375 + 0.7230 + 0.185 + 0.5037) / 6)


# --- one run --------------------------------------------------------------------------------------


def fabricate_run(root: Path) -> Path:
    """runs/store/<kind>/<key>/ artifacts and runs/runs/demo/run.json listing them."""
    store = root / "store"

    def artifact(kind: str, key: str) -> Path:
        path = store / kind / key
        path.mkdir(parents=True)
        return path

    data = artifact("data", "k-data")
    select = artifact("select", "k-sel")
    write_selection(select / "selection.parquet", ["llama", "llama", "gemma", "llama"])
    align = artifact("align", "k-align")
    (align / "report.json").write_text(json.dumps({"aligner": "offsets", "target_tokens": 120,
                                                   "one_to_one_share": 0.8, "counts": {"many_to_one": 7}}))
    train = artifact("train", "k-train")
    write_metrics(train / "metrics.jsonl", [("inference", 3.0), ("inference", 2.5), ("training", 2.0), ("training", 1.8)])
    fused = artifact("evaluate", "k-fused")
    (fused / "results.json").write_text(json.dumps({
        "label": "fused", "primary": {"gsm8k": 0.2, "profuser_heldout": 0.5}, "average": 0.35,
        "config": {"gsm8k": {"primary_metric": "exact_match,flexible-extract", "num_fewshot": 5, "samples": 10}}}))
    base = artifact("evaluate", "k-base")
    (base / "results.json").write_text(json.dumps({"label": "llama", "primary": {"gsm8k": 0.1, "profuser_heldout": 0.6}}))

    def stage(sid, kind, key, path, cached, seconds, metrics=None, build=0.0):
        return {"id": sid, "kind": kind, "key": key, "cached": cached, "seconds": seconds, "metrics": metrics or {},
                "path": str(path), "build_seconds": build}

    stages = [
        stage("data", "data", "k-data", data, True, 0.0, {"train": 90, "heldout": 10}, build=3.0),
        stage("select/training", "select", "k-sel", select, False, 2.0),
        # recorded where the store used to be: the report finds it by kind/key
        stage("align/training/llama", "align", "k-align", root / "moved" / "k-align", False, 1.0),
        stage("train", "train", "k-train", train, False, 30.0, {"final_loss": 1.8}),
        stage("evaluate/fused", "evaluate", "k-fused", fused, False, 5.0, {"gsm8k": 0.2}),
        stage("evaluate/llama", "evaluate", "k-base", base, True, 0.0, build=4.0),
    ]
    run_dir = root / "runs" / "demo"
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps({"recipe": "demo", "started_at": 1.7e9, "seconds": 38.5, "stages": stages}))
    return run_dir


def test_write_run_report(tmp_path):
    run_dir = fabricate_run(tmp_path)
    md = write_run_report(run_dir)
    out = run_dir / "report"
    assert (out / "report.md").read_text() == md
    for png in ("stage_times.png", "scores.png", "advantage_shares.png", "loss.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG", png

    assert md.startswith("# Run report: demo\n")
    assert "- stages: 6 (4 ran, 2 reused from the cache)" in md
    assert "- compute saved by the cache: 7.0 s" in md
    assert "| data | cached | 0.0 | k-data | train=90, heldout=10 |" in md
    assert f"| align/training/llama | ran | 1.0 | k-align | – | {tmp_path / 'store' / 'align' / 'k-align'} |" in md
    # scores: fused and the baseline side by side, best in bold
    assert "| Model | GSM8K | Held-out | Average |" in md
    assert "| fused | 20.00 | 50.00 | 35.00 |" in md and "| llama | 10.00 | 60.00 | 35.00 |" in md  # no per-example values: no bold
    assert "GSM8K: exact_match,flexible-extract, 5-shot, 10 examples" in md
    assert "| llama | 75.0% |" in md and "| gemma | 25.0% |" in md
    assert "| stage | aligner | target_tokens | one_to_one_share | counts.many_to_one |" in md
    assert "| align/training/llama | offsets | 120 | 0.8 | 7 |" in md
    assert "| inference | 2 | 3.0000 | 2.5000 | 2.5000 |" in md and "| training | 2 | 2.0000 | 1.8000 | 1.8000 |" in md


def test_run_report_to_another_dir_and_errors(tmp_path):
    run_dir = fabricate_run(tmp_path)
    md = write_run_report(run_dir, tmp_path / "elsewhere")
    assert (tmp_path / "elsewhere" / "report.md").read_text() == md and not (run_dir / "report").exists()
    with pytest.raises(ArtifactError, match="no run.json") as err:
        write_run_report(tmp_path / "nothing")
    assert err.value.where == str(tmp_path / "nothing")


# --- intervals: the paired bootstrap, significance, bold ------------------------------------------


def _per_example(rate: float, n: int, seed: int) -> dict[str, float]:
    """n examples right (1.0) with probability ``rate``, keyed e0..e{n-1}."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return {f"e{i}": float(x) for i, x in enumerate(rng.random(n) < rate)}


def test_bootstrap_covers_a_known_difference_and_not_zero():
    import numpy as np

    from profuser.evaluation.stats import bootstrap_mean_ci, paired_delta

    rng = np.random.default_rng(1)
    ref = {f"e{i}": float(v) for i, v in enumerate(rng.normal(1.0, 0.3, 400))}
    shifted = {k: v - 0.1 + float(rng.normal(0, 0.05)) for k, v in ref.items()}  # true difference -0.1
    delta = paired_delta(shifted, ref)
    lo, hi = delta["ci95"]
    assert lo < -0.1 < hi and hi < 0 and delta["significant"] and delta["n_examples"] == 400
    assert delta["mean"] == pytest.approx(-0.1, abs=0.01)
    # pairing matters: the same shift between unpaired noisy scores would be lost in their spread
    assert hi - lo < 0.02
    # no difference: the interval holds 0 and nothing is marked
    same = {k: v + float(rng.normal(0, 0.05)) for k, v in ref.items()}
    zero = paired_delta(same, ref)
    assert zero["ci95"][0] < 0 < zero["ci95"][1] and not zero["significant"]
    # seeded: the same interval twice; another seed moves it only a little
    assert paired_delta(shifted, ref)["ci95"] == [lo, hi]
    values = list(ref.values())
    assert bootstrap_mean_ci(values, seed=3) != bootstrap_mean_ci(values, seed=4)
    assert paired_delta({"x": 1.0}, {"y": 1.0}) is None  # nothing in common


def test_comparison_with_seeds_intervals_and_significant_bold(tmp_path):
    n = 200
    ref = [_per_example(0.3, n, seed) for seed in (0, 1)]
    strong = [_per_example(0.7, n, seed + 10) for seed in (0, 1)]
    twin = [dict(r) for r in ref]  # identical to the reference: Δ exactly 0
    entries = [{"variant": "base (source)", "baseline": True, "scores": {"profuser_heldout": 0.3},
                "per_example": {"profuser_heldout": ref[0]}}]
    for name, runs in (("csft", ref), ("profuser", strong), ("twin", twin)):
        for seed, values in enumerate(runs):
            entries.append({"variant": name, "seed": seed, "scores": {"profuser_heldout": sum(values.values()) / n},
                            "per_example": {"profuser_heldout": values}})
    written = write_comparison(entries, tmp_path, reference="csft")
    data = json.loads(written["json"].read_text())
    assert data["reference"] == "csft"
    by_name = {v["variant"]: v["tasks"]["profuser_heldout"] for v in data["variants"]}
    assert "delta" not in by_name["csft"]
    pf = by_name["profuser"]
    assert pf["n_examples"] == n and pf["seeds"] == [0, 1] and pf["std"] is not None
    assert pf["delta"]["significant"] and pf["delta"]["ci95"][0] > 0.2
    assert by_name["twin"]["delta"] == {"mean": 0.0, "ci95": [0.0, 0.0], "n_examples": n, "significant": False}
    assert "ci95" in by_name["base (source)"]["delta"]
    assert all("per_example" not in e for e in data["entries"])
    md = written["md"].read_text()
    header = md.splitlines()[2]
    assert header == "| Model | Held-out | Δ Held-out vs csft [95% CI] |"  # no Average of one column
    table = md.split("\n\n")[1].splitlines()  # the comparison table, before the notes and the runs table
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table[2:]}
    assert rows["profuser"].count("**") == 2 and rows["profuser"].rstrip(" |").split(" | ")[2].endswith("†")
    assert "**" not in rows["csft (reference)"] and "**" not in rows["twin"] and "†" not in rows["twin"]
    assert written["scores_png"].stat().st_size > 0
    with open(written["csv"], newline="") as fh:
        csv_rows = {r["variant"]: r for r in csv.DictReader(fh)}
    assert csv_rows["profuser"]["profuser_heldout_delta_significant"] == "True"

    # a tie at the top is never bold, however large the lead over the rest
    tied = [e for e in entries if e["variant"] != "profuser"] + [
        {**e, "variant": "profuser2"} for e in entries if e["variant"] == "profuser"] + [
        e for e in entries if e["variant"] == "profuser"]
    assert "**" not in comparison_table(tied, reference="csft")


def test_lower_is_better_direction():
    # bits per byte: the lowest is best, shown with ↓, not in %, and not averaged with accuracies
    rows = [{"variant": "a", "scores": {"profuser_heldout_bpb": 1.2, "profuser_heldout": 0.5},
             "per_example": {"profuser_heldout_bpb": {f"e{i}": 1.2 + 0.01 * (i % 3) for i in range(50)}}},
            {"variant": "b", "scores": {"profuser_heldout_bpb": 0.9, "profuser_heldout": 0.5},
             "per_example": {"profuser_heldout_bpb": {f"e{i}": 0.9 + 0.01 * (i % 5) for i in range(50)}}}]
    table = comparison_table(rows, reference="a").splitlines()
    # one column where higher is better: an Average would repeat it
    assert table[0] == "| Model | Held-out bpb ↓ | Δ Held-out bpb ↓ vs a [95% CI] | Held-out | Δ Held-out vs a [95% CI] |"
    assert table[2] == "| a (reference) | 1.200 |  | 50.00 |  |"
    assert table[3] == "| b | **0.900** | -0.290 [-0.294, -0.285] † | 50.00 | – |"


# --- the terminal ---------------------------------------------------------------------------------


def _report_cli(run_dir: Path, columns: int) -> str:
    from typer.testing import CliRunner

    from profuser.cli import app

    result = CliRunner().invoke(app, ["report", str(run_dir)], env={"COLUMNS": str(columns)})
    assert result.exit_code == 0, result.output
    return result.output


def test_report_reads_at_80_columns(tmp_path):
    run_dir = fabricate_run(tmp_path)
    out = _report_cli(run_dir, 80)
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert not [line for line in lines if line.lstrip().startswith("|")]  # no markdown table rows
    # the stage table is too wide: one block per stage, each value whole on its key's line
    i = lines.index("stage: align/training/llama")
    assert lines[i + 1:i + 5] == ["  status    ran", "  seconds   1.0", "  key       k-align", "  metrics   –"]
    # a path longer than the line continues under itself
    artifact = [lines[i + 5]] + [line for line in lines[i + 6:i + 9] if line.startswith(" " * 12)]
    assert artifact[0].startswith("  artifact  ") and "".join(a[12:] for a in artifact) == \
        str(tmp_path / "store" / "align" / "k-align")
    # narrow tables stay tables, aligned
    assert "fused  20.00  50.00     35.00" in lines and "llama   75.0%" in lines
    assert f"scores: {run_dir / 'report' / 'scores.png'}" in out.replace("\n", "")  # wrapped: a long path
    # the file keeps the markdown
    assert "| data | cached | 0.0 | k-data | train=90, heldout=10 |" in (run_dir / "report" / "report.md").read_text()
    # wide enough: the stage table is a table
    wide = _report_cli(run_dir, 200).splitlines()
    assert next(line for line in wide if line.startswith("stage ")).split() == \
        ["stage", "status", "seconds", "key", "metrics", "artifact"]
    assert "stage: data" not in wide


def test_terminal_text_wraps_long_values_under_themselves():
    from profuser.report import terminal_text

    md = "| stage | metrics |\n| --- | --- |\n| x | " + ", ".join(f"m{i}=0.{i}" for i in range(30)) + " |\n" \
         "| y \\| z | a |\n\n- " + "word " * 40
    lines = terminal_text(md, 60).splitlines()
    assert max(map(len, lines)) <= 60
    assert lines[0] == "stage: x" and lines[1].startswith("  metrics  m0=0.0, m1=0.1,")
    assert lines[2].startswith("           m") and "stage: y | z" in lines  # wrapped under the value; \| a pipe
    assert lines[-1].startswith("  word")  # a long list item hangs under its text


# --- issue 22: reports people read ----------------------------------------------------------------


def test_no_average_column_over_fewer_than_two_columns(tmp_path):
    from profuser.report import write_comparison

    one = [{"variant": "a", "scores": {"profuser_heldout": 0.5}}, {"variant": "b", "scores": {"profuser_heldout": 0.25}}]
    assert "Average" not in comparison_table(one)
    written = write_comparison(one, tmp_path / "one")
    assert "Average" not in written["md"].read_text() and "average" not in written["csv"].read_text().splitlines()[0]
    two = [{"variant": "a", "scores": {"profuser_heldout": 0.5, "gsm8k": 0.25}}]
    assert comparison_table(two).splitlines()[0] == "| Model | GSM8K | Held-out | Average |"
    families = [{"variant": "a", "scores": {"profuser_heldout": 0.5, "profuser_heldout/x": 1.0, "profuser_heldout/y": 0.0}}]
    assert "Average" not in comparison_table(families)  # a task's families are not more columns to average


def _metrics(seed: int, phases: list[tuple[str, int]], kl: bool = True) -> list[dict]:
    rows, step = [], 0
    for index, (name, steps) in enumerate(phases):
        for _ in range(steps):
            step += 1
            row = {"step": step, "phase": name, "phase_index": index, "loss/ce": 2.0 - 0.05 * step + 0.1 * seed}
            if kl:
                row["loss/kl"] = 1.0 - 0.02 * step
            row["loss"] = row["loss/ce"] + 0.5 * row.get("loss/kl", 0.0)
            rows.append(row)
    return rows


def test_loss_curves_mean_over_seeds_ce_and_kl_apart(tmp_path):
    from profuser.report import _boundaries, _mean_band, plot_loss_curves

    runs = [_metrics(seed, [("inference", 2), ("co-fusion", 3)]) for seed in range(3)]
    steps, mean, low, high = _mean_band(runs, "loss/ce")
    assert steps == [1, 2, 3, 4, 5]
    assert mean[0] == pytest.approx(2.0 - 0.05 + 0.1) and low[0] == pytest.approx(1.95) and high[0] == pytest.approx(2.15)
    assert _mean_band([_metrics(0, [("sft", 3)], kl=False)], "loss/kl")[0] == []  # CE-only: no KL curve
    assert _boundaries(runs[0]) == [(3, "co-fusion")]
    # a phase of the same name again is a new phase (its index differs)
    assert _boundaries(_metrics(0, [("a", 1), ("b", 1), ("a", 1)])) == [(2, "b"), (3, "a")]
    pytest.importorskip("matplotlib")
    out = plot_loss_curves({"profuser": runs, "csft": [_metrics(s, [("sft", 4)], kl=False) for s in range(3)]},
                           tmp_path / "loss.png")
    from matplotlib.image import imread

    # CE and KL: two panels; a CE-only run: one, narrower
    ce_only = plot_loss_curves({"csft": [_metrics(0, [("sft", 4)], kl=False)]}, tmp_path / "ce.png")
    assert imread(out).shape[1] > 1.5 * imread(ce_only).shape[1]


def test_run_closing_table_gives_the_interval_and_n(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from profuser.report import run_result_lines

    results = []
    for label, hits in (("fused", 1), ("smollm2", 0)):
        folder = tmp_path / label
        folder.mkdir()
        values = [1.0] * hits + [0.0] * (16 - hits)
        (folder / "results.json").write_text(json.dumps({"label": label, "primary": {"profuser_heldout": sum(values) / 16}}))
        pq.write_table(pa.table({"task": ["profuser_heldout"] * 16, "doc_id": list(range(16)),
                                 "id": [str(i) for i in range(16)], "value": values}), folder / "per_example.parquet")
        results.append(SimpleNamespace(id=f"evaluate/{label}", kind="evaluate", path=str(folder), cached=False))
    lines = run_result_lines(tmp_path / "run", results)
    fused = next(line for line in lines if line.strip().startswith("fused"))
    source = next(line for line in lines if line.strip().startswith("smollm2"))
    assert "6.25 [0.00, 18.75] n=16" in fused and "0.00 [0.00, 0.00] n=16" in source
    assert any("95% interval" in line for line in lines)


def test_score_panels_wrap_after_four_tasks(tmp_path):
    """Seven tasks (a testbed's: three, plus four families) are two lines of four places, not a
    strip seven panels wide; the unused place is left blank."""
    from PIL import Image

    from profuser.report import plot_scores, summarise_variants

    tasks = [f"t{i}" for i in range(7)]
    entries = [{"variant": v, "scores": {t: 0.1 * (i + 1) for t in tasks}} for i, v in enumerate(("a", "b"))]
    png = plot_scores(summarise_variants(entries, tasks, reference="a"), tasks, tmp_path / "s.png", reference="a")
    width, height = Image.open(png).size
    assert width / height < 2.5, (width, height)
