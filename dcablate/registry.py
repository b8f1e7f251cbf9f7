"""Registries of the pluggable components: token mixers, channel mixers, conv kinds and tasks.

A component is one file that defines it plus one `register(...)` call with its spec. A spec is plain,
torch-free data (its name, its recipe section, its checks, ...) and names the torch code that builds it
as `"module:attribute"`, imported only when a model or task is built: loading and validating a recipe
never imports torch.

Components outside the package are plugins: the modules named in `DCABLATE_PLUGINS` (comma-separated,
importable from the working directory or the Python path) are imported the first time any registry is
read; each registers its components when imported. Sweep workers and torchrun ranks inherit the
variable, so a plugin works wherever a recipe runs.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
import threading
import traceback
from dataclasses import dataclass
from typing import Callable, Generic, Iterator, TypeVar

from dcablate.errors import UserError

PLUGINS_ENV = "DCABLATE_PLUGINS"

Spec = TypeVar("Spec")

generation = 0  # bumped on every (un)registration: the recipe schema is rebuilt when it changes
_plugins_loaded: set[str] = set()
_importing: list[str] = []  # the plugin modules being imported now, innermost last
_registered_by: dict[tuple[str, str], str] = {}  # (registry, component name) -> the plugin module that registered it
_plugins_lock = threading.RLock()  # re-entrant: a plugin's import reads registries, which load plugins


def load_plugins() -> None:
    """Import the modules named in `DCABLATE_PLUGINS` (once each). Threads of one process (the runs of a packed
    worker) wait for the one importing: a plugin is marked loaded before its import ends, so without the lock
    another thread would read a registry that lacks its components."""
    with _plugins_lock:
        _load_plugins()


def plugin_names() -> list[str]:
    """The modules `DCABLATE_PLUGINS` names, in order."""
    return [n.strip() for n in os.environ.get(PLUGINS_ENV, "").split(",") if n.strip()]


def _load_plugins() -> None:
    for name in plugin_names():
        if name in _plugins_loaded:
            continue
        if name.endswith(".py") or name.startswith(".") or "/" in name or os.sep in name:  # a file, not a module
            raise UserError(f"{PLUGINS_ENV}: cannot import plugin module '{name}'{_module_hint(name)}")
        _plugins_loaded.add(name)
        if "" not in sys.path and os.getcwd() not in sys.path:  # `dcablate` scripts do not put the cwd on the path
            sys.path.append(os.getcwd())
        _importing.append(name)
        try:
            module = importlib.import_module(name)
        except ImportError as e:
            _plugins_loaded.discard(name)
            missing = e.name if isinstance(e, ModuleNotFoundError) else None
            # the plugin itself, not a module it imports (whose own message says which, and the plugin's line)
            itself = missing and (name == missing or name.startswith(missing + "."))
            hint = _module_hint(name) if itself else ""
            frame = None if itself else _plugin_frame(e, name)
            at = f", at {frame.filename}:{frame.lineno}" if frame is not None else ""
            raise UserError(f"{PLUGINS_ENV}: cannot import plugin module '{name}' ({e}){at}{hint}") from None
        except UserError:
            _plugins_loaded.discard(name)
            raise
        except SyntaxError as e:  # its own file and line, not the import machinery's frame
            _plugins_loaded.discard(name)
            raise UserError(f"{PLUGINS_ENV}: plugin module '{name}' failed while importing, at {e.filename}:"
                            f"{e.lineno}: SyntaxError: {e.msg}") from None
        except Exception as e:  # a mistake in the plugin itself (a spec without a field, a name taken): one line
            _plugins_loaded.discard(name)
            frame = _plugin_frame(e, name) or traceback.extract_tb(e.__traceback__)[-1]
            raise UserError(f"{PLUGINS_ENV}: plugin module '{name}' failed while importing, at {frame.filename}:"
                            f"{frame.lineno}: {type(e).__name__}: {e}") from None
        finally:
            _importing.remove(name)
        local = os.path.join(os.getcwd(), f"{name}.py")
        origin = getattr(module, "__file__", None)
        if "." not in name and os.path.isfile(local) and (not origin or not os.path.samefile(origin, local)):
            _plugins_loaded.discard(name)  # a module of the same name came first on the path (the standard library's)
            raise UserError(f"{PLUGINS_ENV}: plugin module '{name}' is also the name of another module "
                            f"({origin or 'built into Python'}), which was imported instead of {local}; rename your "
                            f"file (and the name in {PLUGINS_ENV})")


def _plugin_frame(error: BaseException, name: str):
    """The frame of `error`'s traceback in the plugin module `name`'s own file (its call of register_mixer, its
    import of a missing package), else the innermost outside dcablate and Python's import machinery and standard
    library; None when there is none."""
    frames = traceback.extract_tb(error.__traceback__)
    # its file by the module's name (finding its spec would import a dotted module's packages again)
    tails = (os.path.join(*name.split(".")) + ".py", os.path.join(*name.split("."), "__init__.py"))
    own = [f for f in frames if os.path.abspath(f.filename).endswith(tuple(os.sep + t for t in tails))]
    if own:
        return own[-1]
    skipped = (os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.__file__))
    outside = [f for f in frames if not f.filename.startswith("<frozen")
               and not os.path.abspath(f.filename).startswith(skipped)]
    return outside[-1] if outside else None


def plugins_registering() -> set[str]:
    """The plugin modules that registered at least one component."""
    return set(_registered_by.values())


def plugin_of(registry: str, name: str) -> str | None:
    """The `DCABLATE_PLUGINS` module that registered component `name` of `registry` (its `what`: "conv kind",
    "task", ...), None for the package's own (or one registered outside a plugin's import)."""
    return _registered_by.get((registry, name))


def _module_hint(name: str) -> str:
    """What to write instead of `name`, a plugin module that cannot be found: a module name for a file's path,
    commas between names, a module of the working directory spelt alike, or where modules are looked for."""
    from pathlib import Path

    from dcablate.errors import did_you_mean

    if name.endswith(".py") or "/" in name or os.sep in name:
        path = Path(name)
        folder = path.parent.resolve()
        place = "" if folder == Path.cwd().resolve() else f", with {folder} on PYTHONPATH"
        return f"; name a module, not a file: {PLUGINS_ENV}={path.stem.split('.')[0]}{place}"
    if any(c.isspace() for c in name):
        return f"; separate modules with commas: {PLUGINS_ENV}={','.join(name.split())}"
    close = did_you_mean(name, sorted(p.stem for p in Path.cwd().glob("*.py")))
    return close or f"; plugin modules are imported from the working directory ({os.getcwd()}) or PYTHONPATH"


def core_keys(where: str, core: str) -> Callable[[], tuple[str, str]]:
    """A registry's `section_keys`: the recipe section `where` and the keys of its schema class `core` (read when a
    component registers: the schema imports the registries)."""
    def keys() -> tuple[str, str]:
        from dcablate.config import schema

        return where, " ".join(f.name for f in dataclasses.fields(getattr(schema, core)))
    return keys


def _no_check(recipe, fail) -> None:
    pass


@dataclass(frozen=True)
class ComponentSpec:
    """What every registered component declares (the registries' own specs add to it).

    name         the recipe value that selects it (`model.mixer`, `model.ffn`, `model.conv.kind`, `task.kind`)
    impl         the class that implements it, or `"module:Class"` (imported when it is built), or None
                 where the name means "nothing" (`ffn = "none"`, `conv.kind = "none"`)
    options      the dataclass of its own recipe section (`model.<name>`, `task.<name>`), or None
    options_doc  that section's one-line doc
    check        `(recipe, fail) -> None`: choices valid alone but not together; calls `fail(key, message)`
                 with the dotted recipe key at fault"""
    name: str
    impl: object
    options: type | None = None
    options_doc: str = ""
    check: Callable = _no_check


def check_spec(spec, what: str) -> None:
    """A ValueError when a recipe could not select or configure `spec`: its name must be a Python identifier (it
    names the recipe section `[model.<name>]` or `[task.<name>]`), and every field of its options dataclass needs a
    default (a recipe that leaves the section out gets the defaults)."""
    if not isinstance(spec.name, str) or not spec.name.isidentifier():
        raise ValueError(f"a {what} is named {spec.name!r}, which cannot name a recipe section: use letters, digits "
                         f"and underscores, not starting with a digit (e.g. {_identifier(spec.name)!r})")
    options = getattr(spec, "options", None)
    if options is None:
        return
    if not dataclasses.is_dataclass(options):
        raise ValueError(f"{what} {spec.name!r}: options must be a dataclass (its recipe section's keys), got "
                         f"{options!r}")
    bare = [f.name for f in dataclasses.fields(options)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if bare:
        raise ValueError(f"{what} {spec.name!r}: option{'s' if len(bare) > 1 else ''} {', '.join(bare)} of "
                         f"{options.__name__} need{'' if len(bare) > 1 else 's'} a default (a recipe without the "
                         f"section uses the defaults; `dcablate.config.fields.option(default, doc)`)")


def _identifier(name) -> str:
    out = "".join(c if c.isalnum() or c == "_" else "_" for c in str(name)) or "my_component"
    return out if not out[0].isdigit() else f"_{out}"


def resolve(target):
    """A `"module:attribute"` reference -> the attribute; anything else is returned as it is."""
    if not isinstance(target, str):
        return target
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


def checked_impl(spec, key: str, problem: Callable) -> type:
    """The class `spec.impl` names, imported and checked: a UserError naming `key = 'name'` when it cannot be
    imported, fails while importing, or `problem(cls)` says what keeps it from the registry's interface."""
    from dcablate.errors import UserError

    name = spec.name
    try:
        cls = resolve(spec.impl)
    except (ImportError, AttributeError) as e:
        raise UserError(f"{key} = {name!r}: its class {spec.impl!r} cannot be imported: {e}") from None
    except Exception as e:  # its module fails while importing (a SyntaxError, a NameError at its top level)
        raise UserError(f"{key} = {name!r}: importing {spec.impl!r} failed: {type(e).__name__}: {e}") from None
    why = problem(cls)
    if why:
        raise UserError(f"{key} = {name!r}: {why}")
    return cls


class Registry(Generic[Spec]):
    """Specs by name, in registration order: the package's own first, then the plugins'. `builtins` names
    the torch-free modules whose import registers the package's own components; they are imported on the
    first read, by name, so that they may import the registry without an import cycle. `impl_problem(class)`:
    what keeps a spec's class from implementing the registry's interface (None: fine), checked on registration."""

    def __init__(self, what: str, builtins: tuple[str, ...], impl_problem: Callable | None = None,
                 section_keys: Callable[[], tuple[str, str]] | None = None):
        self.what, self.builtins = what, builtins
        self.impl_problem = impl_problem  # (class) -> what keeps it from implementing the interface, or None
        # () -> (the recipe section its components' sections sit in, e.g. "model.conv"; the section's own keys, space-
        # separated): a component named as one of those keys would replace it
        self.section_keys = section_keys
        self._specs: dict[str, Spec] = {}
        self._rank: dict[str, int] = {}  # name -> the index in `builtins` of the module that registered it
        self._sorted = True  # `_specs` is in the order of `_rank`, then of registration
        self._in_builtins = False  # importing `builtins` now

    def register(self, spec: Spec, replace: bool = False) -> Spec:
        """Add `spec` (anything with a `name`); a second spec of the same name is an error unless `replace`, and so
        is a spec a recipe could not name or configure (`check_spec`)."""
        global generation
        if _importing:  # a plugin's spec comes after the package's own, whichever registry was read first
            self._import_builtins()
        if spec.name in self._specs and not replace:
            raise ValueError(f"a {self.what} named {spec.name!r} is already registered")
        check_spec(spec, self.what)
        if self.section_keys is not None:
            where, keys = self.section_keys()
            if spec.name in keys.split():
                raise ValueError(f"a {self.what} is named {spec.name!r}, as a key of [{where}] is; give it another name")
        if self.impl_problem is not None and isinstance(spec.impl, type):  # "module:Class": checked when built
            problem = self.impl_problem(spec.impl)
            if problem:
                raise ValueError(f"{self.what} {spec.name!r}: {problem}")
        self._specs[spec.name] = spec
        if spec.name not in self._rank:  # a replaced spec keeps its place
            self._rank[spec.name] = self._builtin_rank()
        self._sorted = False
        if _importing:
            _registered_by[(self.what, spec.name)] = _importing[-1]
        else:
            _registered_by.pop((self.what, spec.name), None)
        generation += 1
        return spec

    def unregister(self, name: str) -> None:
        global generation
        del self._specs[name]
        self._rank.pop(name, None)
        generation += 1

    def _builtin_rank(self) -> int:
        """The index in `builtins` of the module whose import is registering a spec now (its frame on the stack),
        or one past them for any other caller (a plugin, a test): the package's own components keep the order of
        `builtins` even when code imports one of their modules before the registry is first read."""
        frame = sys._getframe(2)
        while frame is not None:
            name = frame.f_globals.get("__name__")
            if name in self.builtins:
                return self.builtins.index(name)
            frame = frame.f_back
        return len(self.builtins)

    def _import_builtins(self) -> None:
        """Import the modules that register the package's own components, in order (so their components keep
        it); a registration while they import does not start this again."""
        if self._in_builtins:
            return
        self._in_builtins = True
        try:
            for module in self.builtins:
                importlib.import_module(module)
        finally:
            self._in_builtins = False

    def _ready(self) -> dict[str, Spec]:
        self._import_builtins()
        load_plugins()
        if not self._sorted:  # a stable sort: within one rank, the order of registration
            self._specs = dict(sorted(self._specs.items(), key=lambda item: self._rank[item[0]]))
            self._sorted = True
        return self._specs

    def names(self) -> tuple[str, ...]:
        return tuple(self._ready())

    def specs(self) -> list[Spec]:
        return list(self._ready().values())

    def get(self, name: str) -> Spec:
        try:
            return self._ready()[name]
        except KeyError:  # the recipe schema checks choices first; this is for code that asks directly
            raise KeyError(f"no {self.what} named {name!r}; registered: {', '.join(self._specs)}") from None

    def __contains__(self, name: str) -> bool:
        return name in self._ready()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


class Names:
    """The names in a registry as a recipe field's `choices`: read when a recipe is checked, so plugins
    registered after the schema was written count. `loader` returns the registry (imported lazily: the
    registries import the schema's field helper)."""

    def __init__(self, loader: Callable[[], Registry]):
        self.loader = loader

    def __iter__(self) -> Iterator[str]:
        return iter(self.loader().names())

    def __contains__(self, name) -> bool:
        return name in self.loader()

    def __len__(self) -> int:
        return len(self.loader().names())
