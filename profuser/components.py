"""Base classes of the component kinds plugins register, and the plain data they exchange.

A component is a class with a ``name``, optional ``aliases`` and a pydantic ``Params`` model
(extra fields forbidden) that validates the recipe's ``params:`` block at load time, before any
model loads. Instances are built by the pipeline as ``cls(params)``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:  # heavy imports only for type checkers
    import numpy as np
    import torch

Mode = Literal["inference", "training"]
MODES: tuple[Mode, ...] = ("inference", "training")
Draws = Literal["instructions", "examples"]


class StrictModel(BaseModel):
    """Base of every params/recipe model: unknown fields are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid")


class Component(ABC):
    kind: ClassVar[str] = ""
    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()

    class Params(StrictModel):
        pass

    # set by the stage that builds it (profuser.pipeline.Runtime: device, cache dir, progress);
    # read it with profuser.pipeline.runtime_of(self), which gives the defaults when it is unset
    runtime: Any = None

    def __init__(self, params: BaseModel | dict[str, Any] | None = None):
        if not isinstance(params, self.Params):
            params = self.Params(**(params or {}))
        self.params = params

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params!r})"


# --- data ---------------------------------------------------------------------------------------


@dataclass
class Record:
    """One normalised instruction example. ``response`` is the ground truth (e.g. GPT-4's answer)."""

    id: str
    system: str
    instruction: str
    response: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class BadRow:
    """A row a dataset source could not use: ``where`` is ``file:line`` (or similar)."""

    where: str
    message: str


class DatasetSource(Component):
    """Yields normalised records (or ``BadRow`` for rows it cannot use; the recipe's
    ``data.on_bad_row`` decides whether those fail the run or are skipped and counted).
    ``path_params``: the params that name local files or folders (a string, or a list of them):
    the recipe resolves each relative one against the folder of the recipe file that wrote it
    (through ``extends:``), and ``profuser validate`` says when one does not exist, as for the
    built-in ``file`` source's ``path``; ``records`` then gets absolute paths. A value with
    ``://`` or starting ``hf:`` / ``hub:`` is left as it is."""

    kind = "datasets"
    path_params: ClassVar[tuple[str, ...]] = ("path",)

    @abstractmethod
    def records(self) -> Iterable[Record | BadRow]:
        """See the class docstring."""

    def fingerprint(self) -> dict[str, str]:
        """What ``records`` reads that the params do not pin, as ``{name: content hash}`` (a local
        file's SHA-256): the data stage's cache key holds it, so editing such data in place reruns
        the stage. ``{}`` (the default) when the params say it all."""
        return {}


# --- models -------------------------------------------------------------------------------------


class BuiltinModel(Component):
    """A model shipped without a hub (``builtin:NAME`` in recipes). ``resolve`` returns a local
    directory that ``transformers`` loads with ``from_pretrained`` (config, safetensors, tokenizer),
    building and caching it under ``cache_dir`` the first time."""

    kind = "models"

    @abstractmethod
    def resolve(self, cache_dir: Path) -> Path:
        """See the class docstring."""


# --- inference mode -----------------------------------------------------------------------------


@dataclass
class Prompt:
    id: str
    system: str
    instruction: str
    # the conversation's earlier turns ([{role, content}], profuser.chat.conversation_history): a
    # generator continues the conversation at its last user turn (format_prompt's history=)
    history: list[dict] = field(default_factory=list)


class Generator(Component):
    """Generation backend. Loads the model named by ``model`` (a ``profuser.models.ModelSpec``),
    formats each prompt with that model's chat template, returns one response per prompt (same
    order). Sampling settings are the generator's params; ``seed`` makes runs repeatable.
    A generator whose params have an int ``n`` above 1 returns n samples per prompt instead (a
    list of n strings for each prompt; sample 0 should be what ``n: 1`` gives).
    ``data_parallel``: under a multi-process launch each rank may run its own copy on its own
    device (False for backends that spread one model over the devices themselves, like vLLM)."""

    kind = "generators"
    data_parallel: ClassVar[bool] = True

    @abstractmethod
    def generate(self, model: Any, prompts: list[Prompt], *, seed: int) -> list[str]:
        """See the class docstring."""


@dataclass
class Judged:
    system: str
    instruction: str
    response: str
    id: str = ""  # the example id, for error messages


class RewardModel(Component):
    """One real-valued score per (system, instruction, response); higher is better. Scales of
    different reward models are not comparable (that is why ``rm_vote`` votes). ``data_parallel``
    as for generators."""

    kind = "reward_models"
    data_parallel: ClassVar[bool] = True

    @abstractmethod
    def score(self, items: list[Judged]) -> list[float]:
        """See the class docstring."""


# --- advantage evaluation -----------------------------------------------------------------------


@dataclass
class SourceNLL:
    """A source's teacher-forced negative log-likelihood of a response (natural log). ``n_bytes``:
    UTF-8 bytes of the response its tokens cover (less than the whole when truncated). Where a
    source was truncated, the select stage also fills, per response token, ``token_nll`` and
    ``token_ends`` (end character in the response), so Min-CE can compare on a common prefix."""

    nll_sum: float
    n_tokens: int
    n_bytes: int
    token_nll: list[float] | None = None
    token_ends: list[int] | None = None


@dataclass
class Candidates:
    """Everything an evaluator may use to pick the advantaged source of one example.

    training mode: ``nll`` per source (teacher forcing on the GT ``reference``);
    inference mode: ``responses`` per source and ``scores[reward_model][source]`` (a generator
    with ``n`` > 1: those of sample 0, and every sample in ``samples`` / ``sample_scores``);
    reward models keyed by label (else name) in the recipe's ``inference_mode.reward_models``
    order, which implies no strength: an evaluator names the one it trusts in its params.
    ``meta``: the example's dataset metadata (``Record.meta``), always filled.
    """

    id: str
    reference: str
    system: str = ""
    instruction: str = ""
    responses: dict[str, str] = field(default_factory=dict)
    nll: dict[str, SourceNLL] = field(default_factory=dict)
    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    samples: dict[str, list[str]] = field(default_factory=dict)
    sample_scores: dict[str, dict[str, list[float]]] = field(default_factory=dict)


@dataclass
class Choice:
    """The evaluator's verdict for one example: the chosen source, each source's score under the
    evaluator's own scale, and anything worth keeping for analysis (votes, tie-breaks).
    ``sample``: which of the chosen source's samples wins (0 unless the generator has n > 1)."""

    chosen: str
    scores: dict[str, float]
    detail: dict[str, Any] = field(default_factory=dict)
    sample: int = 0


# What the select stage fills in ``Candidates`` for each ``needs`` value, per mode: these are the
# only valid values (registration rejects others, so a typo cannot silently mean nothing).
NEEDS: dict[Mode, dict[str, str]] = {
    "training": {
        "nll": "fills ``Candidates.nll``: each source's teacher-forced NLL of the reference (the logits stage)",
    },
    "inference": {
        "responses": "fills ``Candidates.responses``: each source's generated response (the generate stage)",
        "scores": "fills ``Candidates.scores`` and ``Candidates.responses``: every reward model's score of "
                  "each response (one score stage per reward model; the recipe must list at least one)",
    },
}


class AdvantageEvaluator(Component):
    """Picks the advantaged source per example. ``mode`` says which mode's candidates it reads;
    ``needs`` which fields of ``Candidates`` it reads (``NEEDS[mode]`` lists the valid values):
    the pipeline plans, and the select stage reads, only what is needed. The select stage calls
    ``select`` on chunks of examples (bounded memory), unless ``whole_set`` asks for all at once."""

    kind = "evaluators"
    mode: ClassVar[Mode] = "training"
    needs: ClassVar[frozenset[str]] = frozenset({"nll"})
    whole_set: ClassVar[bool] = False

    @abstractmethod
    def select(self, examples: list[Candidates]) -> list[Choice]:
        """See the class docstring."""


# --- alignment ----------------------------------------------------------------------------------


@dataclass
class Tokenized:
    """A text and one tokenizer's view of it. ``offsets[i] = (start, end)`` character offsets of
    token i in ``text`` (special tokens have (0, 0)); ``tokens[i]`` is the token string."""

    text: str
    ids: np.ndarray  # [n] int
    offsets: np.ndarray  # [n, 2] int
    tokens: list[str]


class Aligner(Component):
    """Aligns a source tokenisation of a text to the target tokenisation of the same text.

    Returns for every target token t a contiguous, monotone range of source tokens
    ``[starts[t], ends[t])`` (empty where nothing corresponds) — see ``profuser.alignment``,
    which turns that into the source distributions projected onto the target vocabulary."""

    kind = "aligners"

    @abstractmethod
    def align(self, target: Tokenized, source: Tokenized) -> tuple[np.ndarray, np.ndarray]:
        """See the class docstring."""


# --- training -----------------------------------------------------------------------------------


# The extra batch entries a loss may ask for (``Loss.needs``); the trainer adds only those asked
# for, and registration rejects any other name.
LOSS_NEEDS: dict[str, str] = {
    "example_id": "``batch['example_id']``: list[str] [B], each example's id",
    "mode": "``batch['mode']``: list[str] [B], each example's mode (inference or training)",
    "source": "``batch['source']``: list[str] [B], the source key whose teacher the example carries "
              "(the advantaged source)",
    "category": "``batch['category']``: [B, T] int64, the alignment category code of each position "
                "(``profuser.alignment.CATEGORIES``; -1 where no label)",
    "teacher_logz": "``batch['teacher_logz']``: [B, T] float32, the log-partition of the teacher's raw logits "
                    "at each position (``teacher_logits - teacher_logz`` are log-probabilities; NaN where none)",
    "all_teachers": "``batch['all_teacher_ids']`` / ``['all_teacher_logits']`` [B, T, S, k] and "
                    "``['all_teacher_mask']`` [B, T, S]: every source's aligned top-k on the same response, "
                    "sources in recipe order; ``['all_teacher_scores']`` [B, S] float32, the evaluator's score of "
                    "each source for the example (NaN where none). The planner then aligns every source on every "
                    "example (inference mode: on the chosen response) and build writes them (docs/summary-variant.md)",
}


class Loss(Component):
    """A fusion loss on the target's logits and a sparse teacher.

    ``batch`` holds (shapes: B examples, T positions, k teacher ids; indexed like ``input_ids``,
    unshifted; docs/plugins.md, "The loss batch"):
      input_ids       [B, T]    int64, the target's tokens (prompt + response), right-padded
      attention_mask  [B, T]    int64, 1 on tokens, 0 on padding
      labels          [B, T]    int64, -100 where no loss
      teacher_ids     [B, T, k] int64, target-vocabulary ids of the teacher's top-k
      teacher_logits  [B, T, k] float, the teacher's raw logits at those ids (-inf = unused slot)
      teacher_mask    [B, T]    bool, positions that carry a teacher distribution
      weight          [B]       float, per-example weight: the curriculum's mode weight w1/w2 (times
                                its example weight) times N / N_mode, the step's labelled tokens over
                                those of the example's mode (all micro-batches and ranks), so that a
                                token mean over the step is Eq. 5's w1 · mean_inference + w2 · mean_training
    The loss is a weighted mean over the micro-batch's labelled tokens (the trainer scales it by the
    micro-batch's share of the step's). Returns the scalar loss and its parts as floats for logging. ``beta`` overrides the KL weight
    for the current phase (the curriculum's λ/β). ``needs``: extra entries it reads
    (``LOSS_NEEDS``); only those are added."""

    kind = "losses"
    needs: ClassVar[frozenset[str]] = frozenset()
    # False: the loss never reads the teacher_* entries (sft). With a curriculum of the training
    # mode only, the recipe then plans no teacher stages: no logits, selection or alignment (CSFT)
    teacher: ClassVar[bool] = True

    @abstractmethod
    def __call__(
        self, logits: torch.Tensor, batch: dict[str, torch.Tensor], *, beta: float | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """See the class docstring."""


@dataclass
class PhasePart:
    """Examples of one mode in a phase. ``ids=None`` means all examples of that mode.
    ``example_weights``: id -> a factor on that example's ``weight`` (missing ids: 1)."""

    mode: Mode
    weight: float = 1.0
    ids: list[str] | None = None
    example_weights: dict[str, float] | None = None


@dataclass(frozen=True)
class Trainable:
    """Which parameters train in a phase, by position so that one recipe fits any depth:
    ``embeddings`` the input embeddings (and an output head tied to them); ``blocks`` the
    transformer blocks i with round(start * n) <= i < round(end * n), n the depth; ``rest``
    everything else (final norm, untied output head, position embeddings)."""

    embeddings: bool = True
    blocks: tuple[float, float] = (0.0, 1.0)
    rest: bool = True


@dataclass
class Phase:
    name: str
    epochs: float
    parts: list[PhasePart]
    beta: float | None = None  # KL weight in this phase (None: the loss's own)
    # the parameters that train (None: all); frozen ones get no gradient and no optimizer state
    trainable: Trainable | None = None
    # what a draw is (Eq. 5): "instructions" (an id with every part's example of it; epochs and
    # batch_size count ids) or "examples" (each mode's example on its own: the per-mode ablation)
    draws: Draws = "instructions"


@dataclass(frozen=True, slots=True)
class ExampleStats:
    """One built example's statistics, computed once by the build stage (``examples.arrow``): what
    curricula may split and order by. ``teacher_entropy`` / ``teacher_top1``: the mean, over the
    response positions that carry a teacher, of the entropy (nats) and of the top-1 probability of
    the stored top-k renormalised at temperature 1 (the loss's own T and top-p are not applied);
    NaN where no position has a teacher, or in a file built before build version 3."""

    source: str
    response_length: int
    teacher_entropy: float
    teacher_top1: float
    scores: dict[str, float] = field(default_factory=dict)
    rm_scores: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass
class CurriculumInput:
    """What a curriculum may look at to split and order examples. Per example id:
    ``gt_length`` the GT response length in target tokens; ``target_reward`` the reward scores
    of the target model's own inference-mode answer, ``{reward model: score}`` with the strongest
    reward model first (a plain number: one score of unnamed origin), None when no reward model ran;
    ``stats`` each built mode's ``ExampleStats`` of it."""

    ids: list[str]
    gt_length: dict[str, int]
    target_reward: dict[str, dict[str, float] | float] | None = None
    batch_size: int = 1
    micro_batch_size: int = 1
    world_size: int = 1
    stats: dict[str, dict[Mode, ExampleStats]] = field(default_factory=dict)


@dataclass
class PhaseExamples:
    """What ``Curriculum.order_examples`` orders: what one phase draws, and how it is batched.
    ``draws: instructions`` (the default): one entry per id, in the order its parts first name
    it (``modes``/``weights``: of that first example; every part's example of the id comes with
    it). ``draws: examples``: one entry per row, in the order of the parts (an id twice if two
    parts name it). Rank r trains on the r-th contiguous 1/world_size share of each global batch.
    ``stats``: each entry's ``ExampleStats`` (of the same example as ``modes``)."""

    phase: Phase
    index: int
    ids: list[str]
    modes: list[Mode]
    weights: list[float]
    gt_length: list[int]
    batch_size: int
    micro_batch_size: int
    world_size: int
    stats: list[ExampleStats] = field(default_factory=list)


class Curriculum(Component):
    """Turns a recipe into ordered training phases. ``modes`` are the build artifacts it needs.
    ``order_examples`` gives each epoch's order of a phase's rows (default: a seeded permutation)."""

    kind = "curricula"
    modes: ClassVar[tuple[Mode, ...]] = ("inference", "training")
    # params that set each phase's β: with any, the loss's own ``beta`` is never used (and a
    # recipe that sets ``loss.params.beta`` is refused at validation)
    beta_params: ClassVar[tuple[str, ...]] = ()
    # reads ``CurriculumInput.target_reward``: the recipe must list the target among the sources
    # (same label) so that the inference mode scores its own answers (checked at validation)
    needs_target_reward: ClassVar[bool] = False

    @abstractmethod
    def phases(self, data: CurriculumInput) -> list[Phase]:
        """See the class docstring."""

    def order_examples(self, examples: PhaseExamples, rng: np.random.Generator, epoch: int) -> Sequence[int]:
        """Epoch ``epoch`` of a phase: a permutation of ``range(len(examples.ids))``, drawn in that
        order (``steps * batch_size`` draws in all, the last batch filled from the phase's start).
        ``rng`` is seeded by (train seed, phase index, epoch): use it, or nothing random, so that a
        resume and every rank see the same order."""
        return rng.permutation(len(examples.ids))


KINDS: dict[str, type[Component]] = {
    "datasets": DatasetSource,
    "models": BuiltinModel,
    "generators": Generator,
    "reward_models": RewardModel,
    "evaluators": AdvantageEvaluator,
    "aligners": Aligner,
    "losses": Loss,
    "curricula": Curriculum,
}
