"""Model references to loaded models and tokenizers.

A reference (``ModelSpec.ref``) is one of:

- ``builtin:NAME``: a model a plugin registers (``profuser_register_models``); its ``resolve``
  returns a local directory, building and caching it the first time;
- a ``.gguf`` file, or a directory/hub id with ``gguf_file``: dequantised once into the cache;
- a local directory written by ``save_pretrained``, or a LoRA adapter directory that training
  wrote (``train.peft``; ``adapter_config.json`` + ``base_model.json``, no weights): ``load_model``
  loads its base model and merges the adapter into it, so a caller always gets a plain model;
- ``recipe:<path>``: the model another recipe makes; only a recipe's stages read it (the planner
  plans that recipe upstream and the runner hands each stage the model's folder in the store);
- anything else is a Hugging Face hub id (``revision`` applies; remote code only with
  ``trust_remote_code: true``).

Weights are read from safetensors; a checkpoint that ships only pickled ``pytorch_model*.bin``
files is read with ``torch.load(weights_only=True)``: tensors only, no object is unpickled.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..errors import ModelError, ProfuserError
from ..model_files import ADAPTER_CONFIG, BASE_MODEL_FILE, is_adapter_dir  # noqa: F401  (re-exported)
from ..model_files import incomplete as _incomplete
from ..model_files import local_model_problem as _local_model_problem
from ..model_files import looks_local as _looks_local
from ..prompt_limits import max_positions
from ..recipe import ModelSpec
from .gguf import gguf_dir

log = logging.getLogger(__name__)

SpecLike = ModelSpec | dict[str, Any] | str


def as_spec(spec: SpecLike) -> ModelSpec:
    """A ``ModelSpec`` from a spec, its ``identity()`` dict (what stage configs carry) or a bare ref."""
    if isinstance(spec, ModelSpec):
        return spec
    if isinstance(spec, str):
        return ModelSpec(ref=spec)
    try:
        return ModelSpec.model_validate(spec)
    except Exception as exc:  # noqa: BLE001 - pydantic's ValidationError, shown as one line
        where = spec.get("ref") if isinstance(spec, dict) else None
        raise ModelError(f"invalid model spec: {exc}", where=where) from None


def resolve_model(spec: SpecLike, *, cache_dir: Path | None = None, engine: Any = None) -> Path:
    """A local ``save_pretrained`` directory for the spec (built and cached for GGUF and builtins;
    downloaded to the hub cache for hub ids). A ``builtin:`` ref is looked up in ``engine``'s
    registry (``profuser.plugins.Engine``: the plugins that register models); without one it is
    refused in one line naming the ref."""
    spec = as_spec(spec)
    ref = spec.ref
    if ref.startswith("recipe:"):  # the planner hands stages the model's folder in the store instead
        raise ModelError("names another recipe's model: only a recipe run (profuser run / compare) makes and "
                         "loads it; give its model/ folder instead (profuser runs shows where)", where=ref)
    if ref.startswith("builtin:"):
        return _resolve_builtin(ref, cache_dir, engine)
    path = Path(ref).expanduser()
    if spec.gguf_file:
        if path.is_dir():
            return gguf_dir(path / spec.gguf_file, cache_dir, ref=ref)
        if _looks_local(ref):
            raise ModelError(f"directory not found: {path}", where=ref)
        return gguf_dir(_hub_file(ref, spec.gguf_file, spec.revision), cache_dir, ref=ref)
    if ref.endswith(".gguf"):
        return gguf_dir(path, cache_dir, ref=ref)
    if path.is_dir() or path.is_file() or _looks_local(ref):
        if is_adapter_dir(path):  # its tokenizer is here; load_model merges it into its base
            return path
        problem = local_model_problem(spec, need=("config",))  # weights and tokenizer: checked by their loaders
        if problem:
            raise ModelError(problem, where=ref)
        return path
    return _hub_snapshot(spec)


def adapter_base(path: Path) -> ModelSpec:
    """The base model of an adapter directory."""
    import json

    try:
        return ModelSpec.model_validate(json.loads((path / BASE_MODEL_FILE).read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise ModelError(f"a LoRA adapter without {BASE_MODEL_FILE}: its base model is unknown", where=str(path)) from None
    except Exception as exc:  # noqa: BLE001 - damaged JSON or an invalid spec
        raise ModelError(f"unreadable {BASE_MODEL_FILE}: {exc}", where=str(path)) from None


def local_model_problem(spec: SpecLike, need: tuple[str, ...] = ("config", "weights", "tokenizer")) -> str | None:
    """``profuser.model_files.local_model_problem`` of a spec, its identity dict or a bare ref."""
    return _local_model_problem(as_spec(spec), need)


def _resolve_builtin(ref: str, cache_dir: Path | None, engine: Any) -> Path:
    from .cache import default_cache_dir

    if engine is None:
        raise ModelError("a builtin: model is resolved by the plugins that register it: pass the plugin engine "
                         "(engine=profuser.plugins.Engine())", where=ref)
    name = ref.removeprefix("builtin:")
    try:
        info = engine.registry.get("models", name)
    except ProfuserError as exc:  # unknown name: the registry's message has the "did you mean"
        raise ModelError(exc.message, where=ref) from None
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    try:
        path = Path(info.cls().resolve(root))
    except ProfuserError:
        raise
    except Exception as exc:  # noqa: BLE001 - a plugin's failure, attributed to the ref and plugin
        raise ModelError(f"plugin {info.plugin} failed to resolve it: {type(exc).__name__}: {exc}", where=ref) from None
    if not (path / "config.json").is_file():
        raise ModelError(f"plugin {info.plugin} resolved it to {path}, which has no config.json", where=ref)
    return path


def _hub_file(repo: str, filename: str, revision: str | None) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, filename, revision=revision))
    except Exception as exc:  # noqa: BLE001 - offline, missing repo or file: all name the ref
        raise ModelError(f"cannot fetch {filename} from the hub: {type(exc).__name__}: {exc}", where=repo) from None


def _hub_snapshot(spec: ModelSpec) -> Path:
    from huggingface_hub import snapshot_download

    # safetensors only (never pickled .bin weights); python files only when remote code is trusted
    patterns = ["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt", "*.tiktoken"]
    if spec.trust_remote_code:
        patterns.append("*.py")
    try:
        path = Path(snapshot_download(spec.ref, revision=spec.revision, allow_patterns=patterns))
        if not any(path.glob("*.safetensors")):  # only pickled weights: read as tensors only (load_model)
            path = Path(snapshot_download(spec.ref, revision=spec.revision, allow_patterns=patterns + PICKLED_WEIGHTS))
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"cannot fetch from the hub: {type(exc).__name__}: {exc}", where=spec.ref) from None
    if not any(path.glob("*.safetensors")) and not pickled_weights(path):
        raise ModelError("the hub repository has neither safetensors nor pytorch_model.bin weights", where=spec.ref)
    return path


PICKLED_WEIGHTS = ["pytorch_model.bin", "pytorch_model-*.bin", "pytorch_model.bin.index.json"]


def pickled_weights(path: Path) -> bool:
    """The directory's weights are pickled ``pytorch_model*.bin`` files only (no safetensors)."""
    return not any(path.glob("*.safetensors")) and any(path.glob("pytorch_model*.bin"))


def _zero3_partitioned() -> bool:
    """from_pretrained builds the model partitioned by DeepSpeed's zero.Init (a ZeRO-3 training)."""
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    except ImportError:  # transformers without the DeepSpeed integration
        return False
    return is_deepspeed_zero3_enabled()


# --- loading ------------------------------------------------------------------------------------


def _read_chat_template(value: str, ref: str) -> str:
    """A recipe's ``chat_template``: a named format (``profuser.chat.CHAT_FORMATS``), jinja text, or
    a path to a file holding it."""
    from ..chat import CHAT_FORMATS

    if value in CHAT_FORMATS:
        return CHAT_FORMATS[value].template
    if "{{" in value or "{%" in value:
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise ModelError(f"chat_template file not found: {value}", where=ref)
    return path.read_text(encoding="utf-8")


def load_tokenizer(spec: SpecLike, *, cache_dir: Path | None = None, engine: Any = None, _path: Path | None = None):
    """The model's fast tokenizer, with the spec's ``chat_template`` override applied and its
    ``max_length`` as ``model_max_length`` (else the model's context length where the tokenizer
    knows none or states more). A missing pad token becomes the EOS token (batching needs one). ``engine``
    resolves ``builtin:`` refs (``resolve_model``)."""
    from transformers import AutoTokenizer

    spec = as_spec(spec)
    path = _path or resolve_model(spec, cache_dir=cache_dir, engine=engine)
    problem = _incomplete(path, ("tokenizer",))  # else transformers may make one up from the config
    if problem:
        raise ModelError(problem, where=spec.ref)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=spec.trust_remote_code)
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"cannot load the tokenizer from {path}: {type(exc).__name__}: {exc}", where=spec.ref) from None
    if not getattr(tokenizer, "is_fast", False):
        raise ModelError("needs a fast tokenizer (tokenizer.json): character offsets align vocabularies", where=spec.ref)
    if spec.chat_template:
        tokenizer.chat_template = _read_chat_template(spec.chat_template, spec.ref)
    if spec.max_length:
        tokenizer.model_max_length = spec.max_length
    elif (context := max_positions(path)) and context < tokenizer.model_max_length:  # unset (1e30) or overstated
        tokenizer.model_max_length = context  # past it, positions the model never learned (an adapter: no config)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16", "auto": "auto"}


def check_attention(spec: ModelSpec, *, cpu: bool) -> None:
    """One line instead of transformers' failure deep in the first forward: flash attention needs CUDA."""
    if spec.attn_implementation == "flash_attention_2" and cpu:
        raise ModelError("attn_implementation flash_attention_2 needs a CUDA GPU and this run is on the CPU; "
                         "use sdpa or eager", where=spec.ref)


def load_model(spec: SpecLike, *, device: str = "cpu", cache_dir: Path | None = None, engine: Any = None):
    """``(model, tokenizer)``: the causal LM in the spec's dtype on ``device`` (``"auto"``: CUDA
    when available), in eval mode, and ``load_tokenizer``'s tokenizer. A LoRA adapter directory
    loads its base model with the adapter merged in (the spec's dtype and attention apply).
    ``engine`` resolves ``builtin:`` refs, the adapter's base's too (``resolve_model``)."""
    import torch
    from transformers import AutoModelForCausalLM

    spec = as_spec(spec)
    path = resolve_model(spec, cache_dir=cache_dir, engine=engine)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    # the model may be placed on a GPU later (the trainer loads on the CPU): refuse only without one
    check_attention(spec, cpu=not torch.cuda.is_available())
    if is_adapter_dir(path):
        return _load_adapter(spec, path, device=device, cache_dir=cache_dir, engine=engine)
    problem = _incomplete(path, ("weights", "tokenizer"))
    if problem:
        raise ModelError(problem, where=spec.ref)
    tokenizer = load_tokenizer(spec, _path=path)
    dtype = _DTYPES[spec.dtype]
    extra = {"attn_implementation": spec.attn_implementation} if spec.attn_implementation else {}
    pickled = pickled_weights(path)
    if pickled:
        log.warning("%s ships pickled .bin weights: read with torch.load(weights_only=True), tensors only", spec.ref)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype if dtype == "auto" else getattr(torch, dtype),
            trust_remote_code=spec.trust_remote_code, use_safetensors=not pickled, weights_only=True, **extra,
        )
        if not _zero3_partitioned():  # zero.Init placed the partitions; .to() would strand gathered weights on the CPU
            model.to(device)
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"cannot load the model from {path}: {type(exc).__name__}: {exc}", where=spec.ref) from None
    model.eval()
    if model.config.get_text_config().vocab_size < len(tokenizer):
        raise ModelError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary only "
            f"{model.config.get_text_config().vocab_size}", where=spec.ref,
        )
    return model, tokenizer


def _load_adapter(spec: ModelSpec, path: Path, *, device: str, cache_dir: Path | None, engine: Any):
    """The adapter's base model (its own ref; this spec's dtype and attention) with the adapter
    merged in, and the adapter directory's tokenizer (the chat template training used)."""
    overrides = {"dtype": spec.dtype}
    if spec.attn_implementation:
        overrides["attn_implementation"] = spec.attn_implementation
    base = adapter_base(path).model_copy(update=overrides)
    return (merge_adapter(base, path, device=device, cache_dir=cache_dir, where=spec.ref, engine=engine),
            load_tokenizer(spec, _path=path))


def merge_adapter(base: ModelSpec, adapter: Path, *, device: str = "cpu", cache_dir: Path | None = None,
                  where: str | None = None, engine: Any = None):
    """``base`` loaded with the LoRA adapter in ``adapter`` merged into its weights: a plain model."""
    from ..errors import import_extra

    PeftModel = import_extra("peft", "peft", what="a LoRA adapter", where=where or str(adapter)).PeftModel
    model, _ = load_model(base, device=device, cache_dir=cache_dir, engine=engine)
    try:
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    except Exception as exc:  # noqa: BLE001 - a damaged or mismatched adapter
        raise ModelError(f"cannot apply the LoRA adapter to {base.ref}: {type(exc).__name__}: {exc}",
                         where=where or str(adapter)) from None
    return model.eval()
