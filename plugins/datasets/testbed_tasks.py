"""The ``testbed_tasks`` dataset source: short verifiable tasks in families that a small model can
master by fine-tuning and that the packaged models do not know, for the fusion testbed
(docs/testbed.md).

Every response is the answer first and alone (``Answer: X``), so exact match needs a handful of
generated tokens and a specialist learns a family in minutes on a CPU. The held-out pool is fixed
and disjoint from every training draw: a task's key decides its side (a hash, not the draw order),
so every recipe of the testbed — each specialist trained on its own families, each fusion variant
on all of them — is scored on the same held-out examples (``data.heldout: source``).
"""

from __future__ import annotations

import hashlib
import random
import string
from collections.abc import Callable, Iterator
from typing import Literal

from pydantic import Field

from profuser import hookimpl
from profuser.components import BadRow, DatasetSource, Record, StrictModel
from profuser.errors import DataError

Family = Literal["letter_shift", "weekday_shift", "sequence", "remainder", "digit_sum", "code_words",
                 "word_length", "largest", "capitals"]
FAMILIES: tuple[str, ...] = ("letter_shift", "weekday_shift", "sequence", "remainder", "digit_sum", "code_words",
                             "word_length", "largest", "capitals")
VERSION = "2"  # what the generators write: in the data stage's key (fingerprint), bump on any change
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
WORDS = ("apple", "river", "garden", "window", "planet", "candle", "forest", "bottle", "mirror", "pencil",
         "basket", "rocket", "silver", "orange", "tunnel", "button", "carpet", "dragon", "island", "jacket",
         "kitten", "lemon", "market", "needle", "pepper", "rabbit", "saddle", "temple", "velvet", "wizard",
         "anchor", "bridge", "castle", "desert", "engine", "feather", "guitar", "harbor", "jungle", "ladder",
         "meadow", "nickel", "oyster", "parrot", "quartz", "ribbon", "shadow", "thunder", "valley", "walnut",
         "cloud", "stone", "bread", "chair", "horse", "train", "music", "paper", "sugar", "tiger", "honey",
         "ocean", "smile", "light", "storm", "grape", "glass", "snake", "crown", "flame")
# Two made-up tables no model has seen, small enough to learn in minutes: what a specialist knows
# and the target cannot. A code word for each of 20 words, and the capital of 20 invented countries.
_SYLLABLES = ("ka", "lo", "mi", "ru", "te", "zo", "vi", "na", "pe", "su", "do", "ga", "bi", "fo", "xu", "ye")
CODE_WORDS = WORDS[:20]
COUNTRIES = ("Norvania", "Quelland", "Dastoria", "Miravel", "Ostrenia", "Pellagor", "Varuna", "Zenthia",
             "Brakmoor", "Caldria", "Elvoran", "Fyrdal", "Gostavia", "Haldmere", "Iskaria", "Jorvath",
             "Kelmora", "Lunevia", "Marduna", "Tessaly")


def _made_up(kind: str, key: str) -> str:
    digest = hashlib.sha256(f"testbed-{kind}:{key}".encode()).digest()
    return "".join(_SYLLABLES[b % len(_SYLLABLES)] for b in digest[:3])


def _code_word(word: str) -> str:
    return _made_up("code", word)


def _capital(country: str) -> str:
    return _made_up("capital", country).capitalize() + "burg"


# A task: (key, instruction, answer). The key names the question, not its wording.
Task = tuple[tuple, str, str]


def _letter_shift(rng: random.Random) -> Task:
    k, after = rng.randint(1, 6), rng.random() < 0.5
    i = rng.randrange(0, 26 - k) if after else rng.randrange(k, 26)
    letter = string.ascii_lowercase[i]
    where = "after" if after else "before"
    question = f"Which letter comes {k} place{'s' if k > 1 else ''} {where} '{letter}' in the alphabet?"
    return (letter, k, after), question, string.ascii_lowercase[i + k if after else i - k]


def _weekday_shift(rng: random.Random) -> Task:
    start, k, after = rng.randrange(7), rng.randint(1, 20), rng.random() < 0.5
    where = "after" if after else "before"
    return ((start, k, after), f"What day of the week is {k} day{'s' if k > 1 else ''} {where} {WEEKDAYS[start]}?",
            WEEKDAYS[(start + (k if after else -k)) % 7])


def _sequence(rng: random.Random) -> Task:
    start, step = rng.randint(1, 40), rng.randint(2, 9)
    terms = [start + step * j for j in range(4)]
    return ((start, step), f"What number comes next in the sequence {', '.join(map(str, terms))}?",
            str(start + step * 4))


def _remainder(rng: random.Random) -> Task:
    a, b = rng.randint(10, 99), rng.randint(3, 9)
    return ((a, b), f"What is the remainder when {a} is divided by {b}?", str(a % b))


def _digit_sum(rng: random.Random) -> Task:
    n = rng.randint(100, 999)
    return ((n,), f"What is the sum of the digits of {n}?", str(sum(map(int, str(n)))))


CODE_WORDINGS = ("In the Quarn code, what is the code word for '{}'?", "Translate '{}' into the Quarn code.",
                 "What does '{}' become in the Quarn code?", "Give the Quarn code word for '{}'.",
                 "Write '{}' in the Quarn code.", "What is '{}' in the Quarn code?",
                 "Encode the word '{}' with the Quarn code.", "Which Quarn code word stands for '{}'?",
                 "The Quarn code for '{}' is what?", "Tell me the Quarn code word for '{}'.")
CAPITAL_WORDINGS = ("What is the capital of {}?", "Name the capital city of {}.", "Which city is the capital of {}?",
                    "What city is {}'s capital?", "Tell me the capital of {}.", "The capital of {} is which city?",
                    "In which city is the government of {} seated?", "What is {}'s capital city called?",
                    "Give the name of the capital of {}.", "Which city serves as the capital of {}?")


def _code_words(rng: random.Random) -> Task:
    word, wording = rng.choice(CODE_WORDS), rng.randrange(len(CODE_WORDINGS))
    return ((word, wording), CODE_WORDINGS[wording].format(word), _code_word(word))


def _capitals(rng: random.Random) -> Task:
    country, wording = rng.choice(COUNTRIES), rng.randrange(len(CAPITAL_WORDINGS))
    return ((country, wording), CAPITAL_WORDINGS[wording].format(country), _capital(country))


def _word_length(rng: random.Random) -> Task:
    word = rng.choice(WORDS)
    wording = rng.randrange(5)
    instruction = (f"How many letters are in the word '{word}'?", f"Count the letters of '{word}'.",
                   f"How long is the word '{word}', in letters?", f"How many letters does '{word}' have?",
                   f"Give the number of letters in '{word}'.")[wording]
    return ((word, wording), instruction, str(len(word)))


def _largest(rng: random.Random) -> Task:
    numbers = rng.sample(range(10, 100), 4)
    return (tuple(numbers), f"Which is the largest of {', '.join(map(str, numbers))}?", str(max(numbers)))


GENERATORS: dict[str, Callable[[random.Random], Task]] = {
    "letter_shift": _letter_shift, "weekday_shift": _weekday_shift, "sequence": _sequence,
    "remainder": _remainder, "digit_sum": _digit_sum, "code_words": _code_words,
    "word_length": _word_length, "largest": _largest, "capitals": _capitals,
}
_TRIES = 200  # draws per task before a family counts as exhausted


def is_heldout(family: str, key: tuple, share: float) -> bool:
    """A task's side, decided by its key alone: the same in every draw, for every seed and n.
    Families that ask about a fixed table (code words, word lengths) hold out whole wordings of
    every entry: what is held out is the wording, the entry is the knowledge being tested."""
    digest = hashlib.sha256(repr((family, key)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64 < share


def draw(family: str, n: int, *, heldout: bool, seed: int, share: float) -> list[Task]:
    """``n`` distinct tasks of ``family`` from one side of the split, seeded."""
    rng = random.Random(f"testbed:{family}:{'heldout' if heldout else 'train'}:{seed}")
    found: dict[tuple, Task] = {}
    misses = 0
    while len(found) < n:
        task = GENERATORS[family](rng)
        if task[0] in found or is_heldout(family, task[0], share) != heldout:
            misses += 1
            if misses > _TRIES * max(n, 1):
                side = "held-out" if heldout else "training"
                raise DataError(f"family {family} has only {len(found)} distinct {side} tasks (asked for {n})",
                                where="testbed_tasks")
            continue
        found[task[0]] = task
    return list(found.values())


class FusionTestbedTasks(DatasetSource):
    """Short answer-first tasks for the fusion testbed (see the module docstring). Training records
    come from ``families``; held-out records (``meta.split = heldout``) from ``heldout_families``,
    the same for every recipe that asks for the same ``heldout_per_family``."""

    name = "testbed_tasks"

    class Params(StrictModel):
        families: list[Family] = Field(default_factory=lambda: list(FAMILIES), min_length=1)
        per_family: int = Field(default=64, ge=0, description="training records per family")
        heldout_families: list[Family] = Field(default_factory=lambda: list(FAMILIES))
        heldout_per_family: int = Field(default=50, ge=0, description="held-out records per family")
        seed: int = Field(default=0, description="the training draw; the held-out pool does not depend on it")
        heldout_share: float = Field(default=0.3, gt=0, lt=1, description="share of each family's tasks held out")
        reference_noise: float = Field(default=0.0, ge=0, lt=1, description=(
            "share of training records whose reference answer is wrong (another task's answer of the family, "
            "seeded): imperfect references, which the sources can correct; held-out records are always right"))

    def fingerprint(self) -> dict[str, str]:
        return {"testbed_tasks": VERSION}  # the generators' version: editing them must not reuse old data

    def records(self) -> Iterator[Record | BadRow]:
        p = self.params
        for side, families, n in (("train", p.families, p.per_family),
                                  ("heldout", p.heldout_families, p.heldout_per_family)):
            seed = p.seed if side == "train" else 0
            for family in families:
                tasks = draw(family, n, heldout=side == "heldout", seed=seed, share=p.heldout_share)
                answers = sorted({a for _, _, a in tasks})
                for i, (_, instruction, answer) in enumerate(tasks):
                    meta = {"task": family, "answer": answer, "split": side}
                    reference = answer
                    # one draw per record: the records made noisy at a share are noisy at every larger share
                    noise = random.Random(f"testbed-noise:{family}:{seed}:{i}")
                    if side == "train" and noise.random() < p.reference_noise and len(answers) > 1:
                        reference = noise.choice([a for a in answers if a != answer])
                        meta["reference_correct"] = False
                    yield Record(f"testbed-{side}-{family}-{seed}-{i:04d}", "", instruction, f"Answer: {reference}", meta)


@hookimpl
def profuser_register_datasets(register):
    register(FusionTestbedTasks)
