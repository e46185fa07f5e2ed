"""The ``file`` dataset source: local JSONL, JSON or parquet files (or a directory of them)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from profuser import hookimpl
from profuser.components import BadRow, DatasetSource, Record
from profuser.data import RowFormatParams, data_files, read_rows, rows_to_records


class FileDataset(DatasetSource):
    """Rows of local files. ``path`` is a file or a directory (all its data files, or those of
    ``split``); relative paths in a recipe are relative to the recipe file."""

    name = "file"
    aliases = ("local",)

    class Params(RowFormatParams):
        path: str
        split: str | None = None

    data_seed = 0  # the data stage sets the recipe's data.seed: orca_best draws a cluster's sample with it

    def records(self) -> Iterator[Record | BadRow]:
        for file in data_files(Path(self.params.path).expanduser(), self.params.split):
            # each file decides its own format under `auto`: a directory may mix them
            yield from rows_to_records(read_rows(file), self.params, seed=self.data_seed)


@hookimpl
def profuser_register_datasets(register):
    register(FileDataset)
