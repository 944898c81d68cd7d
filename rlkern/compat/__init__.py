"""Drop-in parity with the RL frameworks: the peers' function names, signatures, defaults and
numerics, computed by rlkern.ops.

``rlkern.compat.verl``, ``rlkern.compat.trl`` and ``rlkern.compat.openrlhf`` can be called directly,
or swapped into an installed framework so an existing trainer runs on rlkern without code changes::

    import rlkern.compat
    rlkern.compat.patch("verl")     # verl.trainer.ppo.core_algos.compute_gae_advantage_return -> rlkern
    ...
    rlkern.compat.unpatch("verl")   # every replaced attribute is restored to the very same object

``patch`` replaces each target attribute listed in the shim module's ``PATCH_TARGETS`` (entries
``(module, attribute, shim name)``; ``attribute`` may be ``Class.method``), then every other already
imported module of the peer package that holds the same original object under any name (``from x
import f`` copies the function into the importer's namespace, so patching only the defining module
would miss it), and every registry dict listed in ``PATCH_REGISTRIES`` whose value is an original
(verl looks estimators and policy losses up by name in such dicts). Targets the installed version
does not have are skipped, so one shim module serves several releases of its peer;
``patch(name, strict=True)`` raises instead when the installed release has none of them.

A shim object marked with :func:`wraps_original` is a factory: ``patch`` calls it with the original
and installs what it returns as is (a plain function on a class becomes a method). That is how
rlkern takes over a method TRL really calls (``GRPOTrainer._compute_loss``) while keeping the
original for the options rlkern does not fuse.

``unpatch`` also restores the modules of the peer imported while it was patched: a ``from module
import f`` executed then copied the replacement into the importer's namespace.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

__all__ = ["patch", "unpatch", "is_patched", "wraps_original", "PEERS"]

PEERS = ("verl", "trl", "openrlhf")

# peer -> list of (owner object, attribute name, original raw value), in the order they were replaced.
_saved: dict[str, list[tuple[object, str, object]]] = {}
# peer -> list of (registry dict, key, original value).
_saved_registry: dict[str, list[tuple[dict, object, object]]] = {}
# peer -> {id(replacement): original}, to find replacements copied by modules imported while patched.
_replacements: dict[str, dict[int, object]] = {}


def _check_peer(name) -> str:
    if name not in PEERS:
        raise ValueError(f"name must be one of {PEERS}, got {name!r}")
    return name


def _shim_module(name: str) -> ModuleType:
    return importlib.import_module(f"rlkern.compat.{name}")


def _import_peer_root(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name is not None and err.name != name:
            raise  # the peer is installed but one of its own dependencies is missing: say so unchanged
        raise ImportError(
            f"rlkern.compat.patch({name!r}) needs the package {name!r}, which is not installed here; "
            f"install it (pip install {name}) or call the shims in rlkern.compat.{name} directly") from err


def _import_target_module(path: str) -> ModuleType | None:
    """The module at ``path``, or None when this release of the peer has no such module."""
    try:
        return importlib.import_module(path)
    except ModuleNotFoundError as err:
        # Only "this module does not exist" means "not in this release"; a missing third-party
        # dependency of an existing module is a real error and propagates.
        if err.name is not None and (path == err.name or path.startswith(err.name + ".")):
            return None
        raise


def _resolve_owner(module: ModuleType, dotted: str) -> tuple[object, str] | None:
    """(owner, attribute) for ``attr`` or ``Class.method``; None if this release lacks it."""
    *path, attr = dotted.split(".")
    owner: object = module
    for part in path:
        owner = getattr(owner, part, None)
        if owner is None:
            return None
    if isinstance(owner, type):
        return (owner, attr) if attr in owner.__dict__ else None
    return (owner, attr) if hasattr(owner, attr) else None


def _raw(owner: object, attr: str) -> object:
    # For a class, read the raw descriptor (a staticmethod stays a staticmethod) so that unpatch puts
    # back exactly what was there; for a module, the attribute itself.
    return owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)


def wraps_original(factory):
    """Marks ``factory(original) -> replacement`` as a wrapping shim for :func:`patch`."""
    factory.__rlkern_wraps_original__ = True
    return factory


def _as_replacement(owner: object, original: object, shim):
    if getattr(shim, "__rlkern_wraps_original__", False):
        return shim(original)
    # A method that the peer calls as self.method(...) is replaced by a staticmethod wrapping the
    # shim (which has the method's signature minus self), so the call still binds correctly.
    if isinstance(owner, type) and not isinstance(original, type):
        return staticmethod(shim)
    return shim


def is_patched(name: str) -> bool:
    """Whether ``patch(name)`` is in effect."""
    return _check_peer(name) in _saved


def _names(saved) -> list[str]:
    return [f"{getattr(o, '__module__', '') + '.' if isinstance(o, type) else ''}"
            f"{getattr(o, '__name__', o)}.{a}" for o, a, _ in saved]


def patch(name: str, strict: bool = False) -> list[str]:
    """Replace the installed peer's functions by rlkern's shims; returns the ``module.attribute``
    names that were replaced (exactly those, and each once per owner it was found in). Calling it
    again while patched changes nothing and returns the same list.

    Raises:
        ValueError: ``name`` is not one of ``PEERS``.
        ImportError: the peer package is not installed (the message names it).
        RuntimeError: ``strict`` and the installed release has none of the targets.
    """
    _check_peer(name)
    if name in _saved:
        return _names(_saved[name])
    _import_peer_root(name)
    shim = _shim_module(name)
    saved: list[tuple[object, str, object]] = []
    saved_registry: list[tuple[dict, object, object]] = []
    originals: dict[int, object] = {}  # id(original function) -> shim replacement
    replaced = _replacements.setdefault(name, {})  # id(replacement) -> original, for unpatch
    try:
        for module_path, dotted, shim_name in shim.PATCH_TARGETS:
            module = _import_target_module(module_path)
            found = None if module is None else _resolve_owner(module, dotted)
            if found is None:
                continue
            owner, attr = found
            original = _raw(owner, attr)
            # Two targets naming one object (a re-export) get one replacement, so a wrapping shim
            # wraps it once.
            replacement = originals.get(id(original))
            if replacement is None:
                replacement = _as_replacement(owner, original, getattr(shim, shim_name))
            setattr(owner, attr, replacement)
            saved.append((owner, attr, original))
            if not isinstance(owner, type):
                originals[id(original)] = replacement
                replaced[id(replacement)] = original
        # Modules that copied an original with `from module import name` (only those already
        # imported: later imports read the patched attribute of the defining module).
        for mod_name, module in list(sys.modules.items()):
            if module is None or not (mod_name == name or mod_name.startswith(name + ".")):
                continue
            for attr, value in list(vars(module).items()):
                if id(value) in originals and not any(o is module and a == attr for o, a, _ in saved):
                    setattr(module, attr, originals[id(value)])
                    saved.append((module, attr, value))
        for module_path, registry_name in getattr(shim, "PATCH_REGISTRIES", ()):
            module = _import_target_module(module_path)
            registry = None if module is None else getattr(module, registry_name, None)
            if not isinstance(registry, dict):
                continue
            for key, value in list(registry.items()):
                if id(value) in originals:
                    registry[key] = originals[id(value)]
                    saved_registry.append((registry, key, value))
    except BaseException:
        _restore(saved, saved_registry)
        _replacements.pop(name, None)
        raise
    if strict and not saved:
        _replacements.pop(name, None)
        import importlib.metadata

        raise RuntimeError(f"rlkern.compat.patch({name!r}, strict=True): the installed {name} "
                           f"{importlib.metadata.version(name)} has none of the targets in "
                           f"rlkern.compat.{name}.PATCH_TARGETS")
    _saved[name] = saved
    _saved_registry[name] = saved_registry
    return _names(saved)


def _restore(saved, saved_registry) -> None:
    # Only entries that were actually replaced are recorded, so each restore writes back a value the
    # owner already accepted once; every entry is attempted even if one fails, then the first error
    # is raised.
    errors = []
    for registry, key, value in reversed(saved_registry):
        try:
            registry[key] = value
        except Exception as err:  # noqa: BLE001 (reported below after the other entries are restored)
            errors.append(err)
    for owner, attr, original in reversed(saved):
        try:
            setattr(owner, attr, original)
        except Exception as err:  # noqa: BLE001
            errors.append(err)
    if errors:
        raise errors[0]


def unpatch(name: str) -> list[str]:
    """Undo ``patch(name)``: every replaced attribute and registry entry gets back the very object
    it held before. Returns the names restored (empty when ``name`` was not patched)."""
    _check_peer(name)
    saved = _saved.pop(name, [])
    saved_registry = _saved_registry.pop(name, [])
    late = _late_copies(name, _replacements.pop(name, {}), saved)
    _restore(saved + late, saved_registry)
    return _names(saved + late)


def _late_copies(name: str, replacements: dict[int, object], saved) -> list[tuple[object, str, object]]:
    """(module, attribute, original) for every module of the peer that holds a replacement it was not
    recorded as holding: it imported the replacement while the patch was in effect."""
    if not replacements:
        return []
    recorded = {(id(o), a) for o, a, _ in saved}
    late = []
    for mod_name, module in list(sys.modules.items()):
        if module is None or not (mod_name == name or mod_name.startswith(name + ".")):
            continue
        for attr, value in list(vars(module).items()):
            if id(value) in replacements and (id(module), attr) not in recorded:
                late.append((module, attr, replacements[id(value)]))
    return late
