"""lm-eval integration: the paper's benchmarks (Open LLM Leaderboard shots), lm-eval's own task
definitions on local data, and the built-in ``profuser_heldout`` task. See docs/evaluation.md."""

from .harness import evaluate_model, has_chat_template
from .heldout import extract_answer
from .tasks import DEFAULT_SHOTS, HELDOUT_TASK, KNOWN_TASKS, PAPER_TASKS, TaskInfo, primary_metric, task_title

__all__ = [
    "DEFAULT_SHOTS",
    "HELDOUT_TASK",
    "KNOWN_TASKS",
    "PAPER_TASKS",
    "TaskInfo",
    "evaluate_model",
    "extract_answer",
    "has_chat_template",
    "primary_metric",
    "task_title",
]
