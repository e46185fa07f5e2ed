"""``profuser_heldout_winrate``: a judged win rate against the target's own answers.

Any dataset has prompts, so this task needs no ``meta.answer``. The evaluated model and the
reference (``evaluate.judge.reference``, default: the recipe's target) answer every held-out
prompt with the same generator (``evaluate.judge.generator``, greedy by default); the judge
(``evaluate.judge.reward_model``, any reward model component) scores both answers, and the
example's outcome is 1 when the evaluated model's answer scores higher, 1/2 on a tie, 0 otherwise
(ties count half, as in AlpacaEval). The score is the mean outcome; per-example outcomes go to
``per_example.parquet``, so ``compare`` pairs them like any other task's values. The target
evaluated against itself gets 1/2 on every example without generating twice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..chat import conversation_history
from ..components import Judged, Prompt
from ..errors import DataError
from .tasks import HELDOUT_WINRATE_TASK


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


def outcome(score: float, reference: float) -> float:
    """1 for a win, 1/2 for a tie, 0 for a loss."""
    return 1.0 if score > reference else 0.5 if score == reference else 0.0


def _first(answer: Any) -> str:
    return answer[0] if isinstance(answer, list) else answer  # a generator with n > 1: sample 0


def judged_winrate(model, reference, prompts: list[Prompt], *, generator, judge, seed: int = 0) -> dict[str, Any]:
    """Generate both models' answers, judge them, and return ``{"metrics": {...}, "ids": [...],
    "values": [...], "samples": [...]}`` (metric keys as lm-eval writes them: ``winrate,none``...).
    ``model`` / ``reference`` are ModelSpecs; the generator loads each in turn."""
    answers = [_first(a) for a in generator.generate(model, prompts, seed=seed)]
    same = model.identity() == reference.identity()
    theirs = answers if same else [_first(a) for a in generator.generate(reference, prompts, seed=seed)]
    items = [Judged(p.system, p.instruction, a, p.id) for p, a in zip(prompts, answers)]
    items += [Judged(p.system, p.instruction, a, p.id) for p, a in zip(prompts, theirs)]
    scores = [float(s) for s in judge.score(items)]
    if len(scores) != len(items):
        raise DataError(f"the judge returned {len(scores)} scores for {len(items)} answers", where="evaluate.judge")
    mine, ref = scores[:len(prompts)], scores[len(prompts):]
    values = [outcome(a, b) for a, b in zip(mine, ref)]
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
               for i, (p, a, r, s, t, v) in enumerate(zip(prompts, answers, theirs, mine, ref, values))]
    return {"metrics": metrics, "ids": [p.id for p in prompts], "values": values, "samples": samples}
