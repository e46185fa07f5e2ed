"""``profuser_heldout_winrate``: a judged win rate against the target's own answers.

Any dataset has prompts, so this task needs no ``meta.answer``. The evaluated model and the
reference (``evaluate.judge.reference``, default: the recipe's target) answer every held-out
prompt with the same generator (``evaluate.judge.generator``, greedy by default); the judge
(``evaluate.judge.reward_model``, any reward model component) scores both answers, and the
example's outcome is 1 when the evaluated model's answer scores higher, 1/2 on a tie or the same
answer, 0 otherwise (ties count half, as in AlpacaEval). The score is the mean outcome;
per-example outcomes go to ``per_example.parquet``, so ``compare`` pairs them like any other
task's values. The reference's answers and scores are computed once (the ``judge/<reference>``
stage) and read by every evaluation; the reference evaluated against itself ties everywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..chat import conversation_history
from ..components import Judged, Prompt
from ..errors import DataError
from .tasks import HELDOUT_WINRATE_TASK

REFERENCE_ANSWERS = "answers.parquet"  # the judge/<reference> stage's: id, response, score


def heldout_prompts(path: Path, limit: int | None = None) -> list[Prompt]:
    """The held-out prompts (id, system, instruction), in file order; at most ``limit``."""
    import pyarrow.parquet as pq

    if not Path(path).is_file():
        raise DataError("held-out split not found (the data stage writes heldout.parquet)", where=str(path))
    table = pq.read_table(path)
    missing = {"id", "instruction"} - set(table.column_names)
    if missing:
        raise DataError(f"held-out table lacks column(s) {', '.join(sorted(missing))}", where=str(path))
    systems = table.column("system").to_pylist() if "system" in table.column_names else [""] * table.num_rows
    metas = table.column("meta").to_pylist() if "meta" in table.column_names else [None] * table.num_rows
    # a conversation's answers continue it at its last user turn (its earlier turns: chat.conversation_history)
    prompts = [Prompt(str(i), s or "", q, conversation_history(m))
               for i, s, q, m in zip(table.column("id").to_pylist(), systems, table.column("instruction").to_pylist(), metas)
               if q]
    if not prompts:
        raise DataError(f"no held-out row has an instruction, so {HELDOUT_WINRATE_TASK} has nothing to judge",
                        where=str(path))
    return prompts[:limit] if limit else prompts


def read_reference_answers(folder: Path, ids: list[str]) -> tuple[list[str], list[float]]:
    """The reference's (answers, scores) that the ``judge/<reference>`` stage wrote, for ``ids``:
    the prompts it answered must be the ones evaluated."""
    import pyarrow.parquet as pq

    path = Path(folder) / REFERENCE_ANSWERS
    if not path.is_file():
        raise DataError(f"{REFERENCE_ANSWERS} not found (the judge/<reference> stage writes it)", where=str(folder))
    table = pq.read_table(path)
    if table["id"].to_pylist() != ids:
        raise DataError(f"the reference answered other prompts than the {len(ids)} held-out ones evaluated",
                        where=str(path))
    return table["response"].to_pylist(), [float(s) for s in table["score"].to_pylist()]


def outcome(score: float, reference: float) -> float:
    """1 for a win, 1/2 for a tie, 0 for a loss."""
    return 1.0 if score > reference else 0.5 if score == reference else 0.0


def _first(answer: Any) -> str:
    return answer[0] if isinstance(answer, list) else answer  # a generator with n > 1: sample 0


def answer_and_score(model, prompts: list[Prompt], *, generator, judge, seed: int = 0) -> tuple[list[str], list[float]]:
    """``model``'s answers to ``prompts`` (a ModelSpec: the generator loads it) and the judge's
    score of each."""
    answers = [_first(a) for a in generator.generate(model, prompts, seed=seed)]
    scores = [float(s) for s in judge.score([Judged(p.system, p.instruction, a, p.id) for p, a in zip(prompts, answers)])]
    if len(scores) != len(answers):
        raise DataError(f"the judge returned {len(scores)} scores for {len(answers)} answers", where="evaluate.judge")
    return answers, scores


def judged_winrate(prompts: list[Prompt], mine: tuple[list[str], list[float]],
                   theirs: tuple[list[str], list[float]]) -> dict[str, Any]:
    """The outcomes of the evaluated model's (answers, scores) against the reference's, and
    ``{"metrics": {...}, "ids": [...], "values": [...], "samples": [...]}`` (metric keys as
    lm-eval writes them: ``winrate,none``...)."""
    answers, scores = mine
    references, reference_scores = theirs
    # the same answer ties whatever a batch's padding does to its score
    values = [0.5 if a == r else outcome(s, t) for a, r, s, t in zip(answers, references, scores, reference_scores)]
    n = len(values)
    mean = sum(values) / n
    variance = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    metrics = {
        "winrate,none": mean,
        "winrate_stderr,none": (variance / n) ** 0.5,
        "wins,none": float(sum(v == 1.0 for v in values)),
        "ties,none": float(sum(v == 0.5 for v in values)),
        "losses,none": float(sum(v == 0.0 for v in values)),
    }
    samples = [{"doc_id": i, "id": p.id, "prompt": p.instruction, "response": a, "reference_response": r,
                "score": s, "reference_score": t, "metrics": {"winrate": v}}
               for i, (p, a, r, s, t, v) in enumerate(zip(prompts, answers, references, scores, reference_scores, values))]
    return {"metrics": metrics, "ids": [p.id for p in prompts], "values": values, "samples": samples}
