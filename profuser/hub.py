"""Publish a run's fused model on the Hugging Face Hub: ``profuser push RUN --repo ID``.

The folder it uploads (``--dry-run`` writes it and uploads nothing):

- the train stage's ``model/`` files (weights, config, tokenizer), the tokenizer holding the chat
  template the model was trained with (runs trained before the trainer saved it get it here: the
  recipe's override, the tokenizer's own, else profuser's fallback), so it chats the same after
  ``AutoTokenizer.from_pretrained``;
- ``README.md``: a Hub model card. Its YAML front matter follows the Hub's model card metadata:
  ``base_model`` (the target, as a Hub id), ``base_model_relation: finetune``, ``library_name``,
  ``pipeline_tag``, ``tags``, ``datasets`` (Hub datasets the recipe read), ``model-index`` (the fused
  model's scores from the run's ``evaluate/fused`` stage) and ``profuser`` (the recipe name, the
  source and reward models). The body: the models, the evaluation table (fused, target, sources),
  the phases trained, the loss curve, the recipe and the lineage (cache keys);
- ``loss.png``: the training loss per optimizer step (when matplotlib is installed).

Uploads go through ``huggingface_hub.HfApi``: ``create_repo(exist_ok=True)`` then ``upload_folder``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from .errors import ArtifactError, ProfuserError

# the packaged models' Hub originals (their GGUF files were converted from these)
BUILTIN_HUB_IDS = {
    "smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "gemma3-270m": "google/gemma-3-270m", "gemma3": "google/gemma-3-270m",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
CARD_TAGS = ["profuser", "model-fusion", "knowledge-fusion"]


def hub_id(ref: str) -> str | None:
    """The Hub id a model reference names (``builtin:`` models: their originals), or None (a local path)."""
    if ref.startswith("builtin:"):
        return BUILTIN_HUB_IDS.get(ref.removeprefix("builtin:"))
    if _HUB_ID.match(ref) and not Path(ref).expanduser().exists():
        return ref
    return None


def find_run(run: str | Path, runs_dir: Path) -> Path:
    """A run directory: a path holding ``run.json``, or a run name under ``runs_dir/runs``."""
    for candidate in (Path(run), Path(runs_dir) / "runs" / str(run)):
        if (candidate / "run.json").is_file():
            return candidate
    raise ArtifactError(f"no finished run {str(run)!r} (looked for run.json in {run} and {Path(runs_dir) / 'runs' / str(run)})",
                        where="push")


def prepare(run_dir: Path, out: Path, *, repo: str) -> dict[str, Any]:
    """Write the folder ``push`` uploads into ``out`` (replaced if it is an earlier push folder);
    returns ``{"folder", "files", "metadata"}``."""
    from .recipe import Recipe
    from .report import _artifact_dir, read_metrics

    summary = _read_json(run_dir / "run.json")
    stages = summary.get("stages", [])
    train = next((s for s in stages if s.get("id") == "train"), None)  # not a recipe: model's (spec:train)
    train_dir = _artifact_dir(run_dir, train) if train else None
    if train_dir is None or not (train_dir / "model" / "config.json").is_file():
        raise ArtifactError("the run has no trained model (run it to the train stage first)", where=str(run_dir))
    try:
        recipe = Recipe.model_validate(yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8")))
    except (OSError, yaml.YAMLError, ValueError) as exc:
        raise ArtifactError(f"unreadable recipe.yaml: {exc}", where=str(run_dir)) from None
    evals = []
    for stage in stages:
        folder = _artifact_dir(run_dir, stage) if stage.get("kind") == "evaluate" else None
        if folder and (folder / "results.json").is_file():
            results = _read_json(folder / "results.json")
            evals.append({"variant": results.get("label", stage["id"].removeprefix("evaluate/")),
                          "scores": results.get("primary") or {}, "config": results.get("config") or {},
                          "per_example_path": str(folder / "per_example.parquet"), "fused": stage["id"] == "evaluate/fused"})

    final, out = out, out.parent / f".{out.name}.tmp{os.getpid()}"  # whole or not there: renamed when written
    _check_replaceable(final)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for path in (train_dir / "model").iterdir():
        if path.is_file() and path.name != "README.md":
            shutil.copy2(path, out / path.name)
    template_source = _keep_chat_template(out, recipe)
    train_summary = _read_json(train_dir / "summary.json") if (train_dir / "summary.json").is_file() else {}
    loss_image = None
    if (train_dir / "metrics.jsonl").is_file():
        try:
            from .report import plot_loss_curves
        except ImportError:  # plots are optional
            pass
        else:
            loss_image = plot_loss_curves({recipe.name: [read_metrics(train_dir / "metrics.jsonl")]}, out / "loss.png").name
    lineage = {"recipe": recipe.name, "stages": {s["id"]: s.get("key") for s in stages}}
    card, metadata = model_card(recipe, repo=repo, evals=evals, train_summary=train_summary, loss_image=loss_image,
                                template_source=template_source, lineage=lineage)
    (out / "README.md").write_text(card, encoding="utf-8")
    if final.exists():
        shutil.rmtree(final)
    out.rename(final)
    return {"folder": str(final), "files": sorted(p.name for p in final.iterdir()), "metadata": metadata}


def push(run_dir: Path, repo: str, *, private: bool = False, dry_run: bool = False, out: Path | None = None,
         token: str | None = None) -> dict[str, Any]:
    """Upload the run's model folder to ``repo`` (created if missing); with ``dry_run`` only write
    the folder (default ``run_dir/hub``). Returns ``prepare``'s record, plus ``url`` when uploaded."""
    if dry_run:
        return {**prepare(run_dir, out or run_dir / "hub", repo=repo), "repo": repo, "uploaded": False}
    from huggingface_hub import HfApi

    with tempfile.TemporaryDirectory(prefix="profuser-push-") as tmp:
        record = prepare(run_dir, out or Path(tmp) / "model", repo=repo)
        api = HfApi(token=token)
        try:
            api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
            commit = api.upload_folder(repo_id=repo, repo_type="model", folder_path=record["folder"],
                                       commit_message=f"profuser: {record['metadata'].get('model_name', repo)}")
        except Exception as exc:  # noqa: BLE001  (no network, token or rights: the HTTP client's and the Hub's errors)
            raise ProfuserError(f"upload failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
                                "(log in with `hf auth login` or set HF_TOKEN; --dry-run writes the folder only)",
                                where=f"push {repo}") from None
    return {**record, "repo": repo, "uploaded": True, "url": str(getattr(commit, "repo_url", "") or commit)}


def model_card(recipe, *, repo: str, evals: list[dict], train_summary: dict, loss_image: str | None,
               template_source: str, lineage: dict) -> tuple[str, dict]:
    """The Hub model card (markdown with YAML front matter) and its metadata."""
    from huggingface_hub import EvalResult, ModelCardData

    from .pipeline import card_recipe
    from .report import comparison_table, task_order

    target = hub_id(recipe.target.ref)
    sources = [_model_entry(s.ref, s.key) for s in recipe.sources]
    reward_models = [{"label": rm.key, "component": rm.name, **({"model": rm.params["model"]}
                      if isinstance(rm.params.get("model"), str) else {})} for rm in recipe.inference_mode.reward_models]
    for rm in reward_models:
        if "model" in rm and hub_id(rm["model"]):
            rm["hub_id"] = hub_id(rm["model"])
    data = recipe.data.source
    datasets = [data.params["name"]] if data.name == "hub" and isinstance(data.params.get("name"), str) else []
    model_name = repo.split("/")[-1]
    fused = next((e for e in evals if e.get("fused")), None)
    results = []
    for task, value in ((fused or {}).get("scores") or {}).items():
        if isinstance(value, (int, float)):
            metric = str(((fused["config"] or {}).get(task) or {}).get("primary_metric") or "score").split(",")[0]
            results.append(EvalResult(task_type="text-generation", dataset_type=task, dataset_name=task,
                                      metric_type=metric, metric_value=float(value)))
    card_data = ModelCardData(
        base_model=target, base_model_relation="finetune" if target else None, library_name="transformers",
        pipeline_tag="text-generation", tags=[*CARD_TAGS, f"profuser-{recipe.curriculum.name}"], datasets=datasets or None,
        model_name=model_name, eval_results=results or None,
        profuser={"recipe": recipe.name, "target": _model_entry(recipe.target.ref, recipe.target.key),
                  "sources": sources, "reward_models": reward_models, "data": {"source": data.name, "params": data.params},
                  "curriculum": recipe.curriculum.name, "loss": recipe.loss.name},
    )
    metadata = card_data.to_dict()
    lines = ["---", card_data.to_yaml(), "---", "", f"# {model_name}", "",
             (f"`{recipe.target.ref}`" + (f" ([{target}](https://huggingface.co/{target}))" if target else "")
              + " fine-tuned by knowledge fusion of heterogeneous LLMs with "
              "profuser (ProFuser: progressive fusion of large language models, "
              f"recipe `{recipe.name}`): it learns from the sources' advantages in inference mode (their own answers, "
              "voted by reward models) and in training mode (their distributions over the ground truth)."), "",
             "## Models", "", "| role | model | Hub id |", "| --- | --- | --- |",
             f"| target | `{recipe.target.ref}` | {target or '–'} |"]
    lines += [f"| source | `{s['ref']}` | {s.get('hub_id') or '–'} |" for s in sources]
    lines += [f"| reward model `{rm['label']}` | `{rm.get('model', rm['component'])}` | {rm.get('hub_id') or '–'} |"
              for rm in reward_models]
    lines += ["", "## Data", "", f"`{data.name}` {json.dumps(data.params)}; held out: {recipe.data.heldout}.", ""]
    if evals:
        tasks = task_order(evals)
        lines += ["## Evaluation", "", comparison_table(evals, tasks), "",
                  "Scores of the run's `evaluate` stages: the fused model beside the target and the sources.", ""]
    if train_summary.get("phases"):
        lines += ["## Training", "",
                  f"{train_summary.get('steps')} optimizer steps, final loss {_fmt(train_summary.get('final_loss'))}.", "",
                  "| phase | epochs | KL weight | examples | steps |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {p['name']} | {p['epochs']:g} | {'the loss default' if p['beta'] is None else _fmt(p['beta'])} "
                  f"| {p['examples']} | {p['steps']} |" for p in train_summary["phases"]]
        lines.append("")
    if loss_image:
        lines += [f"![training loss]({loss_image})", ""]
    lines += ["## Chat template", "", f"The tokenizer holds the chat template the model was trained with ({template_source}):",
              "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
              f'model = AutoModelForCausalLM.from_pretrained("{repo}")',
              'prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 7 * 6?"}],',
              "                                       add_generation_prompt=True, return_tensors=\"pt\")",
              "print(tokenizer.decode(model.generate(prompt, max_new_tokens=64)[0]))", "```", "",
              "## Recipe", "", "```yaml", card_recipe(recipe).rstrip(), "```", "",
              "## Lineage", "", "```yaml", yaml.safe_dump(lineage, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines), metadata


def _model_entry(ref: str, label: str) -> dict[str, str]:
    found = hub_id(ref)
    return {"label": label, "ref": ref, **({"hub_id": found} if found else {})}


def _keep_chat_template(folder: Path, recipe) -> str:
    """Make the tokenizer in ``folder`` hold the template the model was trained with; says which."""
    from transformers import AutoTokenizer

    from .chat import FALLBACK_CHAT_TEMPLATE, resolve_chat_template

    tokenizer = AutoTokenizer.from_pretrained(folder)
    override = recipe.target.chat_template
    named = f"the recipe's `{override}`" if override and len(override) < 40 else "the recipe's chat_template"
    if tokenizer.chat_template:  # saved by the trainer (with the recipe's override applied, if any)
        if tokenizer.chat_template == FALLBACK_CHAT_TEMPLATE:
            return "profuser's fallback, as the target had none"
        return named if override else "the target's own"
    tokenizer.chat_template = resolve_chat_template(override) if override else FALLBACK_CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return named if override else "profuser's fallback, as the target had none"


def _check_replaceable(out: Path) -> None:
    """Only an empty folder or an earlier push folder (a profuser card) is replaced."""
    if out.exists():
        card = out / "README.md"
        if not out.is_dir() or (any(out.iterdir()) and not (
                card.is_file() and "- profuser\n" in card.read_text(encoding="utf-8", errors="replace"))):
            raise ProfuserError("not empty and not an earlier push folder: choose another --out", where=str(out))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"unreadable: {exc}", where=str(path)) from None


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
