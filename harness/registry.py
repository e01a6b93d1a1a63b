"""The method registry: in-tree methods and pip-installed plugins, found by name.

In-tree methods live in the ``methods`` package and register with ``@register_method`` when their
module is imported; the registry imports that package's modules lazily, the first time a name is
looked up, so importing ``harness`` stays cheap and free of side effects. Third-party methods
come from the ``ptqbench.methods`` entry-point group: a plugin package declares, in its
pyproject.toml::

    [project.entry-points."ptqbench.methods"]
    mymethod = "my_package.module:MyMethod"

and ``ptqbench methods`` lists it after ``pip install``.
"""
from __future__ import annotations

import importlib
import logging
import pkgutil
from importlib.metadata import entry_points

from harness.errors import UnknownNameError, did_you_mean
from harness.method import Method

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "ptqbench.methods"
BUILTIN_PACKAGE = "methods"


class MethodRegistry:
    def __init__(self) -> None:
        self._methods: dict[str, type[Method]] = {}
        self._sources: dict[str, str] = {}
        self._loaded = False
        self.load_errors: dict[str, str] = {}

    def register(self, cls: type[Method], source: str = "builtin") -> type[Method]:
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise TypeError(f"{cls!r} is not a subclass of harness.Method")
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise TypeError(f"{cls.__qualname__} has no `name`")
        existing = self._methods.get(name)
        if existing is not None and existing is not cls:
            raise ValueError(f"method name {name!r} is already registered by {existing.__module__}.{existing.__qualname__}")
        self._methods[name] = cls
        self._sources[name] = source
        return cls

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        try:
            package = importlib.import_module(BUILTIN_PACKAGE)
        except ModuleNotFoundError:
            log.debug("no in-tree methods package")
        else:
            for module in pkgutil.iter_modules(package.__path__):
                name = f"{BUILTIN_PACKAGE}.{module.name}"
                try:
                    importlib.import_module(name)
                except Exception as err:  # one broken method file must not hide the others
                    self.load_errors[name] = f"{err.__class__.__name__}: {err}"
                    log.error("built-in method module %s failed to import: %s", name, err)
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            try:
                obj = ep.load()  # importing the module may already have registered it via the decorator
                if not (isinstance(obj, type) and issubclass(obj, Method)):
                    raise TypeError(f"entry point {ep.value!r} is not a harness.Method subclass")
                self.register(obj, source=f"plugin {ep.value}")
            except Exception as err:  # a broken plugin must not take the built-ins down with it
                self.load_errors[ep.name] = f"{err.__class__.__name__}: {err}"
                log.error("method plugin %r (%s) failed to load: %s", ep.name, ep.value, err)

    def get(self, name: str) -> type[Method]:
        self._load()
        if name not in self._methods:
            raise UnknownNameError(
                f"method {name!r}: unknown{did_you_mean(name, self.names())}; registered: {', '.join(self.names())}"
            )
        return self._methods[name]

    def names(self) -> list[str]:
        self._load()
        return sorted(self._methods)

    def source(self, name: str) -> str:
        self._load()
        return self._sources[name]

    def packages(self) -> set[str]:
        """Top-level packages of the registered methods (``methods`` and each plugin's package)."""
        self._load()
        return {cls.__module__.split(".")[0] for cls in self._methods.values()}

    def default_baseline(self) -> type[Method]:
        """The baseline a sweep gets when it lists none: the built-in one (``is_baseline``), else the only one."""
        self._load()
        baselines = [cls for name, cls in self._methods.items() if cls.is_baseline]
        builtin = [cls for cls in baselines if self._sources[cls.name] == "builtin"]
        if builtin or len(baselines) == 1:
            return (builtin or baselines)[0]
        found = ", ".join(c.name for c in baselines) or "none"
        raise UnknownNameError(f"methods: no default baseline method is registered (baselines: {found}); list one in the sweep")


REGISTRY = MethodRegistry()


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator that adds a method to the registry under ``cls.name``."""
    module = cls.__module__
    return REGISTRY.register(cls, source="builtin" if module.startswith(BUILTIN_PACKAGE + ".") else module)


def get_method(name: str) -> type[Method]:
    return REGISTRY.get(name)
