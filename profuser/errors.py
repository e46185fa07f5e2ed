"""Errors a user can act on. The CLI prints them as `where: message` lines, never a traceback."""

from __future__ import annotations


class ProfuserError(Exception):
    """Base class: a readable problem with the user's input (recipe, data, model, plugin)."""

    exit_code = 1

    def __init__(self, message: str, *, where: str | None = None):
        super().__init__(message)
        self.message = message
        self.where = where

    def lines(self) -> list[str]:
        return [f"{self.where}: {self.message}" if self.where else self.message]


class RecipeError(ProfuserError):
    """One or more problems in a recipe; each is (path.to.field, message)."""

    exit_code = 2

    def __init__(self, problems: list[tuple[str, str]], *, file: str | None = None):
        self.problems = problems
        self.file = file
        super().__init__("; ".join(f"{p}: {m}" for p, m in problems), where=file)

    def lines(self) -> list[str]:
        prefix = f"{self.file}: " if self.file else ""
        return [f"{prefix}{path}: {message}" if path else f"{prefix}{message}" for path, message in self.problems]


class PluginError(ProfuserError):
    """A plugin could not be loaded or registers something invalid (names the plugin)."""

    exit_code = 2


class DataError(ProfuserError):
    """A dataset file or row is unusable (names the file and row)."""


class ModelError(ProfuserError):
    """A model reference cannot be resolved or loaded (names the model)."""


class ArtifactError(ProfuserError):
    """A stored artifact is missing, partial or corrupt."""


def import_extra(module: str, extra: str, *, what: str, where: str | None = None):
    """``import module``, or ProfuserError naming the extra that installs it: optional packages
    are imported where they are used, so a bare install runs everything else."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if exc.name is not None and module.split(".")[0] != exc.name.split(".")[0]:
            raise  # the package is there but one of its own imports fails: not a missing extra
        raise ProfuserError(f"{what} needs {module.split('.')[0]}, which is not installed: "
                            f"pip install 'profuser[{extra}]'", where=where) from None
