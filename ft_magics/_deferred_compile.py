"""bitsandbytes' ``torch.compile`` wrappers, made when first called instead of when bitsandbytes is imported.

bitsandbytes 0.50 wraps four functions of its default backend in ``torch.compile`` as it is imported. Making
those wrappers imports torch's whole compiler stack (``torch._inductor``: about 40 MB of RSS and 0.5 s),
whether or not anything is ever compiled, and nothing in a CPU QLoRA run calls them. So the first import of
bitsandbytes in a process (by ft_magics, PEFT or transformers alike) runs with a ``torch.compile`` that
returns a function compiling on its first call: the same result whenever one is called (bitsandbytes' own
fallback to the plain function on a compile error included), and no compiler stack until then.

Measured on the demo model (20 checkpointed steps, ``benchmarks/bench_training.py``'s ft_magics side): peak
RSS 958-975 MB instead of 1034 MB, RSS of the libraries before training 434 MB instead of 476 MB.

:func:`install` (called by ``import ft_magics``) puts a finder in front of ``sys.meta_path`` that acts once,
on the first import of bitsandbytes, and then removes itself; ``torch.compile`` is itself again as soon as
that import ends.
"""
from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import sys

TARGET = "bitsandbytes"


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


class _Loader(importlib.abc.Loader):
    """The real loader, with ``torch.compile`` deferred while the package (and what it imports) executes."""

    def __init__(self, real):
        self.real = real

    def create_module(self, spec):
        return self.real.create_module(spec)

    def exec_module(self, module):
        import torch

        real_compile = torch.compile
        torch.compile = deferred(real_compile)
        try:
            module.__loader__ = self.real  # the package sees its own loader (resources, reloads)
            if module.__spec__ is not None:
                module.__spec__.loader = self.real
            self.real.exec_module(module)
        finally:
            torch.compile = real_compile

    def __getattr__(self, name):
        return getattr(self.real, name)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != TARGET:
            return None
        remove()
        spec = importlib.util.find_spec(name)  # what the other finders would have found
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _Loader(spec.loader)
        return spec


_finder = _Finder()


def install() -> None:
    """Defer bitsandbytes' compile wrappers, unless bitsandbytes is already imported (or this is installed)."""
    if TARGET not in sys.modules and _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)


def remove() -> None:
    if _finder in sys.meta_path:
        sys.meta_path.remove(_finder)
