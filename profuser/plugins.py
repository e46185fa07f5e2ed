"""Plugin manager and component registry.

Built-in plugins (the modules listed in ``profuser_plugins.BUILTIN_PLUGINS``) are always
registered; third-party packages are discovered through the entry-point group ``profuser``
unless ``PROFUSER_DISABLE_ENTRYPOINTS=1`` (tests use it to see the built-ins alone).
Both go through the very same registration hooks.
"""

from __future__ import annotations

import difflib
import importlib
import os
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy
from pydantic import BaseModel, ValidationError

from . import hookspecs
from .components import KINDS, LOSS_NEEDS, NEEDS, Component
from .errors import PluginError, ProfuserError

ENTRYPOINT_GROUP = "profuser"
DISABLE_ENV = "PROFUSER_DISABLE_ENTRYPOINTS"


@dataclass
class ComponentInfo:
    kind: str
    name: str
    cls: type[Component]
    plugin: str
    aliases: tuple[str, ...] = ()
    registry: Registry | None = field(default=None, repr=False, compare=False)  # the one it is in

    def params_schema(self) -> dict[str, Any]:
        return self.cls.Params.model_json_schema()

    def code_hash(self) -> str | None:
        """A hash of the source of the module defining the component and of the modules it
        imports from the same top-level package (cache keys of third-party components hold it:
        an edit in place recomputes what uses the component); None when there is no source."""
        from .fingerprint import class_code_hash

        return class_code_hash(self.cls)

    def params_problems(self, params: dict[str, Any]) -> list[tuple[str, str]]:
        """``(dotted.field, message)`` for each problem of ``params`` under this component's
        ``Params``; an unknown field gets the closest known one."""
        return params_problems(self.cls.Params, params, context=validation_context(self.registry))


@dataclass
class PluginInfo:
    name: str
    version: str
    builtin: bool
    components: list[ComponentInfo] = field(default_factory=list)


class Registry:
    """All components of all kinds, by name and alias, with the plugin that registered each."""

    def __init__(self, *, entrypoints: bool = True) -> None:
        self._by_kind: dict[str, dict[str, ComponentInfo]] = {kind: {} for kind in KINDS}
        self._aliases: dict[str, dict[str, str]] = {kind: {} for kind in KINDS}
        self.entrypoints = entrypoints  # False: third-party packages were not loaded (say so)

    def add(self, kind: str, cls: type, plugin: str, name: str | None, aliases) -> ComponentInfo:
        base = KINDS[kind]
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise PluginError(f"registers {cls!r} as {kind}, which is not a subclass of {base.__name__}", where=f"plugin {plugin}")
        name = name or cls.name
        if not name:
            raise PluginError(f"registers {cls.__name__} ({kind}) without a name", where=f"plugin {plugin}")
        aliases = tuple(aliases or cls.aliases)
        if kind == "evaluators":
            _check_needs(cls, name, plugin)
        if kind == "losses":
            _check_loss_needs(cls, name, plugin)
        for label in (name, *aliases):
            owner = self._owner(kind, label)
            if owner is not None:
                raise PluginError(
                    f"{kind} name {label!r} is registered by both plugin {owner.plugin!r} and plugin {plugin!r}",
                    where=f"plugin {plugin}",
                )
        info = ComponentInfo(kind=kind, name=name, cls=cls, plugin=plugin, aliases=aliases, registry=self)
        self._by_kind[kind][name] = info
        for alias in aliases:
            self._aliases[kind][alias] = name
        return info

    def _owner(self, kind: str, label: str) -> ComponentInfo | None:
        name = self._aliases[kind].get(label, label)
        return self._by_kind[kind].get(name)

    def names(self, kind: str) -> list[str]:
        return sorted(self._by_kind[kind])

    def components(self, kind: str | None = None) -> list[ComponentInfo]:
        kinds = [kind] if kind else list(KINDS)
        return [info for k in kinds for _, info in sorted(self._by_kind[k].items())]

    def get(self, kind: str, name: str) -> ComponentInfo:
        info = self._owner(kind, name)
        if info is None:
            message = unknown_name_message(kind, name, [*self._by_kind[kind], *self._aliases[kind]])
            if not self.entrypoints:
                message += f"; plugins from installed packages are off ({DISABLE_ENV}=1)"
            raise PluginError(message)
        return info

    def build(self, kind: str, name: str, params: dict[str, Any] | BaseModel | None = None, *, runtime: Any = None) -> Component:
        """An instance of the component ``name`` with ``params``, validated with this registry in
        the validation context (``validation_context``: a component composing another finds it
        here), and ``runtime`` (``profuser.runtime.Runtime``) as its ``runtime`` attribute from
        the start, so that its ``__init__`` may read it too; any ``__init__(self, params)`` works."""
        cls = self.get(kind, name).cls
        params = cls.Params.model_validate(params or {}, context=validation_context(self))
        component = cls.__new__(cls)
        component.runtime = runtime
        component.__init__(params)
        return component


def validation_context(registry: Registry | None) -> dict[str, Any]:
    """The pydantic validation context of a component's ``Params``: ``{"registry": registry}``
    (a validator reads it as ``info.context["registry"]``)."""
    return {"registry": registry} if registry is not None else {}


def _check_needs(cls: type, name: str, plugin: str) -> None:
    valid = NEEDS.get(cls.mode)
    if valid is None:
        raise PluginError(f"evaluator {name!r} has mode {cls.mode!r}; modes: {', '.join(NEEDS)}", where=f"plugin {plugin}")
    _check_names(f"evaluator {name!r}", cls.needs, valid, f"the {cls.mode} mode", plugin)


def _check_loss_needs(cls: type, name: str, plugin: str) -> None:
    _check_names(f"loss {name!r}", cls.needs, LOSS_NEEDS, "the trainer", plugin)


def _check_names(component: str, needs: Any, valid: Iterable[str], provider: str, plugin: str) -> None:
    """A component's ``needs``: a set of names, each one its provider supplies (one line otherwise)."""
    if isinstance(needs, str) or not all(isinstance(n, str) for n in needs):
        raise PluginError(f"{component}: needs must be a set of names, not {needs!r}", where=f"plugin {plugin}")
    unknown = sorted(set(needs) - set(valid))
    if unknown:
        raise PluginError(f"{component} needs {', '.join(map(repr, unknown))}, which {provider} does not "
                          f"provide (valid: {', '.join(valid)})", where=f"plugin {plugin}")


def params_problems(model: type[BaseModel], data: dict[str, Any], context: dict[str, Any] | None = None) -> list[tuple[str, str]]:
    """Validate ``data`` with ``model`` (and ``context``): ``(dotted.path, message)`` per problem,
    "unknown field; did you mean X?" when a known field of that (possibly nested) model is close."""
    try:
        model.model_validate(data, context=context)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(str(p) for p in err["loc"])
            message = err["msg"]
            if err["type"] == "extra_forbidden":
                close = difflib.get_close_matches(loc[-1], _fields_at(model, loc[:-1]), n=1, cutoff=0.6)
                message = "unknown field" + (f"; did you mean {close[0]}?" if close else "")
            problems.append((".".join(loc), message))
        return problems
    return []


def _fields_at(model: Any, loc: tuple[str, ...]) -> list[str]:
    """The field names of the model found at ``loc`` below ``model`` (list indices and dict keys
    are stepped over); [] where the value there is not a model."""
    for part in loc:
        if part in model.model_fields:
            model = _model_in(model.model_fields[part].annotation)
            if model is None:
                return []
        # else: an index or key into a container of models (the loc of an error always exists)
    return list(model.model_fields)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model an annotation holds (``M``, ``M | None``, ``list[M]``, ``dict[str, M]``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def unknown_name_message(kind: str, name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    choices = ", ".join(sorted(known)) or "none installed"
    return f"unknown {kind} component {name!r}{hint} (known: {choices})"


class Engine:
    """The pluggy manager, the registry it filled and what each plugin registered."""

    def __init__(self, *, entrypoints: bool | None = None, extra_plugins: list[tuple[str, Any]] = ()):
        if entrypoints is None:
            entrypoints = os.environ.get(DISABLE_ENV, "") not in ("1", "true", "yes")
        self.pm = pluggy.PluginManager("profuser")
        self.pm.add_hookspecs(hookspecs)
        self.plugins: dict[str, PluginInfo] = {}
        from profuser_plugins import BUILTIN_PLUGINS

        from . import __version__

        for module_name in BUILTIN_PLUGINS:  # named like "builtin.aligners.offsets"
            name = "builtin." + module_name.removeprefix("profuser_plugins.")
            self._add(name, importlib.import_module(module_name), __version__, builtin=True)
        if entrypoints:
            for ep in metadata.entry_points(group=ENTRYPOINT_GROUP):
                version = ep.dist.version if ep.dist else "?"
                try:
                    plugin = ep.load()
                except Exception as exc:  # a broken third-party package must name itself
                    raise PluginError(f"failed to load: {type(exc).__name__}: {exc}", where=f"plugin {ep.name} ({ep.value})") from exc
                self._add(ep.name, plugin, version, builtin=False)
        for name, plugin in extra_plugins:
            self._add(name, plugin, "0", builtin=False)
        self.registry = Registry(entrypoints=entrypoints)
        self._register_all()

    def _add(self, name: str, plugin: Any, version: str, *, builtin: bool) -> None:
        if self.pm.get_plugin(name) is not None:
            return
        try:
            self.pm.register(plugin, name=name)
        except pluggy.PluginValidationError as exc:
            raise PluginError(str(exc), where=f"plugin {name}") from exc
        self.plugins[name] = PluginInfo(name=name, version=version, builtin=builtin)

    def _register_all(self) -> None:
        # Call each plugin's registration hook on its own, so that every component (and every
        # duplicate) is attributed to the plugin that registered it.
        for kind in KINDS:
            caller = getattr(self.pm.hook, f"profuser_register_{kind}")
            for impl in caller.get_hookimpls():
                plugin = impl.plugin_name

                def register(cls, name=None, aliases=(), *, _kind=kind, _plugin=plugin):
                    info = self.registry.add(_kind, cls, _plugin, name, aliases)
                    self.plugins[_plugin].components.append(info)

                try:
                    impl.function(register=register)
                except ProfuserError:
                    raise
                except Exception as exc:
                    raise PluginError(f"profuser_register_{kind} failed: {type(exc).__name__}: {exc}", where=f"plugin {plugin}") from exc

    @property
    def hook(self):
        return self.pm.hook


_engine: Engine | None = None


def get_engine() -> Engine:
    """The process-wide engine, built on first use."""
    global _engine
    if _engine is None:
        _engine = Engine()
    return _engine


def reset_engine(engine: Engine | None = None) -> None:
    """Replace (or drop) the process-wide engine; tests use it with throwaway plugins."""
    global _engine
    _engine = engine
