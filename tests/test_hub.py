"""``profuser push`` and ``train.push_to_hub``, offline: the folder it uploads (--dry-run), the Hub
model card's front matter read back by huggingface_hub, the trained chat template kept in the
tokenizer, and the upload calls (HfApi monkeypatched; a dead HF_ENDPOINT is one line)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from huggingface_hub import ModelCard, metadata_load
from typer.testing import CliRunner

from profuser import hub
from profuser.chat import FALLBACK_CHAT_TEMPLATE, encode_chat, format_prompt
from profuser.cli import app
from profuser.recipe import load_recipe
from profuser.testing import tiny_recipe, tiny_tokenizer

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A tiny run whose target is the Gemma-like base model (no chat template): run + evaluate."""
    root = tmp_path_factory.mktemp("hub")
    recipe = tiny_recipe(root, **{"target.ref": str(root / "models" / "tiny-gemma"), "target.label": "gemma"})
    result = cli("run", str(recipe), "--runs-dir", str(root / "runs"), "--device", "cpu")
    assert result.exit_code == 0, result.output
    return root, recipe


def test_dry_run_writes_the_folder_with_a_hub_card(base_run):
    root, _ = base_run
    result = cli("push", "tiny", "--repo", "me/tiny-fused", "--dry-run", "--runs-dir", str(root / "runs"), "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.output)
    folder = Path(record["folder"])
    assert folder == root / "runs" / "runs" / "tiny" / "hub" and record["uploaded"] is False
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json", "loss.png"} <= set(record["files"])

    card = ModelCard.load(folder / "README.md")  # the Hub's own parser
    meta = metadata_load(folder / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert {"profuser", "model-fusion"} <= set(card.data.tags)
    assert "base_model" not in meta and "base_model_relation" not in meta  # a local target has no Hub id
    assert [s["label"] for s in meta["profuser"]["sources"]] == ["llama", "gemma"]
    assert [rm["label"] for rm in meta["profuser"]["reward_models"]] == ["judge"]
    assert [(r.dataset_type, r.metric_type) for r in card.data.eval_results] == [("profuser_heldout", "exact_match")]
    text = (folder / "README.md").read_text()
    assert "## Evaluation" in text and "| fused |" in text and "![training loss](loss.png)" in text
    assert "profuser's fallback" in text and "curriculum:" in text and "report_to" not in text

    # a second dry run replaces its own folder; a folder that is not one is refused
    assert cli("push", "tiny", "--repo", "me/tiny-fused", "--dry-run", "--runs-dir", str(root / "runs")).exit_code == 0
    other = root / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    refused = cli("push", "tiny", "--repo", "me/x", "--dry-run", "--out", str(other), "--runs-dir", str(root / "runs"))
    assert refused.exit_code == 1 and "not an earlier push folder" in refused.output and (other / "notes.txt").is_file()


def test_the_saved_tokenizer_renders_the_prompts_the_model_was_trained_on(base_run):
    from transformers import AutoTokenizer

    root, _ = base_run
    assert cli("push", "tiny", "--repo", "me/tiny-fused", "--dry-run", "--runs-dir", str(root / "runs")).exit_code == 0
    original = tiny_tokenizer("gemma")
    assert not original.chat_template  # a base model: trained with the fallback template
    for folder in (root / "runs" / "runs" / "tiny" / "model", root / "runs" / "runs" / "tiny" / "hub"):
        reloaded = AutoTokenizer.from_pretrained(folder)
        assert reloaded.chat_template == FALLBACK_CHAT_TEMPLATE
        system, instruction = "Be brief.", "What is 7 * 6?"
        # what a user gets from apply_chat_template equals what training and evaluation rendered
        assert reloaded.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": instruction}],
                                            tokenize=False, add_generation_prompt=True) == format_prompt(original, system, instruction)
        a, b = (encode_chat(t, system, instruction, "42", max_length=64) for t in (reloaded, original))
        assert (a.input_ids, a.response_start) == (b.input_ids, b.response_start)


def test_push_creates_the_repo_and_uploads_the_folder(base_run, monkeypatch):
    root, _ = base_run
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, **kw):
            calls.append(("create_repo", repo_id, kw))

        def upload_folder(self, *, repo_id, folder_path, **kw):
            files = sorted(p.name for p in Path(folder_path).iterdir())  # the folder exists only during the upload
            calls.append(("upload_folder", repo_id, files))
            return f"https://huggingface.co/{repo_id}/commit/abc"

    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    result = cli("push", "tiny", "--repo", "me/tiny-fused", "--private", "--runs-dir", str(root / "runs"))
    assert result.exit_code == 0, result.output
    assert calls[0] == ("create_repo", "me/tiny-fused", {"repo_type": "model", "private": True, "exist_ok": True})
    assert calls[1][:2] == ("upload_folder", "me/tiny-fused") and {"README.md", "model.safetensors"} <= set(calls[1][2])
    assert "pushed" in result.output


def test_train_push_to_hub_pushes_when_the_run_ends(base_run, monkeypatch):
    root, recipe = base_run
    pushed = []
    monkeypatch.setattr(hub, "push", lambda run_dir, repo, **kw: pushed.append((Path(run_dir).name, repo, kw)) or {"url": "u"})
    result = cli("run", str(recipe), "--runs-dir", str(root / "runs"), "--device", "cpu",
                 "-o", "train.push_to_hub={repo: me/auto, private: true}")
    assert result.exit_code == 0, result.output
    assert "tiny: 0 stage(s) ran" in result.output  # push_to_hub is in no key: nothing retrains
    assert pushed == [("tiny", "me/auto", {"private": True})]


def test_an_unreachable_hub_is_one_line(base_run, monkeypatch):
    root, _ = base_run
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: no network is used
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_token")
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "http://127.0.0.1:9")
    result = cli("push", "tiny", "--repo", "me/tiny-fused", "--runs-dir", str(root / "runs"))
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().startswith("error push me/tiny-fused: upload failed:") and len(result.output.strip().splitlines()) == 1


def test_an_unknown_run_is_one_line(tmp_path):
    result = cli("push", "nothing", "--repo", "me/x", "--runs-dir", str(tmp_path))
    assert result.exit_code == 1 and "no finished run 'nothing'" in result.output


def test_the_card_of_the_default_recipe_names_hub_models(tmp_path, registry):
    recipe = load_recipe(RECIPES / "profuser.yaml", registry=registry)
    evals = [{"variant": "profuser", "scores": {"profuser_heldout": 0.0625}, "fused": True,
              "config": {"profuser_heldout": {"primary_metric": "exact_match,answer"}}},
             {"variant": "smollm2", "scores": {"profuser_heldout": 0.0}, "config": {}}]
    text, _ = hub.model_card(recipe, repo="me/profuser-smollm2", evals=evals, train_summary={}, loss_image=None,
                                template_source="the target's own", lineage={"recipe": "profuser"})
    (tmp_path / "README.md").write_text(text)
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and card.data.base_model_relation == "finetune"
    sources = metadata_load(tmp_path / "README.md")["profuser"]["sources"]
    assert [s.get("hub_id") for s in sources] == ["HuggingFaceTB/SmolLM2-135M-Instruct", "google/gemma-3-270m"]
    assert card.data.eval_results[0].metric_value == pytest.approx(0.0625)
    assert "| profuser |" in text and "| smollm2 |" in text
    assert hub.hub_id("org/model") == "org/model" and hub.hub_id(str(tmp_path)) is None and hub.hub_id("builtin:x") is None
