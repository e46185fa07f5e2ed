"""Reading a recipe's YAML: PyYAML's SafeLoader (no Python objects), plus what it lets through and
a recipe must not have, each refused in one line naming the file and line:

- a duplicate key (YAML keeps the last one silently; in a recipe that hides a field's real value);
- aliases that expand past ``MAX_VALUES`` values, or into themselves: the loader shares the
  aliased object, but everything downstream (validation, dumps, cache keys) expands it, so 1 KB
  of nested aliases becomes gigabytes there. Anchors and aliases of ordinary size still work.

And the file itself: a directory, a symlink loop, an unreadable or non-UTF-8 file are named as such.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import yaml

# values (scalars, lists, mappings) a recipe may hold once its aliases are expanded; a real recipe
# holds a few hundred, the paper-scale ones under two thousand
MAX_VALUES = 100_000


class YamlProblem(Exception):
    """A recipe YAML problem at ``line`` (1-based; None: the file as a whole)."""

    def __init__(self, message: str, line: int | None = None):
        super().__init__(message)
        self.message = message
        self.line = line


class RecipeLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys and alias bombs (see the module docstring)."""

    def __init__(self, stream):
        super().__init__(stream)
        self._alias_lines: list[int] = []

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self._alias_lines.append(self.peek_event().start_mark.line + 1)
        return super().compose_node(parent, index)

    def compose_document(self):
        node = super().compose_document()
        if self._alias_lines:  # only a document with aliases can expand past its own size
            _expanded_size(node, {}, self._alias_lines[0])
        return node

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, int] = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # a `<<:` merge may be overridden by explicit keys: that is its purpose
                key = self.construct_object(key_node)
                line = key_node.start_mark.line + 1
                if key in first:
                    raise YamlProblem(f"duplicate key {key!r} (first at line {first[key]}): a field is "
                                      f"given once, the last one would silently win", line)
                first[key] = line
        return super().construct_mapping(node, deep=deep)


def _expanded_size(node: yaml.Node, sizes: dict[int, int | None], alias_line: int) -> int:
    """How many values ``node`` holds with every alias written out (memoised by node: a shared
    node is counted once per use, computed once). Raises past ``MAX_VALUES`` or on a cycle."""
    if id(node) in sizes:
        size = sizes[id(node)]
        if size is None:
            raise YamlProblem("an alias refers to the node that contains it (a recursive structure)", alias_line)
        return size
    sizes[id(node)] = None  # in progress: meeting it again below is a cycle
    if isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(child, sizes, alias_line) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, sizes, alias_line) + _expanded_size(v, sizes, alias_line) for k, v in node.value)
    else:
        size = 1
    if size > MAX_VALUES:
        raise YamlProblem(f"aliases expand this recipe past {MAX_VALUES:,} values (an alias bomb?): write "
                          f"the values out, or share them with extends:", alias_line)
    sizes[id(node)] = size
    return size


def read_text(path: Path) -> str:
    """The file's text, or YamlProblem naming what the path is instead of a readable recipe."""
    try:
        if path.is_dir():
            raise YamlProblem("is a directory, not a recipe file")
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise YamlProblem("a symlink loop: the link leads back to itself, not to a recipe file") from None
        if exc.errno == errno.ENOENT:
            raise YamlProblem("recipe file not found") from None
        raise YamlProblem(f"cannot read it: {os.strerror(exc.errno) if exc.errno else exc}") from None
    except UnicodeDecodeError as exc:
        raise YamlProblem(f"not UTF-8 text (byte {exc.start}): a recipe is a YAML text file") from None


def resolve(path: Path) -> Path:
    """``path`` made absolute with its symlinks resolved, or YamlProblem for a symlink loop."""
    try:
        return Path(path).resolve()
    except (RuntimeError, OSError):  # 3.11 raises RuntimeError("Symlink loop ..."), 3.13 OSError(ELOOP)
        raise YamlProblem("a symlink loop: the link leads back to itself, not to a recipe file") from None


def load(text: str) -> Any:
    """The YAML document in ``text``; YamlProblem (with its line) for anything a recipe must not be."""
    try:
        return yaml.load(text, Loader=RecipeLoader)  # a SafeLoader: no Python objects
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise YamlProblem(f"invalid YAML: {getattr(exc, 'problem', None) or exc}",
                          mark.line + 1 if mark else None) from None
