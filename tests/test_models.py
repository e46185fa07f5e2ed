"""Model references, loading, the GGUF cache (tiny models), and the packaged models (slow)."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest
import torch

from profuser import hookimpl, models
from profuser.chat import FALLBACK_CHAT_TEMPLATE, encode_chat, template_for
from profuser.components import BuiltinModel
from profuser.errors import ModelError
from profuser.models import cached_build, load_model, load_tokenizer, resolve_model
from profuser.plugins import Engine
from profuser.recipe import ModelSpec
from profuser.testing import CHATML_TEMPLATE, tiny_gguf_file


def logits_of(model, tokenizer, text="Hello world, how are you?"):
    ids = torch.tensor([tokenizer(text)["input_ids"]])  # [1, T]
    with torch.no_grad():
        return model(ids).logits  # [1, T, V]


# --- local directories --------------------------------------------------------------------------


@pytest.mark.parametrize("fixture, cls, vocab", [("tiny_llama_dir", "LlamaForCausalLM", 500),
                                                 ("tiny_gemma_dir", "Gemma3ForCausalLM", 700)])
def test_tiny_models_load_and_produce_logits(request, fixture, cls, vocab):
    path = request.getfixturevalue(fixture)
    model, tokenizer = load_model(str(path))
    assert type(model).__name__ == cls and not model.training
    assert tokenizer.is_fast and len(tokenizer) == vocab
    logits = logits_of(model, tokenizer)
    assert logits.shape[-1] == vocab and logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_spec_dict_dtype_and_max_length(tiny_llama_dir):
    spec = ModelSpec(ref=str(tiny_llama_dir), dtype="bfloat16", max_length=64, label="ignored")
    model, tokenizer = load_model(spec.identity())  # what stage configs carry
    assert model.dtype == torch.bfloat16
    assert tokenizer.model_max_length == 64


def test_a_tokenizer_that_overstates_the_context_is_capped_at_the_models_positions(tiny_llama_dir, tmp_path):
    import shutil

    folder = shutil.copytree(tiny_llama_dir, tmp_path / "overstated")
    config = folder / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "model_max_length": 4096}))
    assert load_tokenizer(str(folder)).model_max_length == 512  # max_position_embeddings: truncation stops there
    assert load_tokenizer({"ref": str(folder), "max_length": 128}).model_max_length == 128  # the recipe's wins


def test_families_differ_in_template_and_bos(tiny_llama_dir, tiny_gemma_dir):
    llama = load_tokenizer(str(tiny_llama_dir))
    gemma = load_tokenizer(str(tiny_gemma_dir))
    assert llama.chat_template == CHATML_TEMPLATE
    assert gemma.chat_template is None and template_for(gemma) == FALLBACK_CHAT_TEMPLATE
    assert gemma("hi")["input_ids"][0] == gemma.bos_token_id
    assert llama("hi")["input_ids"][0] != llama.bos_token_id


def test_chat_template_override_text_and_file(tiny_gemma_dir, tmp_path):
    tokenizer = load_tokenizer({"ref": str(tiny_gemma_dir), "chat_template": CHATML_TEMPLATE})
    assert tokenizer.chat_template == CHATML_TEMPLATE
    enc = encode_chat(tokenizer, "", "Hi", "Hello!", max_length=128)
    assert tokenizer.decode(enc.input_ids[enc.response_start:]) == "Hello!<|im_end|>\n"

    file = tmp_path / "template.jinja"
    file.write_text(FALLBACK_CHAT_TEMPLATE)
    assert load_tokenizer({"ref": str(tiny_gemma_dir), "chat_template": str(file)}).chat_template == FALLBACK_CHAT_TEMPLATE
    with pytest.raises(ModelError, match="chat_template file not found") as err:
        load_tokenizer({"ref": str(tiny_gemma_dir), "chat_template": str(tmp_path / "missing.jinja")})
    assert err.value.where == str(tiny_gemma_dir)


# --- bad references -----------------------------------------------------------------------------


@pytest.mark.parametrize("ref, message", [
    ("/nonexistent/model", "model directory not found"),
    ("./relative/model", "model directory not found"),
    ("/nonexistent/model.gguf", "GGUF file not found"),
    ("builtin:smollm3", "unknown models component 'smollm3'; did you mean"),
])
def test_bad_refs_are_model_errors_naming_the_ref(ref, message):
    with pytest.raises(ModelError, match=message) as err:
        load_model(ref, engine=Engine())
    assert err.value.where == ref
    assert err.value.lines()[0].startswith(f"{ref}: ")


def test_directory_without_config_is_a_model_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ModelError, match="not a complete model directory: no config.json"):
        resolve_model(str(tmp_path))


def test_a_model_directory_without_a_tokenizer_is_refused_naming_it(tiny_llama_dir, tmp_path):
    bare = tmp_path / "no-tokenizer"
    bare.mkdir()
    for f in tiny_llama_dir.iterdir():
        if not f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            (bare / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ModelError) as err:
        load_model(str(bare))  # transformers would otherwise make up a tokenizer
    expected = f"{bare}: {bare} is not a complete model directory: no tokenizer (tokenizer.json, or tokenizer.model / vocab.json)"
    assert err.value.lines() == [expected]


def test_a_model_ref_that_is_a_file_says_so(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"x")
    with pytest.raises(ModelError, match="is a file, not a model directory"):
        resolve_model(str(weights))


def test_broken_weights_are_a_model_error(tiny_llama_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_llama_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ModelError, match="cannot load the model") as err:
        load_model(str(broken))
    assert err.value.where == str(broken)


class _Payload:  # a pickled object that is not a tensor: what a hostile .bin would carry
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _bin_copy(src: Path, dst: Path, state: dict) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    torch.save(state, dst / "pytorch_model.bin")
    return dst


def test_pickled_bin_weights_load_as_tensors_only(tiny_llama_dir, tmp_path, caplog):
    """Checkpoints that ship only pytorch_model.bin (several of the paper's) were refused; they load
    through torch.load(weights_only=True), and a .bin holding anything but tensors is refused."""
    model, tok = load_model(str(tiny_llama_dir))
    plain = _bin_copy(tiny_llama_dir, tmp_path / "bin", {k: v.clone() for k, v in model.state_dict().items()})
    assert models.loading.local_model_problem(str(plain)) is None
    with caplog.at_level("WARNING", logger="profuser.models.loading"):
        again, _ = load_model(str(plain))
    assert "torch.load(weights_only=True)" in caplog.text
    assert torch.equal(logits_of(again, tok), logits_of(model, tok))
    payload = {**model.state_dict(), "extra": _Payload(tmp_path / "ran")}
    hostile = _bin_copy(tiny_llama_dir, tmp_path / "hostile", payload)
    with pytest.raises(ModelError, match="cannot load the model") as err:
        load_model(str(hostile))
    assert err.value.where == str(hostile) and len(err.value.lines()) == 1
    assert not (tmp_path / "ran").exists()  # nothing was unpickled


def test_a_zero3_partitioned_model_is_not_moved(tiny_llama_dir, monkeypatch):
    """Under ZeRO-3 from_pretrained builds the model partitioned (zero.Init); a .to(device) after it
    left the gathered weights on the CPU while the inputs were on the GPU."""
    import transformers.integrations.deepspeed as hf_ds

    moved = []
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: moved.append(a) or self)
    monkeypatch.setattr(hf_ds, "is_deepspeed_zero3_enabled", lambda: True)  # profuser's view; from_pretrained keeps its own
    model, _ = load_model(str(tiny_llama_dir), device="cuda")
    assert moved == [] and model.device.type == "cpu"
    monkeypatch.setattr(hf_ds, "is_deepspeed_zero3_enabled", lambda: False)
    load_model(str(tiny_llama_dir), device="cuda")
    assert ("cuda",) in moved  # not partitioned: placed as asked


def test_gguf_dir_without_the_file_is_a_model_error(tmp_path):
    with pytest.raises(ModelError, match="GGUF file not found"):
        resolve_model({"ref": str(tmp_path), "gguf_file": "model.gguf"})
    (tmp_path / "model.gguf").write_text("version https://git-lfs.github.com/spec/v1\n")
    with pytest.raises(ModelError, match="is a Git LFS pointer, not the model file") as err:
        resolve_model({"ref": str(tmp_path), "gguf_file": "model.gguf"})
    assert err.value.where == str(tmp_path)


def test_invalid_spec_dict():
    with pytest.raises(ModelError, match="invalid model spec"):
        load_model({"ref": "x", "dtype": "int3"})


# --- GGUF and the cache -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return tiny_gguf_file(tmp_path_factory.mktemp("gguf"))


def test_gguf_is_dequantised_once_and_matches_the_original(tiny_gguf, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    model, tokenizer = load_model(str(tiny_gguf), cache_dir=cache)
    original, original_tok = load_model(str(tiny_gguf.parent / "src" / "tiny-llama"))
    text = "<|im_start|>user\nHello world! 🙂<|im_end|>"
    assert tokenizer(text)["input_ids"] == original_tok(text)["input_ids"]
    assert tokenizer.chat_template == CHATML_TEMPLATE  # read from the GGUF metadata
    torch.testing.assert_close(logits_of(model, tokenizer, text), logits_of(original, original_tok, text), rtol=0, atol=0)

    entries = list((cache / "gguf").iterdir())
    assert [e.name for e in entries if not e.name.startswith(".")] == [resolve_model(str(tiny_gguf), cache_dir=cache).name]
    assert not list((cache / "gguf").glob("*.partial"))
    assert (resolve_model(str(tiny_gguf), cache_dir=cache) / "model.safetensors").is_file()

    # second load: straight from the cache, no dequantising
    def fail(*args, **kwargs):
        raise AssertionError("dequantised again")

    monkeypatch.setattr(models.gguf, "dequantise_gguf", fail)
    load_model({"ref": str(tiny_gguf.parent), "gguf_file": tiny_gguf.name}, cache_dir=cache)
    # the cache directory comes from PROFUSER_CACHE when none is passed
    monkeypatch.setenv(models.CACHE_ENV, str(cache))
    assert resolve_model(str(tiny_gguf)).parent == cache / "gguf"


def test_changed_gguf_file_is_rebuilt(tiny_gguf, tmp_path):
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(tiny_gguf.read_bytes())
    first = resolve_model(str(copy), cache_dir=tmp_path / "cache")
    os.utime(copy, ns=(time.time_ns(), time.time_ns() + 10**9))
    second = resolve_model(str(copy), cache_dir=tmp_path / "cache")
    assert first != second and second.is_dir()


def test_corrupt_gguf_is_a_model_error_and_leaves_no_entry(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(ModelError, match="cannot read GGUF file") as err:
        resolve_model(str(bad), cache_dir=tmp_path / "cache")
    assert err.value.where == str(bad)
    assert [p.name for p in (tmp_path / "cache" / "gguf").iterdir() if not p.name.endswith(".lock")] == []


def _build_slowly(out: Path) -> None:
    with open(out.parent.parent / "builds.log", "a") as log:
        log.write(f"{os.getpid()}\n")
    time.sleep(0.5)
    (out / "config.json").write_text("{}")


def _racer(cache: str, queue) -> None:
    queue.put(str(cached_build(Path(cache), "test", "m", "k", _build_slowly, ref="race")))


def test_two_processes_build_an_entry_once(tmp_path):
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_racer, args=(str(tmp_path), queue)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    results = {queue.get(timeout=5) for _ in procs}
    assert results == {str(tmp_path / "test" / "m-k")}
    assert len((tmp_path / "builds.log").read_text().split()) == 1
    assert (tmp_path / "test" / "m-k" / "config.json").is_file()


def test_failed_or_killed_build_leaves_nothing_behind(tmp_path):
    stale = tmp_path / "test" / ".m-k.123-abc.partial"
    stale.mkdir(parents=True)

    def boom(out: Path) -> None:
        (out / "half").write_text("x")
        raise ModelError("no", where="ref")

    with pytest.raises(ModelError):
        cached_build(tmp_path, "test", "m", "k", boom, ref="ref")
    assert not stale.exists()
    assert [p.name for p in (tmp_path / "test").iterdir()] == [".m-k.lock"]


# --- builtin models -----------------------------------------------------------------------------


def test_builtin_models_are_registered():
    from profuser.plugins import get_engine

    registry = get_engine().registry
    assert {"smollm2-135m-instruct", "gemma3-270m"} <= set(registry.names("models"))
    assert registry.get("models", "smollm2").name == "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def shared_cache():
    """The packaged models are dequantised once per machine: the user's cache, unless set."""
    return models.default_cache_dir()


@pytest.mark.slow
@pytest.mark.parametrize("ref, vocab, has_template", [("builtin:smollm2-135m-instruct", 49152, True),
                                                      ("builtin:gemma3-270m", 262144, False)])
def test_packaged_models_load_from_cache_and_produce_logits(shared_cache, ref, vocab, has_template):
    engine = Engine()
    resolve_model(ref, cache_dir=shared_cache, engine=engine)  # builds the entry if this machine has none yet
    start = time.perf_counter()
    model, tokenizer = load_model(ref, cache_dir=shared_cache, engine=engine)
    assert time.perf_counter() - start < 30  # from the cache: seconds, not a dequantisation
    assert (tokenizer.chat_template is not None) == has_template
    enc = encode_chat(tokenizer, "", "What is the capital of France?", "Paris is the capital.", max_length=256)
    with torch.no_grad():
        logits = model(torch.tensor([enc.input_ids])).logits  # [1, T, V]
    assert logits.shape == (1, len(enc.input_ids), vocab)
    # a real model, not noise: "Paris" is likely after the question
    position = enc.response_start - 1
    first = enc.input_ids[enc.response_start]
    assert tokenizer.decode([first]).strip() == "Paris"
    assert logits[0, position].argsort(descending=True).tolist().index(first) < 100


class _TinyPlugin:
    """A third-party-style plugin registering builtin models backed by the tiny llama."""

    source: Path

    class Tiny(BuiltinModel):
        name = "tiny"

        def resolve(self, cache_dir: Path) -> Path:
            def build(out: Path) -> None:
                for f in _TinyPlugin.source.iterdir():
                    (out / f.name).write_bytes(f.read_bytes())

            return cached_build(cache_dir, "builtin", self.name, "k", build, ref="builtin:tiny")

    class Broken(BuiltinModel):
        name = "broken"

        def resolve(self, cache_dir: Path) -> Path:
            raise RuntimeError("disk on fire")

    @staticmethod
    @hookimpl
    def profuser_register_models(register):
        register(_TinyPlugin.Tiny)
        register(_TinyPlugin.Broken)


@pytest.fixture
def tiny_plugin_engine(tiny_llama_dir):
    _TinyPlugin.source = tiny_llama_dir
    return Engine(entrypoints=False, extra_plugins=[("tiny-plugin", _TinyPlugin)])


def test_builtin_ref_resolves_through_the_plugin_into_the_cache(tiny_plugin_engine, tmp_path):
    engine = tiny_plugin_engine
    model, tokenizer = load_model("builtin:tiny", cache_dir=tmp_path, engine=engine)
    assert resolve_model("builtin:tiny", cache_dir=tmp_path, engine=engine) == tmp_path / "builtin" / "tiny-k"
    assert logits_of(model, tokenizer).shape[-1] == 500
    with pytest.raises(ModelError, match="plugin tiny-plugin failed to resolve it: RuntimeError: disk on fire") as err:
        load_model("builtin:broken", cache_dir=tmp_path, engine=engine)
    assert err.value.where == "builtin:broken"


@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
def test_attn_implementation_reaches_from_pretrained_and_keeps_the_logits(tiny_llama_dir, kernel):
    model, _ = load_model({"ref": str(tiny_llama_dir), "attn_implementation": kernel})
    assert model.config._attn_implementation == kernel
    default, _ = load_model(str(tiny_llama_dir))
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, default(ids).logits, atol=1e-5)  # [1, 5, V]


def test_flash_attention_on_the_cpu_is_one_line(tiny_llama_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelError, match="flash_attention_2 needs a CUDA GPU") as info:
        load_model({"ref": str(tiny_llama_dir), "attn_implementation": "flash_attention_2"})
    assert info.value.where == str(tiny_llama_dir)
    with pytest.raises(Exception, match="attn_implementation"):
        ModelSpec(ref="x", attn_implementation="flash")  # not one of eager, sdpa, flash_attention_2
