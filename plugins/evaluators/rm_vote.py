"""``rm_vote``: reward models vote for the best response (ProFuser Eq. 3, App. E).

Every reward model gives one vote to the source whose response it scores highest; the source
with the most votes wins. A tie in votes goes to the source the *strongest* reward model scores
highest among the tied ones. Raw scores are never added or averaged across reward models: their
scales are unrelated (a Bradley-Terry logit, a value head, a judge's log-odds). With two reward
models every disagreement is a 1-1 tie, so the vote is always the strongest's pick: a vote needs
three or more (the paper's three). ``detail.tie`` marks a selection a tie decided; the select
stage counts them (metric ``ties``).

If one reward model scores several responses exactly equally at the top, its vote is split
equally between them (an identical response from two sources must not win by list order).

Best-of-n: where the generator drew n > 1 samples per prompt (``Candidates.sample_scores``), each
source is first represented by its best sample, picked by the same vote among its own samples
(ties: the strongest reward model, then the first sample); the sources then vote with those
samples' scores. ``detail.sample`` names each source's best sample, ``Choice.sample`` the winner's.
"""

from __future__ import annotations

import math

from profuser import hookimpl
from profuser.components import AdvantageEvaluator, Candidates, Choice, StrictModel
from profuser.errors import ProfuserError


class RMVote(AdvantageEvaluator):
    name = "rm_vote"
    aliases = ("vote",)
    mode = "inference"
    needs = frozenset({"scores"})

    class Params(StrictModel):
        strongest: str | None = None  # the label of the tie-breaking reward model; default: the first listed

    def select(self, examples: list[Candidates]) -> list[Choice]:
        return [self._choose(example) for example in examples]

    def _choose(self, ex: Candidates) -> Choice:
        if not ex.scores:
            raise ProfuserError("no reward-model scores (the rm_vote evaluator needs at least one reward model)",
                                where=f"example {ex.id}")
        rms = list(ex.scores)  # the recipe's order
        sources = list(ex.responses) or list(ex.scores[rms[0]])
        for rm in rms:
            missing = [s for s in sources if s not in ex.scores[rm]]
            if missing:
                raise ProfuserError(f"reward model {rm!r} has no score for source(s) {', '.join(missing)}",
                                    where=f"example {ex.id}")
            bad = [s for s in sources if not math.isfinite(ex.scores[rm][s])]
            if bad:
                raise ProfuserError(f"reward model {rm!r} gave a non-finite score to {', '.join(bad)}",
                                    where=f"example {ex.id}")
        strongest = self.params.strongest or rms[0]
        if strongest not in ex.scores:
            raise ProfuserError(f"strongest reward model {strongest!r} is not among the reward models "
                                f"({', '.join(rms)})", where=f"example {ex.id}")

        scores = {rm: dict(ex.scores[rm]) for rm in rms}
        best_sample = self._best_samples(ex, sources, rms, strongest)
        for rm in rms:  # each source at its best sample (sample 0 when there is one per prompt)
            for s, j in best_sample.items():
                scores[rm][s] = float(ex.sample_scores[rm][s][j])
        chosen, detail = self._vote(scores, sources, rms, strongest)
        if best_sample:
            detail["sample"] = best_sample
        return Choice(chosen=chosen, scores=detail["votes"], detail=detail, sample=best_sample.get(chosen, 0))

    def _best_samples(self, ex: Candidates, sources: list[str], rms: list[str], strongest: str) -> dict[str, int]:
        """Source -> index of its best sample, for the sources with more than one ({} with n = 1)."""
        out = {}
        for s in sources:
            counts = {len(ex.sample_scores.get(rm, {}).get(s) or []) for rm in rms}
            if counts == {0} or counts == {1}:
                continue
            if len(counts) > 1 or 0 in counts:
                raise ProfuserError(f"source {s!r}: the reward models scored different numbers of samples ({sorted(counts)})",
                                    where=f"example {ex.id}")
            n = counts.pop()
            per = {rm: {str(j): float(ex.sample_scores[rm][s][j]) for j in range(n)} for rm in rms}
            if any(not math.isfinite(v) for scores in per.values() for v in scores.values()):
                raise ProfuserError(f"a reward model gave a non-finite score to a sample of {s!r}", where=f"example {ex.id}")
            winner, _ = self._vote(per, [str(j) for j in range(n)], rms, strongest)
            out[s] = int(winner)
        return out

    @staticmethod
    def _vote(scores: dict[str, dict[str, float]], sources: list[str], rms: list[str],
              strongest: str) -> tuple[str, dict]:
        votes = {s: 0.0 for s in sources}
        voted: dict[str, list[str]] = {}
        for rm in rms:
            best = max(scores[rm][s] for s in sources)
            winners = [s for s in sources if scores[rm][s] == best]
            voted[rm] = winners
            for s in winners:
                votes[s] += 1.0 / len(winners)

        most = max(votes.values())
        tied = [s for s in sources if votes[s] == most]
        tie_break = None
        vote_tie = len(tied) > 1
        if vote_tie:
            # the strongest RM decides; if it scores the tied responses equally, the next RMs in
            # recipe order do; if all do, the first listed source keeps it (deterministic)
            for rm in [strongest, *(r for r in rms if r != strongest)]:
                best = max(scores[rm][s] for s in tied)
                narrowed = [s for s in tied if scores[rm][s] == best]
                if len(narrowed) < len(tied):
                    tie_break = rm
                    tied = narrowed
                if len(tied) == 1:
                    break
        chosen = tied[0]
        detail = {
            "rm_scores": {rm: dict(scores[rm]) for rm in rms},
            "voted": voted,
            "votes": votes,
            "tie": vote_tie,
            "tie_break_by": tie_break,
            "strongest": strongest,
        }
        return chosen, detail


@hookimpl
def profuser_register_evaluators(register):
    register(RMVote)
