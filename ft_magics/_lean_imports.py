"""Two imports that load large libraries a QLoRA run never uses, made lean where they first happen.

**bitsandbytes' ``torch.compile`` wrappers.** bitsandbytes 0.50 wraps four functions of its default backend
in ``torch.compile`` as it is imported. Making those wrappers imports torch's whole compiler stack
(``torch._inductor``: about 40 MB of RSS and 0.5 s), whether or not anything is ever compiled, and nothing in
a CPU QLoRA run calls them. So the first import of bitsandbytes in a process (by ft_magics, PEFT or
transformers alike) runs with a ``torch.compile`` that returns a function compiling on its first call: the
same result whenever one is called (bitsandbytes' own fallback to the plain function on a compile error
included), and no compiler stack until then.

**``datasets`` in transformers' Trainer.** ``transformers/trainer.py`` imports ``datasets`` (with pyarrow and
pandas: about 80 MB of RSS) at module level, only to ask ``isinstance(x, datasets.Dataset)`` of the data it
is given. ft_magics hands the Trainer plain map-style datasets. So when ``transformers.trainer`` is imported
before ``datasets`` is, the module's ``datasets`` is :class:`DatasetsWhenImported`: it answers with the real
package's attributes once anything has imported ``datasets``, and before that gives ``Dataset`` and the other
dataset classes as a class nothing is an instance of. That is the exact answer, since no object can be an
instance of a class of a package that was never imported. Any other attribute imports the real package.

Measured on the demo model (20 checkpointed steps, ``benchmarks/bench_training.py``'s ft_magics side): the
compile wrappers, peak RSS 958-975 MB instead of 1034 MB; see the README's benchmark section for both.

:func:`install` (called by ``import ft_magics``) puts one finder in front of ``sys.meta_path``. It acts
once per target, on the target's first import, and removes itself when no target is left; each patch is
undone as soon as that import ends.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.abc
import importlib.util
import sys
import types


def deferred(real_compile):
    """A ``torch.compile`` look-alike: ``deferred(torch.compile)(fn, **kw)`` compiles ``fn`` on its first call."""

    def compile_later(model=None, **kwargs):
        if model is None:  # used as @torch.compile(dynamic=False)
            return lambda fn: compile_later(fn, **kwargs)
        compiled = None

        @functools.wraps(model)
        def run(*args, **kw):
            nonlocal compiled
            if compiled is None:
                compiled = real_compile(model, **kwargs)
            return compiled(*args, **kw)

        return run

    return compile_later


@contextlib.contextmanager
def _compile_deferred():
    import torch

    real_compile = torch.compile
    torch.compile = deferred(real_compile)
    try:
        yield
    finally:
        torch.compile = real_compile


DATASET_CLASSES = frozenset({"Dataset", "IterableDataset", "DatasetDict", "IterableDatasetDict"})


class _NotImported:
    """Stands for a class of a package not imported: nothing is an instance of it."""


class DatasetsWhenImported(types.ModuleType):
    """``datasets`` as seen by a module that only checks what it is given: see the module docstring."""

    def __init__(self) -> None:
        super().__init__("datasets", "ft_magics' stand-in for datasets until it is imported")

    def __getattr__(self, name):
        real = sys.modules.get("datasets")
        if real is None or real is self:
            if name in DATASET_CLASSES:
                return _NotImported
            if sys.modules.get("datasets") is self:  # asked while its module is still being imported
                del sys.modules["datasets"]
            real = importlib.import_module("datasets")
        return getattr(real, name)


@contextlib.contextmanager
def _datasets_when_imported():
    spec = None if "datasets" in sys.modules else importlib.util.find_spec("datasets")
    if spec is None:
        yield  # already paid for, or transformers does not import it
        return
    stand_in = DatasetsWhenImported()
    stand_in.__spec__ = spec  # transformers asks find_spec whether the package is available
    sys.modules["datasets"] = stand_in
    try:
        yield
    finally:
        if sys.modules.get("datasets") is stand_in:  # a later `import datasets` gets the real package
            del sys.modules["datasets"]


PATCHES = {"bitsandbytes": _compile_deferred, "transformers.trainer": _datasets_when_imported}


class _Loader(importlib.abc.Loader):
    """The real loader, with a patch in place while the module (and what it imports) executes."""

    def __init__(self, real, patch):
        self.real, self.patch = real, patch

    def create_module(self, spec):
        return self.real.create_module(spec)

    def exec_module(self, module):
        with self.patch():
            module.__loader__ = self.real  # the package sees its own loader (resources, reloads)
            if module.__spec__ is not None:
                module.__spec__.loader = self.real
            self.real.exec_module(module)

    def __getattr__(self, name):
        return getattr(self.real, name)


class _Finder(importlib.abc.MetaPathFinder):
    def __init__(self) -> None:
        self.pending: set = set()

    def find_spec(self, name, path=None, target=None):
        if name not in self.pending:
            return None
        self.pending.discard(name)
        remove()
        try:
            spec = importlib.util.find_spec(name)  # what the other finders would have found
        finally:
            if self.pending:
                sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _Loader(spec.loader, PATCHES[name])
        return spec


_finder = _Finder()


def install() -> None:
    """Make each target's first import lean, unless it is imported already (or this is installed)."""
    _finder.pending = {name for name in PATCHES if name not in sys.modules}
    if _finder.pending and _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)


def remove() -> None:
    if _finder in sys.meta_path:
        sys.meta_path.remove(_finder)
