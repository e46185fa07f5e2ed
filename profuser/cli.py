"""The ``profuser`` command line. Thin: every command calls the library and prints.

Errors a user can act on (bad recipe, data, model, plugin) print as ``where: message`` lines on
stderr with a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .errors import ProfuserError, RecipeError

app = typer.Typer(
    help="Fuse heterogeneous LLMs: ProFuser, its ablations and your own plugins, from YAML recipes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

RunsDir = Annotated[Path, typer.Option("--runs-dir", envvar="PROFUSER_RUNS_DIR", help="Where artifacts and runs are kept.")]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def print_error(exc: ProfuserError) -> None:
    for line in exc.lines():  # one problem per line, never wrapped, so that grep and editors can use them
        err_console.print(Text("error ", style="red") + Text(line), soft_wrap=True)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so that it stops as after Ctrl-C (workers stopped too)."""


def _terminated(signum, frame):
    raise Terminated()


def friendly(fn):
    """Print ProfuserErrors as `where: message` lines and exit with their status; SIGINT and SIGTERM
    stop in one line (exit 130, 143), what is finished kept."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _terminated) if main_thread else None
        try:
            return fn(*args, **kwargs)
        except ProfuserError as exc:
            print_error(exc)
            raise typer.Exit(exc.exit_code) from None
        except OSError as exc:  # a full or read-only disk outside a stage (gc, report, records)
            from .store import disk_error

            error = disk_error(exc, Path.cwd())
            if error is None:
                raise
            print_error(error)
            raise typer.Exit(error.exit_code) from None
        except KeyboardInterrupt as exc:
            how = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
            err_console.print(f"{how}: finished stages are kept; run the same command to resume")
            raise typer.Exit(143 if isinstance(exc, Terminated) else 130) from None
        finally:
            if main_thread and previous is not None:  # None: a handler set outside Python, left as is
                signal.signal(signal.SIGTERM, previous)

    return wrapper


def _runtime(runs_dir: Path, device: str, recipe_file: Path | None = None):
    from .pipeline import Runtime

    cache = os.environ.get("PROFUSER_CACHE")
    return Runtime(runs_dir=runs_dir, device=device, cache_dir=Path(cache) if cache else None,
                   progress=sys.stderr.isatty(), recipe_file=recipe_file)


@app.command()
@friendly
def run(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    override: Annotated[list[str], typer.Option("-o", "--override", help="Override a field: -o train.lr=1e-5")] = [],
    runs_dir: RunsDir = Path("runs"),
    until: Annotated[str | None, typer.Option(help="Stop after this stage (id, kind or id prefix).")] = None,
    force: Annotated[list[str], typer.Option(help="Recompute this stage and what depends on it.")] = [],
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1 ...")] = "auto",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan and estimates; run nothing.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="With --dry-run: print the plan as JSON.")] = False,
):
    """Run a recipe: every stage, reusing what is cached; a killed run resumes where it stopped."""
    from .pipeline import Runner, rank_and_world
    from .plugins import get_engine
    from .recipe import load_recipe

    engine = get_engine()
    recipe_obj = load_recipe(recipe, override, registry=engine.registry)
    runner = Runner(recipe_obj, engine, _runtime(runs_dir, device, recipe), force=force, until=until,
                    echo=lambda line: console.print(line, highlight=False, markup=False))
    if dry_run:
        from .estimate import estimate_plan

        plan = estimate_plan(runner)
        if as_json:
            print(json.dumps(plan, indent=2, ensure_ascii=False))
        else:
            _print_plan(plan)
        return
    results = runner.run()
    from .report import run_result_lines

    for line in run_result_lines(runner.run_dir, results, recipe_obj):
        console.print(line, highlight=False, markup=False)
    target = recipe_obj.train.push_to_hub
    if target and any(r.id == "train" for r in results) and rank_and_world()[0] == 0:  # train.push_to_hub
        from .hub import push as push_run

        pushed = push_run(runner.run_dir, target.repo, private=target.private)
        console.print(f"pushed to {pushed['url']}", highlight=False, markup=False)


def _print_plan(plan: dict) -> None:
    hw, sizes = plan["hardware"], plan["sizes"]
    # plain fixed-width lines, not a rich table: ten columns stay readable in logs and 80-column terminals
    cols = [("stage", "<"), ("status", "<"), ("tokens", ">"), ("tok/s/GPU", ">"), ("GPU-h", ">"), ("GPUs", ">"),
            ("wall h", ">"), ("GPU GB/proc", ">"), ("disk GB", ">"), ("note", "<")]
    rows = [[s["id"], "cached" if s["cached"] else "to run", f"{s['tokens']:,}" if s["tokens"] else "-",
             f"{s['throughput']:,}" if s["throughput"] else "-", f"{s['gpu_hours']:g}" if s["gpu_hours"] else "-",
             str(s["gpus"] or "-"), f"{s['wall_hours']:g}" if s["wall_hours"] else "-",
             f"{s['gpu_memory_gb']:g}" if s["gpu_memory_gb"] else "-", f"{s['disk_gb']:g}" if s["disk_gb"] else "-",
             s["note"] + (f"; {s['scratch_gb']:g} GB of checkpoints while it runs" if s["scratch_gb"] else "")]
            for s in plan["stages"]]
    widths = [max(len(name), *(len(r[i]) for r in rows)) for i, (name, _) in enumerate(cols)]
    # the machine only when the recipe declares one (estimate.gpu / gpus): a CPU run is not on 8 A100s
    machine = f" on {hw['gpus']} x {hw['gpu']}" if hw.get("declared") else ""
    console.print(Text(f"plan for {plan['recipe']}{machine}", style="bold"))
    for line in [[name for name, _ in cols], *rows]:
        cells = [f"{cell:{align}{width}}" for cell, (_, align), width in zip(line, cols, widths)]
        console.print(Text("  ".join(cells).rstrip()), soft_wrap=True)
    console.print(Text(f"sizes ({sizes['from']}): {sizes['examples']:,} training examples, {sizes['heldout']:,} held out; "
                       f"mean tokens: prompt {sizes['prompt_tokens']:g}, response {sizes['response_tokens']:g}, "
                       f"generated {sizes['generated_tokens']:g}"), soft_wrap=True)
    if "dtypes" in plan:  # a spec without a dtype: the device's default, resolved before the keys
        sources = ", ".join(f"{k} {v}" for k, v in plan["dtypes"]["sources"].items())
        console.print(Text(f"dtypes: target {plan['dtypes']['target']}; sources {sources} (unset: bfloat16 on a "
                           "CUDA GPU with bf16, float32 on a CPU)"), soft_wrap=True)
    if not hw.get("declared"):
        console.print(Text(f"GPU figures at the rates of one {hw['gpu']} per process, {hw['gpus']} for wall-clock "
                           "(estimate's defaults): declare your machine as estimate: {gpu: ..., gpus: ...}"), soft_wrap=True)
    for name, source in plan["throughput_sources"].items():
        console.print(Text(f"{name}: {plan['throughputs'][name]:,} tok/s/GPU for the target's size ({source})"), soft_wrap=True)
    _print_total("total", plan["total"])
    for warning in plan.get("warnings", []):  # a stage that would not fit the declared GPU
        console.print(Text("warning ", style="yellow") + Text(warning), soft_wrap=True)
    for s in plan["stages"]:  # what changed since this recipe's last run (a first run says nothing)
        if s.get("why") and s["why"] != ["not run before"]:
            console.print(Text(f"why {s['id']}: {'; '.join(s['why'])}"), soft_wrap=True)


def _print_total(label: str, total: dict) -> None:
    extra = "; ".join(f"{k.replace('_', ' ')}: {v}" for k, v in total.items()
                      if k not in ("gpu_hours", "gpu_hours_to_run", "wall_hours", "disk_gb", "peak_gpu_memory_gb"))
    console.print(Text(f"{label}: {total['gpu_hours']:g} GPU-hours ({total['gpu_hours_to_run']:g} still to run), "
                       f"{total['wall_hours']:g} h wall-clock, {total['disk_gb']:g} GB disk, "
                       f"peak {total['peak_gpu_memory_gb']:g} GB GPU memory per process" + (f"; {extra}" if extra else "")),
                  soft_wrap=True)


@app.command()
@friendly
def validate(
    recipes: Annotated[list[Path], typer.Argument(help="Recipe files to check.")],
    override: Annotated[list[str], typer.Option("-o", "--override")] = [],
    runs_dir: RunsDir = Path("runs"),
):
    """Check recipes (fields, component names and params, files) without running anything; where
    --runs-dir holds a recipe's data stage, also that no training prompt is longer than a local
    model's context (its tokenizer, chat-formatted, against its max_position_embeddings)."""
    from .pipeline import plan
    from .plugins import get_engine
    from .recipe import load_recipe

    engine = get_engine()
    failed = 0
    for path in recipes:
        other = _not_a_recipe(path)
        if other:  # `recipes/**/*.yaml` also matches the accelerate configs beside the recipes
            console.print(f"skip {path}: {other}, not a recipe", highlight=False, soft_wrap=True)
            continue
        try:
            recipe = load_recipe(path, override, registry=engine.registry)
            plan(recipe, engine)
        except RecipeError as exc:
            if exc.file is None:
                exc.file = str(path)
            missing = [m for p, m in exc.problems if p == "data.source.params.path"]
            if missing and len(missing) == len(exc.problems):  # all else checked: the data lives elsewhere
                console.print(f"ok {path} (except data.source.params.path: {missing[0]}: `run` needs it)", highlight=False,
                              soft_wrap=True)
                continue
            failed += 1
            print_error(exc)
            continue
        too_long = _overlong_prompts(path, recipe, engine, runs_dir)
        for line in too_long:
            err_console.print(Text("error ", style="red") + Text(line), soft_wrap=True)
        failed += bool(too_long)
        if not too_long:
            console.print(f"ok {path}", highlight=False)
    if failed:
        raise typer.Exit(2)


def _overlong_prompts(path: Path, recipe, engine, runs_dir: Path) -> list[str]:
    """A line for each local model (folder or builtin:) whose context some of the recipe's cached
    training prompts exceed; none when the data stage is not in the store (the generate stage
    counts them when it runs). Hub models and GGUF files are left to the run (no download here)."""
    if not (runs_dir / "store" / "data").is_dir():
        return []
    from .chat import conversation_history
    from .components import Prompt
    from .data import read_records
    from .model_files import looks_local
    from .models import as_spec, load_tokenizer
    from .pipeline import Runner
    from .prompt_limits import overlong_prompts

    runtime = _runtime(runs_dir, "cpu", path)
    runner = Runner(recipe, engine, runtime, echo=lambda _: None)
    by_id = {s.id: s for s in runner.stages}
    lines, seen, prompts = [], set(), {}
    for stage in runner.stages:
        data = by_id.get(stage.deps.get("data", f"{stage.prefix}data"))
        if stage.kind not in ("generate", "logits") or data is None:
            continue
        spec = as_spec(stage.config.model)
        local = spec.ref.startswith("builtin:") or (looks_local(spec.ref) and not spec.ref.endswith(".gguf"))
        if not local or spec.gguf_file or (spec.key, data.id) in seen:
            continue
        seen.add((spec.key, data.id))
        if data.id not in prompts:
            artifact = runner.store.get("data", runner.keys[data.id], quarantine=False)
            prompts[data.id] = None if artifact is None else [
                Prompt(r.id, r.system, r.instruction, conversation_history(r.meta))
                for r in read_records(artifact.path / "train.parquet")]
        if prompts[data.id] is None:
            continue
        tokenizer = load_tokenizer(spec, cache_dir=runtime.cache_dir, engine=engine)
        found = overlong_prompts(tokenizer, spec, prompts[data.id])
        if found is not None and found.count:
            lines.append(f"{path}: {found.line()}: {stage.id} would truncate them; shorten or drop them, "
                         "or use a model with a longer context")
    return lines


def _not_a_recipe(path: Path) -> str | None:
    """What a YAML file is when it is an accelerate config rather than a recipe (None: a recipe)."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None  # load_recipe reports it
    if isinstance(data, dict) and "target" not in data and "extends" not in data \
            and ({"distributed_type", "compute_environment"} & set(data)):
        return "an accelerate config (accelerate launch --config_file)"
    return None


@app.command()
@friendly
def plugins(as_json: JsonFlag = False):
    """Installed plugins, their versions and the components each registers."""
    from .plugins import get_engine

    engine = get_engine()
    rows = [{"plugin": p.name, "version": p.version, "builtin": p.builtin,
             "components": [f"{c.kind}:{c.name}" for c in p.components]} for p in engine.plugins.values()]
    if as_json:
        console.print_json(json.dumps(rows))
        return
    table = Table(title="profuser plugins")
    for col in ("plugin", "version", "components"):
        table.add_column(col)
    for row in rows:
        table.add_row(row["plugin"] + ("" if row["builtin"] else " (third-party)"), row["version"], ", ".join(row["components"]))
    console.print(table)


@app.command()
@friendly
def components(
    kind: Annotated[str | None, typer.Option(help="Only this kind (evaluators, curricula, ...).")] = None,
    as_json: JsonFlag = False,
):
    """Registered components of each kind, with their params schema."""
    from .components import KINDS
    from .plugins import get_engine

    if kind and kind not in KINDS:
        raise ProfuserError(f"unknown kind {kind!r}; kinds: {', '.join(KINDS)}", where="--kind")
    infos = get_engine().registry.components(kind)
    if as_json:
        rows = [{"kind": i.kind, "name": i.name, "aliases": list(i.aliases), "plugin": i.plugin,
                 "doc": (i.cls.__doc__ or "").strip().split("\n")[0], "params": i.params_schema()} for i in infos]
        console.print_json(json.dumps(rows))
        return
    # Text objects only, never markup strings: docstrings and defaults hold brackets ("[/INST]")
    # that rich would read as tags. Blocks rather than a table, so whole docstrings stay readable.
    shown_kind = None
    for info in infos:
        if info.kind != shown_kind:
            shown_kind = info.kind
            console.print(Text(f"\n{info.kind}", style="bold underline"))
        head = Text("  ") + Text(info.name, style="bold cyan")
        if info.aliases:
            head += Text(f" (aliases: {', '.join(info.aliases)})")
        head += Text(f"  [{info.plugin}]", style="dim")
        console.print(head, soft_wrap=True)
        for line in _component_doc(info.cls).splitlines():
            console.print(Text("      " + line), soft_wrap=True)
        for line in _params_lines(info.cls.Params):
            console.print(Text("      " + line, style="green"), soft_wrap=True)


def _component_doc(cls) -> str:
    """The class docstring in full; many built-ins document themselves in their module instead."""
    import inspect

    doc = cls.__dict__.get("__doc__") or getattr(sys.modules.get(cls.__module__), "__doc__", None) or ""
    return inspect.cleandoc(doc)


def _schema_type(prop: dict) -> str:
    """A JSON-schema property as a type for people: a Literal's choices (``'a' | 'b'``), else its type."""
    if "enum" in prop:
        return " | ".join(repr(v) for v in prop["enum"])
    if "const" in prop:
        return repr(prop["const"])
    return prop.get("type") or prop.get("$ref", "object").rsplit("/", 1)[-1]


def _params_lines(params) -> list[str]:
    """One line per field of a Params model: ``params.name: type = default  description``."""
    props = params.model_json_schema().get("properties", {})
    lines = []
    for name, info in params.model_fields.items():
        prop = props.get(info.alias or name, {})
        kind = " | ".join(_schema_type(p) for p in prop.get("anyOf") or [prop])
        # default_factory defaults are absent from the JSON schema: ask the field itself
        default = " (required)" if info.is_required() else f" = {info.get_default(call_default_factory=True)!r}"
        description = f"  {info.description}" if info.description else ""
        lines.append(f"params.{info.alias or name}: {kind}{default}{description}")
    return lines


@app.command()
def schema():
    """The recipe JSON schema (for editor autocompletion)."""
    from .recipe import recipe_schema

    print(json.dumps(recipe_schema(), indent=2))


@app.command()
@friendly
def runs(
    runs_dir: RunsDir = Path("runs"),
    as_json: JsonFlag = False,
    gc: Annotated[bool, typer.Option("--gc", help="Remove corrupt copies, trash, empty partials, stale locks and "
                                     "temporary files (a live run's are kept).")] = False,
    everything: Annotated[bool, typer.Option("--all", help="With --gc: also resumable partials of killed runs and "
                                             "artifacts no run record references.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="With --gc: only list what would be removed.")] = False,
):
    """Runs and cached stages, with their sizes; --gc collects what kills and corruption left."""
    from .store import ArtifactStore

    store = ArtifactStore(runs_dir)
    if (everything or dry_run) and not gc:
        raise ProfuserError("--all and --dry-run go with --gc", where="profuser runs")
    if gc:
        _collect(store, everything=everything, dry_run=dry_run, as_json=as_json)
        return
    run_rows = []
    for run_json in sorted((runs_dir / "runs").glob("*/run.json")):
        summary = json.loads(run_json.read_text())
        run_rows.append({"run": summary["recipe"], "seconds": round(summary["seconds"], 1),
                         "stages": len(summary["stages"]), "ran": sum(not s["cached"] for s in summary["stages"])})
    artifacts = [{"kind": a.kind, "key": a.key, "stage": a.manifest.get("stage_id", ""), "bytes": a.size_bytes(),
                  "seconds": round(a.manifest.get("seconds", 0.0), 1)} for a in store.artifacts()]
    if as_json:
        console.print_json(json.dumps({"runs": run_rows, "artifacts": artifacts}))
        return
    table = Table(title=f"runs in {runs_dir}")
    for col in ("run", "stages", "ran last time", "seconds"):
        table.add_column(col)
    for row in run_rows:
        table.add_row(row["run"], str(row["stages"]), str(row["ran"]), str(row["seconds"]))
    console.print(table)
    table = Table(title="cached stages")
    for col in ("stage", "key", "size", "seconds"):
        table.add_column(col)
    for row in artifacts:
        table.add_row(row["stage"], row["key"], _human(row["bytes"]), str(row["seconds"]))
    console.print(table)


@app.command()
@friendly
def compare(
    recipes: Annotated[list[Path], typer.Argument(help="Recipes to run and compare (ablations of one another).")],
    out: Annotated[Path, typer.Option("--out", help="Where the table and plots go.")] = Path("comparison"),
    override: Annotated[list[str], typer.Option("-o", "--override", help="Applied to every recipe.")] = [],
    seeds: Annotated[str | None, typer.Option(help="Comma-separated training seeds (train.seed): each variant trains once per seed; the stages before train are shared (mean ± std).")] = None,
    reference: Annotated[str | None, typer.Option(help="Variant to compare every other with (paired bootstrap 95% CI); default: the first recipe's.")] = None,
    runs_dir: RunsDir = Path("runs"),
    device: Annotated[str, typer.Option(help="auto, cpu, cuda ...")] = "auto",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print each recipe's plan and the suite's cost "
                                          "(every shared stage once); run nothing.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="With --dry-run: print JSON.")] = False,
):
    """Run recipes side by side (sharing every cached stage) and write a Table-1-style comparison."""
    if dry_run:
        _compare_dry_run(recipes, override, runs_dir, device, as_json)
        return
    from .compare import run_comparison
    from .plugins import get_engine
    from .report import write_comparison

    try:
        seed_list = [int(x) for x in seeds.split(",") if x.strip()] if seeds else []
    except ValueError:
        raise ProfuserError(f"seeds must be comma-separated integers, got {seeds!r}", where="--seeds") from None
    if len(set(seed_list)) != len(seed_list):
        raise ProfuserError(f"a seed is listed twice: {seeds}", where="--seeds")
    import contextlib

    from .store import record_comparison

    with contextlib.ExitStack() as leases:  # every recipe's stages leased until the comparison is recorded
        result = run_comparison(recipes, get_engine(), _runtime(runs_dir, device), overrides=override, seeds=seed_list,
                                echo=lambda line: console.print(line, highlight=False, markup=False), held=leases)
        fused = [e for e in result["entries"] if not e.get("baseline")]
        written = write_comparison(result["entries"], out, reference=reference or (fused[0]["variant"] if fused else None))
        record_comparison(runs_dir, written["json"], result["stages"])  # `runs --gc --all` keeps what it points at
    timing = {k: round(v, 1) for k, v in result.items() if k not in ("entries", "stages")}
    (out / "suite.json").write_text(json.dumps(timing, indent=2))
    console.print((out / "comparison.md").read_text().split("## ")[0])
    console.print(f"suite: {timing['suite_seconds']} s (stages once: {timing['stage_seconds_once']} s; "
                  f"each recipe cold on its own: {timing['cold_seconds_each_alone']} s)")
    console.print("wrote " + ", ".join(str(p) for p in written.values()))


def _compare_dry_run(recipes: list[Path], override: list[str], runs_dir: Path, device: str, as_json: bool) -> None:
    from .estimate import estimate_suite
    from .pipeline import Runner
    from .plugins import get_engine
    from .recipe import load_recipe

    engine = get_engine()
    runners = [Runner(load_recipe(path, override, registry=engine.registry), engine, _runtime(runs_dir, device, path))
               for path in recipes]
    suite = estimate_suite(runners)
    if as_json:
        print(json.dumps(suite, indent=2, ensure_ascii=False))
        return
    for plan in suite["recipes"]:
        _print_total(plan["recipe"], plan["total"])
    s = suite["suite"]
    _print_total(f"suite ({s['stages']} distinct stages of {s['stages_if_each_ran_alone']}; "
                 f"{s['gpu_hours_if_each_ran_alone']:g} GPU-hours if each recipe ran alone)",
                 {k: v for k, v in s.items() if k not in ("stages", "stages_if_each_ran_alone", "gpu_hours_if_each_ran_alone")})


@app.command()
@friendly
def advantages(
    recipe: Annotated[Path, typer.Argument(help="A fusion recipe (evaluate.baselines: true, profuser_heldout among its tasks).")],
    override: Annotated[list[str], typer.Option("-o", "--override", help="Override a field: -o data.heldout=0.2")] = [],
    out: Annotated[Path | None, typer.Option("--out", help="Also write the map as JSON to this file (and .md beside it).")] = None,
    runs_dir: RunsDir = Path("runs"),
    device: Annotated[str, typer.Option(help="auto, cpu, cuda ...")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print only the JSON.")] = False,
):
    """Which source holds which advantage, before fusing: per family of held-out tasks (meta.task), the
    exact match of the target and each source with 95% intervals. Runs only the data stage and the
    baseline evaluations (cached like any run); exits 1 when the setting is not valid for fusion
    (a source ahead of the target nowhere, or everywhere)."""
    from .advantages import markdown, measure
    from .pipeline import Runner
    from .plugins import get_engine
    from .recipe import load_recipe

    engine = get_engine()
    recipe_obj = load_recipe(recipe, override, registry=engine.registry)
    echo = (lambda line: err_console.print(line, highlight=False, markup=False)) if as_json else \
        (lambda line: console.print(line, highlight=False, markup=False))
    table = measure(Runner(recipe_obj, engine, _runtime(runs_dir, device, recipe), echo=echo))
    if out is not None:
        from .store import atomic_write_json, atomic_write_text

        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out, table)
        atomic_write_text(out.with_suffix(".md"), markdown(table) + "\n")
    if as_json:
        print(json.dumps(table, indent=2))
    else:
        console.print(markdown(table), highlight=False, markup=False)
    if not table["valid"]:
        raise typer.Exit(1)


@app.command()
@friendly
def report(
    run: Annotated[Path, typer.Argument(help="A run directory (RUNS/runs/NAME) or a recipe name.")],
    runs_dir: RunsDir = Path("runs"),
    out: Annotated[Path | None, typer.Option(help="Output folder (default: RUN/report).")] = None,
):
    """A single run's summary: stage timings and cache hits, advantage shares, alignment, curves, scores.
    Written as markdown to report.md; printed for the terminal's width (COLUMNS), tables too wide
    for it as one key/value block per row."""
    import shutil

    from .report import terminal_text, write_run_report

    run_dir = run if (run / "run.json").exists() else runs_dir / "runs" / str(run)
    if not (run_dir / "run.json").exists():
        raise ProfuserError(f"no run.json in {run_dir} (run the recipe first)", where=str(run))
    out_dir = out or run_dir / "report"
    width = shutil.get_terminal_size((100, 24)).columns  # COLUMNS first, then the terminal
    # pre-wrapped: rich must not wrap again (soft_wrap) nor read [..] as markup
    console.print(terminal_text(write_run_report(run_dir, out), width, base=out_dir), soft_wrap=True,
                  markup=False, highlight=False)


@app.command()
@friendly
def push(
    run: Annotated[Path, typer.Argument(help="A run directory (RUNS/runs/NAME) or a recipe name.")],
    repo: Annotated[str, typer.Option(help="Hub repository id: user/name or org/name (created if missing).")],
    private: Annotated[bool, typer.Option("--private", help="Create the repository private.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Write the folder it would upload; upload nothing.")] = False,
    out: Annotated[Path | None, typer.Option(help="Where to write the folder (default with --dry-run: RUN/hub).")] = None,
    runs_dir: RunsDir = Path("runs"),
    as_json: JsonFlag = False,
):
    """Push a run's fused model to the Hugging Face Hub, with a Hub model card (sources, reward
    models, data, evaluation, loss curve, recipe) and the chat template it was trained with."""
    from .hub import find_run
    from .hub import push as push_run

    record = push_run(find_run(run, runs_dir), repo, private=private, dry_run=dry_run, out=out)
    if as_json:
        print(json.dumps(record, indent=2, ensure_ascii=False))
    elif record["uploaded"]:
        console.print(f"pushed {len(record['files'])} files to {record['url']}", highlight=False, markup=False)
    else:
        console.print(f"dry run: {len(record['files'])} files for {repo} in {record['folder']}: "
                      f"{', '.join(record['files'])}", highlight=False, markup=False, soft_wrap=True)


@app.command()
@friendly
def export(
    run: Annotated[Path, typer.Argument(help="A run directory (RUNS/runs/NAME) or a recipe name.")],
    stage: Annotated[str, typer.Option(help="select: the chosen responses; build: plus target tokens and teacher top-k.")],
    to: Annotated[Path, typer.Option(help="Folder to write (new or empty); load it with datasets.load_from_disk.")],
    mode: Annotated[list[str], typer.Option(help="Only this mode (inference, training); default: every mode the run has.")] = [],
    runs_dir: RunsDir = Path("runs"),
    as_json: JsonFlag = False,
):
    """Export a run's selected responses (and, from build, the teacher distributions on the
    target's tokens) as a Hugging Face datasets dataset, for TRL, axolotl or another run."""
    from .export import export_run

    record = export_run(run, stage=stage, to=to, runs_dir=runs_dir, modes=mode)
    if as_json:
        print(json.dumps(record, indent=2, ensure_ascii=False))
    else:
        console.print(f"wrote {record['rows']} rows ({', '.join(record['modes'])}) to {record['path']}: "
                      f"datasets.load_from_disk({record['path']!r})", highlight=False, markup=False, soft_wrap=True)


@app.command(name="eval")
@friendly
def eval_(
    model: Annotated[str, typer.Argument(help="A model reference: hub id, local dir, .gguf file or builtin:NAME.")],
    tasks: Annotated[str, typer.Option(help="Comma-separated lm-eval task names (or profuser_heldout).")],
    data_dir: Annotated[Path | None, typer.Option(help="Local copies of the tasks' data in the hub's row format.")] = None,
    heldout: Annotated[Path | None, typer.Option(help="heldout.parquet for profuser_heldout.")] = None,
    limit: Annotated[int | None, typer.Option(help="At most N examples per task.")] = None,
    num_fewshot: Annotated[int | None, typer.Option(help="Shots for every task (default: the Open LLM Leaderboard's).")] = None,
    max_gen_toks: Annotated[int | None, typer.Option(help="Cap on generated tokens for generation tasks.")] = None,
    batch_size: Annotated[int, typer.Option()] = 8,
    device: Annotated[str, typer.Option()] = "auto",
    trust_remote_code: Annotated[bool, typer.Option(help="Allow the model's own code (off by default).")] = False,
    as_json: JsonFlag = False,
):
    """Evaluate any model on lm-eval tasks (offline with --data-dir)."""
    from .evaluation import evaluate_model
    from .models import load_model
    from .recipe import ModelSpec

    runtime = _runtime(Path("runs"), device)
    from .plugins import get_engine

    loaded, tokenizer = load_model(ModelSpec(ref=model, trust_remote_code=trust_remote_code),
                                   device=runtime.torch_device(), cache_dir=runtime.cache_dir, engine=get_engine())
    task_list = [t.strip() for t in tasks.split(",") if t.strip()]
    results = evaluate_model(loaded, tokenizer, task_list, limit=limit, data_dir=data_dir, heldout_path=heldout,
                             num_fewshot={t: num_fewshot for t in task_list} if num_fewshot is not None else None,
                             max_gen_toks=max_gen_toks, batch_size=batch_size, device=runtime.torch_device())
    primary = results.get("_primary", {})
    if as_json:
        console.print_json(json.dumps({"model": model, "primary": primary,
                                       "tasks": {k: v for k, v in results.items() if not k.startswith("_")}}, default=str))
        return
    table = Table(title=model)
    table.add_column("task")
    table.add_column("score")
    for task, value in primary.items():
        table.add_row(task, f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(table)


@app.command()
@friendly
def align(
    source: Annotated[str, typer.Option(help="Source model reference (its tokenizer is used).")],
    target: Annotated[str, typer.Option(help="Target model reference.")],
    data: Annotated[Path | None, typer.Option(help="Texts: the responses of a dataset file (any supported format).")] = None,
    aligner: Annotated[str, typer.Option(help="Aligner component.")] = "offsets",
    limit: Annotated[int | None, typer.Option(help="At most N texts.")] = None,
    as_json: JsonFlag = False,
):
    """Alignment quality and throughput for a tokenizer pair on real texts."""
    from .alignment import align_report
    from .plugins import get_engine
    from .recipe import ModelSpec

    registry = get_engine().registry
    if data is not None:
        if not data.exists():
            raise ProfuserError("file not found", where=str(data))
        records = registry.build("datasets", "file", {"path": str(data)}).records()
    else:  # the built-in tasks' responses, so the command works offline with no file at hand
        records = registry.build("datasets", "builtin_tasks", {"n": 200}).records()
    texts = [r.response for r in records if hasattr(r, "response")][:limit]
    cache = os.environ.get("PROFUSER_CACHE")
    result = align_report(ModelSpec(ref=source), ModelSpec(ref=target), texts, aligner, engine=get_engine(),
                          cache_dir=Path(cache) if cache else None)
    if as_json:
        console.print_json(json.dumps(result, default=str))
        return
    table = Table(title=f"{aligner}: {source} -> {target}")
    table.add_column("measure")
    table.add_column("value")
    for key, value in result.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(table)


def _collect(store, *, everything: bool, dry_run: bool, as_json: bool) -> None:
    from .store import collect_garbage

    items = collect_garbage(store, everything=everything, dry_run=dry_run)
    removed = [i for i in items if not i.kept]
    rows = [{"path": str(i.path), "what": i.what, "bytes": i.bytes, "kept": i.kept} for i in items]
    freed = sum(i.bytes for i in removed)
    if as_json:
        print(json.dumps({"dry_run": dry_run, "bytes": freed, "items": rows}, indent=2))
        return
    verb = "would remove" if dry_run else "removed"
    locks = [i for i in removed if i.what == "lock"]  # one per key ever computed: one line for all
    for item in items:
        if item.kept or item.what != "lock":
            action = f"kept ({item.kept})" if item.kept else verb
            console.print(Text(f"{action}: {item.what} {item.path} ({_human(item.bytes)})"), soft_wrap=True)
    if locks:
        console.print(Text(f"{verb}: {len(locks)} free lock/holder file(s) in {locks[0].path.parent}"), soft_wrap=True)
    console.print(f"{verb} {len(removed)} item(s), {_human(freed)}; kept {len(items) - len(removed)}")


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def main() -> None:
    app()


if __name__ == "__main__":
    main()
