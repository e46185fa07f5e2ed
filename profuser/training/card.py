"""The fused model's README.md: what it is, how it was trained, and the recipe that made it."""

from __future__ import annotations

from typing import Any

import yaml


def model_card(*, title: str, base_model: str, summary: dict[str, Any], recipe_yaml: str | None = None,
               lineage: dict[str, Any] | None = None) -> str:
    """Markdown with a YAML front matter (``base_model``, ``tags``), the phases trained, the
    lineage (target, sources, the cache keys of the stages it was built from) and the recipe."""
    front = {"base_model": base_model, "library_name": "transformers", "tags": ["profuser", "model-fusion"]}
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "", f"# {title}", "",
             (f"Fine-tuned from `{base_model}` by knowledge fusion of heterogeneous LLMs with profuser "
              "(ProFuser: progressive fusion of large language models)."),
             "", "## Training", "",
             (f"{summary['steps']} optimizer steps on {summary['world_size']} process(es) ({summary['backend']}); "
              f"final loss {_fmt(summary.get('final_loss'))}."), "",
             "| phase | epochs | KL weight | examples | steps |", "| --- | --- | --- | --- | --- |"]
    for phase in summary["phases"]:
        beta = "the loss's own" if phase["beta"] is None else _fmt(phase["beta"])
        lines.append(f"| {phase['name']} | {phase['epochs']:g} | {beta} | {phase['examples']} | {phase['steps']} |")
    run = (lineage or {}).get("recipe") or "RUN"
    lines += ["", "## Training data", "",
              ("The chosen responses and the teachers' top-k distributions on this model's tokens export as a "
               f"Hugging Face dataset: `profuser export {run} --stage build --to DIR`, then "
               "`datasets.load_from_disk(\"DIR\")` (`--stage select` for the responses alone).")]
    if lineage:
        lines += ["", "## Lineage", "", "```yaml", yaml.safe_dump(lineage, sort_keys=False).rstrip(), "```"]
    if recipe_yaml:
        lines += ["", "## Recipe", "", "```yaml", recipe_yaml.rstrip(), "```"]
    return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
