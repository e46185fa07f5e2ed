"""``vllm``: generation with vLLM (continuous batching, tensor parallelism; needs a CUDA GPU).

Install with ``pip install 'profuser[vllm]'``; vLLM is imported only when this generator runs.
Prompts are formatted by profuser (the same chat templates as the ``hf`` generator) and handed
to vLLM as token ids, so BOS is never doubled. Each prompt gets its own sampling seed derived
from (``seed``, prompt id): a response does not depend on which other prompts share its batch or
shard, so a resumed stage reproduces an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

from pydantic import Field

from profuser import hookimpl
from profuser.components import Generator, Prompt
from profuser.errors import ModelError

from ._common import SamplingParams, context_limit, cut_at_stop, encode_prompt, model_label, runtime_of


def prompt_seed(seed: int, prompt_id: str) -> int:
    digest = hashlib.sha256(f"{seed}:{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


class VLLMGenerator(Generator):
    name = "vllm"
    shard_size = 1024  # vLLM schedules its own batches; large shards keep the GPU busy
    data_parallel = False  # one engine spans the GPUs (tensor parallel); other ranks of a launch wait

    class Params(SamplingParams):
        tensor_parallel_size: int = Field(default=1, gt=0)
        gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
        enforce_eager: bool = False  # skip CUDA graph capture (faster start, slower decoding)

    def __init__(self, params=None):
        super().__init__(params)
        self._loaded: tuple[str, Any, Any] | None = None  # (key, vllm.LLM, tokenizer)
        self.last_stats: dict[str, Any] = {}

    def _load(self, spec):
        try:
            import vllm
        except ImportError:
            raise ModelError("the vllm generator needs vLLM and a CUDA GPU: pip install 'profuser[vllm]' "
                             "(or use the hf generator)", where=model_label(spec)) from None
        from profuser.models import load_tokenizer, resolve_model
        from profuser.store import stable_hash

        runtime = runtime_of(self)
        key = stable_hash(spec.identity())
        if self._loaded is None or self._loaded[0] != key:
            self._loaded = None
            path = resolve_model(spec, cache_dir=runtime.cache_dir)  # a local directory (hub snapshot, GGUF, builtin)
            tokenizer = load_tokenizer(spec, cache_dir=runtime.cache_dir)
            p = self.params
            llm = vllm.LLM(
                model=str(path), tokenizer=str(path), dtype=spec.dtype,
                trust_remote_code=spec.trust_remote_code, tensor_parallel_size=p.tensor_parallel_size,
                gpu_memory_utilization=p.gpu_memory_utilization, max_model_len=spec.max_length,
                enforce_eager=p.enforce_eager,
            )
            self._loaded = (key, llm, tokenizer)
        return self._loaded[1], self._loaded[2]

    def generate(self, model: Any, prompts: list[Prompt], *, seed: int) -> list[str]:
        from profuser.chat import format_prompt
        from profuser.models import as_spec

        spec = as_spec(model)
        if not prompts:
            return []
        llm, tokenizer = self._load(spec)  # a clear error first when vLLM is missing
        import vllm
        p = self.params
        encoded = [encode_prompt(tokenizer, format_prompt(tokenizer, q.system, q.instruction, chat_template=spec.chat_template))
                   for q in prompts]
        limit = context_limit(tokenizer) or spec.max_length
        room = limit - p.max_new_tokens if limit else 1 << 62
        if room <= 0:
            raise ModelError(f"max_new_tokens {p.max_new_tokens} leaves no room for a prompt in {limit} positions",
                             where=model_label(spec))
        truncated = sum(len(ids) > room for ids in encoded)
        encoded = [ids[-room:] if len(ids) > room else ids for ids in encoded]  # keep the assistant turn opener
        sampling = ({"temperature": 0.0} if p.greedy else
                    {"temperature": p.temperature, "top_p": p.top_p, "top_k": p.top_k or -1})
        params = [vllm.SamplingParams(n=1, max_tokens=p.max_new_tokens, min_tokens=p.min_new_tokens,
                                      repetition_penalty=p.repetition_penalty,
                                      stop=p.stop or None, seed=prompt_seed(seed, q.id), **sampling)
                  for q in prompts]
        started = time.perf_counter()
        outputs = llm.generate([{"prompt_token_ids": ids} for ids in encoded], params,
                               use_tqdm=runtime_of(self).progress)
        results = [cut_at_stop(out.outputs[0].text, p.stop) for out in outputs]  # vLLM keeps input order
        self.last_stats = {"prompts": len(prompts), "new_tokens": sum(len(o.outputs[0].token_ids) for o in outputs),
                           "seconds": time.perf_counter() - started, "truncated_prompts": truncated}
        return results


@hookimpl
def profuser_register_generators(register):
    register(VLLMGenerator)
