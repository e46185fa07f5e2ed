"""The ``file`` dataset source: local JSONL, JSON or parquet files (or a directory of them)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from profuser import hookimpl
from profuser.components import BadRow, DatasetSource, Record
from profuser.data import RowFormatParams, data_files, read_rows, rows_to_records
from profuser.store import file_sha256


class FileDataset(DatasetSource):
    """Rows of local files. ``path`` is a file or a directory (all its data files, or those of
    ``split``); relative paths in a recipe are relative to the recipe file."""

    name = "file"
    aliases = ("local",)
    path_params = ("path",)  # resolved against the recipe's folder, checked by validate (the default, said here)

    class Params(RowFormatParams):
        path: str
        split: str | None = None

    data_seed = 0  # the data stage sets the recipe's data.seed: orca_best draws a cluster's sample with it

    def fingerprint(self) -> dict[str, str]:
        """The SHA-256 of the file, or of every file under the directory by relative path: editing
        the data in place reruns the data stage, while moving or touching it does not."""
        root = Path(self.params.path).expanduser()
        if not root.exists():  # records() names the missing path
            return {}
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        return {str(f.relative_to(root) if f != root else f.name): file_sha256(f) for f in files}

    def records(self) -> Iterator[Record | BadRow]:
        for file in data_files(Path(self.params.path).expanduser(), self.params.split):
            # each file decides its own format under `auto`: a directory may mix them
            yield from rows_to_records(read_rows(file), self.params, seed=self.data_seed)


@hookimpl
def profuser_register_datasets(register):
    register(FileDataset)
