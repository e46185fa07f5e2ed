"""The ``hub`` dataset source: a dataset loaded with ``datasets.load_dataset`` (a hub id such as
``shahules786/orca-best``, or a local dataset directory)."""

from __future__ import annotations

from collections.abc import Iterator

from profuser import hookimpl
from profuser.components import BadRow, DatasetSource, Record
from profuser.data import RowFormatParams, rows_to_records
from profuser.errors import DataError


class HubDataset(DatasetSource):
    name = "hub"
    aliases = ("hf",)

    class Params(RowFormatParams):
        name: str
        config: str | None = None
        split: str = "train"
        revision: str | None = None

    data_seed = 0  # the data stage sets the recipe's data.seed: orca_best draws a cluster's sample with it

    def records(self) -> Iterator[Record | BadRow]:
        import datasets  # heavy: only when a recipe uses this source

        p = self.params
        where = f"{p.name}[{p.split}]"
        try:
            dataset = datasets.load_dataset(p.name, p.config, split=p.split, revision=p.revision)
        except Exception as exc:  # network, missing dataset/config/split: name the dataset, keep the cause
            raise DataError(f"cannot load the dataset: {type(exc).__name__}: {exc}", where=f"hub dataset {where}") from exc
        rows = ((f"{where}:{i}", row) for i, row in enumerate(dataset, 1))
        yield from rows_to_records(rows, p, seed=self.data_seed)


@hookimpl
def profuser_register_datasets(register):
    register(HubDataset)
