"""One module per stage kind; each exposes ``run(ctx: StageContext) -> dict`` (its metrics) and a
``VERSION`` string that is part of the cache key (bump it when the stage's output changes)."""
