"""Per-request adapter routing: the seed's edge pattern (one base model, many task adapters per request).

A batch of requests each names a task adapter (or ``base``). The router loads the adapters missing
from memory out of an adapter store folder, keeps at most ``capacity`` of the ones it loaded (least
recently used goes first), and answers the batch in one ``generate`` call in which PEFT runs a
different adapter on each row (``adapter_names``, left padding). Where PEFT cannot do that (an
adapter type or layer without mixed-batch support) it falls back to one batch per adapter. Each
answer says which adapter served it, whether that adapter had to be loaded (and how long it took)
and how long the switch took.

The host is anything with ``model``, ``tokenizer``, ``adapters`` (the registry) and
``load_adapter(path, name)`` / ``unload_adapter(name)``: the Session.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..errors import FtUsageError, did_you_mean
from .adapters import BASE, activate, validate_name

PEFT_BASE_ROW = "__base__"  # PEFT's name for "no adapter on this row"


@dataclass
class Request:
    prompt: str
    adapter: str = BASE
    max_new_tokens: Optional[int] = None


@dataclass
class Served:
    index: int  # position in the request batch
    adapter: str  # the adapter that answered ("base" for none)
    text: str
    new_tokens: int
    cold: bool  # the adapter was loaded from the store for this batch
    load_ms: float  # time to load it from disk (0 when it was already in memory)
    swap_ms: float  # time to make it the one that runs (0 in a mixed batch: selected per row)
    mode: str  # "mixed" (one forward pass for the whole batch) or "grouped" (one batch per adapter)
    batch_seconds: float  # wall time of the generate call that produced this answer


def as_request(item: Any) -> Request:
    if isinstance(item, Request):
        return item
    if isinstance(item, dict):
        unknown_keys = set(item) - {"prompt", "adapter", "max_new_tokens"}
        if unknown_keys or "prompt" not in item:
            raise FtUsageError(
                f"a request is a dict with 'prompt' and optionally 'adapter', 'max_new_tokens'; got keys {sorted(item)}."
            )
        return Request(item["prompt"], item.get("adapter") or BASE, item.get("max_new_tokens"))
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return Request(prompt=item[1], adapter=item[0] or BASE)
    raise FtUsageError(f"a request is a Request, a dict or an (adapter, prompt) pair; got {type(item).__name__}.")


class AdapterRouter:
    def __init__(self, host, store: str | Path, capacity: int = 4) -> None:
        if capacity < 1:
            raise FtUsageError(f"capacity must be at least 1 adapter in memory (got {capacity}).")
        self.host = host
        self.store = Path(store)
        self.capacity = capacity
        self._lru: OrderedDict = OrderedDict()  # adapters this router loaded, least recently used first
        self.mixed_ok = True  # set False once PEFT refuses a mixed batch on this model

    # ------------------------------------------------------------------ memory
    def in_memory(self) -> list:
        return list(self._lru)

    def _resolve(self, name: str) -> Optional[Path]:
        """None when the adapter is already in the host; else its folder in the store (checked)."""
        if name in self.host.adapters:
            return None
        validate_name(name)
        path = self.store / name
        if not (path / "adapter_config.json").exists():
            known = sorted(p.name for p in self.store.iterdir() if (p / "adapter_config.json").exists()) \
                if self.store.is_dir() else []
            raise FtUsageError(
                f"no adapter {name!r} in memory or in the store {self.store}{did_you_mean(name, known)}. "
                f"Store holds: {', '.join(known) or 'nothing'}."
            )
        return path

    def _ensure(self, name: str, keep: set) -> float:
        """Make ``name`` resident; return the load time in ms (0 if it was resident)."""
        if name in self._lru:
            self._lru.move_to_end(name)
            return 0.0
        if name in self.host.adapters:  # loaded by the user (trained or loaded): pinned, not ours to evict
            return 0.0
        path = self._resolve(name)
        while len(self._lru) >= self.capacity:
            victim = next((n for n in self._lru if n not in keep), None)
            if victim is None:
                break
            self._lru.pop(victim)
            if victim in self.host.adapters:
                self.host.unload_adapter(victim)
        t = time.perf_counter()
        self.host.load_adapter(path, name)
        ms = (time.perf_counter() - t) * 1000.0
        self._lru[name] = None
        return ms

    # ------------------------------------------------------------------ serving
    def serve(self, requests: list, max_new_tokens: int = 64, system: Optional[str] = None) -> list:
        reqs = [as_request(r) for r in requests]
        if not reqs:
            return []
        for r in reqs:
            if not isinstance(r.prompt, str) or not r.prompt.strip():
                raise FtUsageError("every request needs a non-empty prompt.")
        for stale in [n for n in self._lru if n not in self.host.adapters]:  # unloaded by the user meanwhile
            del self._lru[stale]
        needed = list(dict.fromkeys(r.adapter for r in reqs if r.adapter != BASE))
        for name in needed:  # every name checked before any work is done
            self._resolve(name)
        previous = self.host.adapters.active
        out: list = [None] * len(reqs)
        try:
            # adapters the user loaded are pinned; the others count against `capacity`, so they are
            # served in chunks of at most `capacity`, each of which fits in memory at once
            pinned = [n for n in needed if n in self.host.adapters and n not in self._lru]
            routed = [n for n in needed if n not in pinned]
            chunks = [routed[i:i + self.capacity] for i in range(0, len(routed), self.capacity)] or [[]]
            chunks[0] = pinned + chunks[0]
            for i, names in enumerate(chunks):
                rows = [k for k, r in enumerate(reqs) if r.adapter in names or (i == 0 and r.adapter == BASE)]
                if rows:
                    self._serve_chunk(reqs, rows, names, out, max_new_tokens, system)
        finally:
            active = previous if previous in self.host.adapters else None
            if self.host.adapters:
                activate(self.host.model, active)
            self.host.adapters.active = active
        return out

    def _serve_chunk(self, reqs, rows, names: set, out, max_new_tokens, system) -> None:
        from .inference import generate_batch

        loads = {n: self._ensure(n, set(names)) for n in names}
        model, tok = self.host.model, self.host.tokenizer
        limit = max((reqs[k].max_new_tokens or max_new_tokens) for k in rows)
        seen: set = set()

        def record(k, text, n, mode, swap_ms, seconds):
            r = reqs[k]
            first = r.adapter not in seen
            seen.add(r.adapter)
            load_ms = loads.get(r.adapter, 0.0) if first else 0.0
            out[k] = Served(index=k, adapter=r.adapter, text=text, new_tokens=n, cold=load_ms > 0,
                            load_ms=load_ms, swap_ms=swap_ms, mode=mode, batch_seconds=seconds)

        if self.mixed_ok and self.host.adapters and len({reqs[k].adapter for k in rows}) > 1:
            model.base_model.enable_adapter_layers()
            t = time.perf_counter()
            try:
                answers = generate_batch(model, tok, [reqs[k].prompt for k in rows], system=system,
                                         max_new_tokens=limit,
                                         limits=[reqs[k].max_new_tokens or max_new_tokens for k in rows],
                                         adapter_names=[PEFT_BASE_ROW if reqs[k].adapter == BASE else reqs[k].adapter
                                                        for k in rows])
            except (ValueError, TypeError, NotImplementedError):
                self.mixed_ok = False  # this model/adapter kind has no mixed-batch path: group instead
            else:
                seconds = time.perf_counter() - t
                for k, (text, n) in zip(rows, answers):
                    record(k, text, n, "mixed", 0.0, seconds)
                return
        groups: dict = {}
        for k in rows:
            groups.setdefault(reqs[k].adapter, []).append(k)
        for name, ks in groups.items():
            swap_ms = activate(model, name) if self.host.adapters else 0.0
            glimit = max((reqs[k].max_new_tokens or max_new_tokens) for k in ks)
            t = time.perf_counter()
            answers = generate_batch(model, tok, [reqs[k].prompt for k in ks], system=system, max_new_tokens=glimit,
                                     limits=[reqs[k].max_new_tokens or max_new_tokens for k in ks])
            seconds = time.perf_counter() - t
            for k, (text, n) in zip(ks, answers):
                record(k, text, n, "grouped", swap_ms, seconds)

