"""Per-request adapter routing: the seed's edge pattern (one base model, many task adapters per request).

A batch of requests each names a task adapter (or ``base``). The router loads the adapters missing
from memory out of an adapter store folder into at most ``capacity`` slots (PEFT adapters named
``ft-slot-K``), and answers the batch in one ``generate`` call in which PEFT runs a different adapter
on each row (``adapter_names``, left padding). When every slot is taken, the least recently used
slot is *hot-swapped*: PEFT's ``hotswap_adapter`` copies the new adapter's weights from disk into the
slot's existing tensors, which is far cheaper than creating 200-odd LoRA modules; an adapter that does
not fit the slot (other target modules) replaces it the slow way. Where PEFT cannot do that (an
adapter type or layer without mixed-batch support) it falls back to one batch per adapter. Each
answer says which adapter served it, whether that adapter had to be loaded (and how long it took)
and how long the switch took.

The host is anything with ``model``, ``tokenizer``, ``adapters`` (the registry) and
``load_adapter(path, name)`` / ``unload_adapter(name)``: the Session.
"""
from __future__ import annotations

import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..errors import FtUsageError, did_you_mean
from .adapters import BASE, SLOT_PREFIX, activate, folder_stamp, uses_dora, validate_name

PEFT_BASE_ROW = "__base__"  # PEFT's name for "no adapter on this row"
DEFAULT_CAPACITY = 4  # slots a router holds unless a call says otherwise


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
    how: str = "resident"  # loaded | hot-swapped | reloaded | refreshed (cold); resident | pinned (session's own) | base


def as_requests(requests: Any) -> list:
    """A batch of requests (any iterable of what :func:`as_request` takes) as a list of Request."""
    if isinstance(requests, (str, bytes, dict, Request)) or not hasattr(requests, "__iter__"):
        raise FtUsageError(f"requests is a list of requests, e.g. [('support', 'Where is my order?'), "
                           f"{{'adapter': 'sql', 'prompt': 'Count the users'}}] (got {type(requests).__name__}).")
    return [as_request(r) for r in requests]


def _request_adapter(name: Any) -> str:
    """A request's adapter: None is the base model; a name is text, and an empty one is a caller's slip, not
    a wish for the base (it was answered by the base without a word)."""
    if name is None:
        return BASE
    if not isinstance(name, str) or not name.strip():
        raise FtUsageError(f"a request's adapter is an adapter's name, or 'base' (or None) for the base model; got "
                           f"{name!r}.")
    return name.strip()


def as_request(item: Any) -> Request:
    if isinstance(item, Request):
        return item
    if isinstance(item, dict):
        unknown_keys = set(item) - {"prompt", "adapter", "max_new_tokens"}
        if unknown_keys or "prompt" not in item:
            raise FtUsageError(
                f"a request is a dict with 'prompt' and optionally 'adapter', 'max_new_tokens'; got keys {sorted(item)}."
            )
        limit = item.get("max_new_tokens")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise FtUsageError(f"a request's max_new_tokens must be a whole number >= 1 (got {limit!r}); leave it out "
                               "for the batch's.")
        return Request(item["prompt"], _request_adapter(item.get("adapter")), limit)
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return Request(prompt=item[1], adapter=_request_adapter(item[0]))
    what = (f"a {type(item).__name__} of {len(item)} items" if isinstance(item, (tuple, list))
            else f"a {type(item).__name__}")
    raise FtUsageError(f"a request is a Request, a dict or an (adapter, prompt) pair; got {what}. A request with its "
                       "own answer length: {'adapter': NAME, 'prompt': TEXT, 'max_new_tokens': N}.")


_REQUEST_LINE = re.compile(r"^\s*([^\s:][^:]*?)\s*:(.*)$")


def requests_of_text(text: str, store: Optional[Path] = None) -> list:
    """The requests a ``%%lora_serve`` cell writes: one per line, ``ADAPTER: prompt`` (``base: ...`` for the base
    model), or, where the cell has lines of ``---``, one per block between them, whose first line starts
    ``ADAPTER:`` and whose other lines continue the prompt, ``#`` lines included. Lines starting ``#`` outside a
    prompt are comments. ``store``: the adapters' folder, where a name with a space may be a copied folder's."""
    lines = text.splitlines()
    blocked = any(ln.strip() == "---" for ln in lines)
    blocks, block = [], []
    for n, ln in enumerate(lines, 1):
        # in a block, a prompt's own '#' lines (code comments, headings) are its text: only one before the block's
        # request line is a comment; one request per line, every '#' line is
        if ln.lstrip().startswith("#") and not (blocked and any(t.strip() for _, t in block)):
            continue
        if ln.strip() == "---" or not blocked:
            if block:
                blocks.append(block)
            block = [] if ln.strip() == "---" else [(n, ln)]
        else:
            block.append((n, ln))
    if block:
        blocks.append(block)
    out = []
    for block in blocks:
        while block and not block[0][1].strip():
            block = block[1:]
        if not block:
            continue
        n, first = block[0]
        m = _REQUEST_LINE.match(first)
        spaced = m.group(1).strip() if m is not None and " " in m.group(1).strip() else None
        if spaced and store is not None and (Path(store) / spaced / "adapter_config.json").is_file():
            from .adapters import name_from_folder  # 'alpha copy': a folder a file manager copied

            name = name_from_folder(spaced)
            raise FtUsageError(
                f"request {len(out) + 1} ({first.strip()[:60]!r}) names the folder {spaced!r}, but an adapter name "
                f"has no spaces: load it with %lora_adapters load \"{Path(store) / spaced}\" --name {name} (or rename "
                f"the folder), then write '{name}: ...'.")
        if m is None or spaced:
            raise FtUsageError(
                f"request {len(out) + 1} ({first.strip()[:60]!r}) names no adapter: write each request as ADAPTER: "
                "PROMPT, e.g. 'support-bot: How do I reset my password?' (base: PROMPT for the base model)"
                + ("; a prompt of several lines goes between lines of ---." if not blocked else "."))
        prompt = "\n".join([m.group(2).strip()] + [ln for _, ln in block[1:]]).strip()
        out.append(Request(prompt=prompt, adapter=m.group(1).strip()))
    if not out:
        raise FtUsageError("no request in the cell: write one per line as ADAPTER: PROMPT, e.g.\n%%lora_serve\n"
                           "support-bot: How do I reset my password?\nbase: What is LoRA?")
    return out


_HOW = {"loaded": "loaded from the store", "hot-swapped": "hot-swapped into a slot", "reloaded": "reloaded into a slot",
        "resident": "in memory", "pinned": "loaded in the session", "base": "base model",
        "refreshed": "loaded in the session, read again from its rewritten folder"}


def served_text(requests: list, served: list) -> str:
    """``%%lora_serve``'s output: each request's adapter, how it was found and at what cost, its prompt and
    answer; then the batches the answers took and their speed."""
    from .events import counted

    lines = []
    for req, s in zip(requests, served):
        cost = f" in {s.load_ms:.0f} ms" if s.cold else ""
        prompt = " ".join(req.prompt.split())
        lines.append(f"[{s.adapter} · {_HOW.get(s.how, s.how)}{cost} · {counted(s.new_tokens, 'token')}] "
                     f"{prompt if len(prompt) <= 80 else prompt[:77] + '...'}")
        lines += ["  " + t for t in (s.text.strip() or "(an empty answer)").splitlines()]
    calls = {(s.mode, s.batch_seconds) for s in served}  # one per generate call: its rows share its time
    seconds = sum(t for _, t in calls)
    tokens = sum(s.new_tokens for s in served)
    modes = "one mixed batch" if len(calls) == 1 and served[0].mode == "mixed" else (
        f"{counted(len(calls), 'batch')}, " + ("one per adapter" if all(s.mode == "grouped" for s in served)
                                                          else "mixed where they could be"))
    lines.append(f"({counted(len(served), 'request')} in {modes}: {seconds:.1f} s, "
                 f"{tokens / seconds if seconds else 0:.1f} tokens/s)")
    return "\n".join(lines)


def remove_adapter_name_hooks(model) -> int:
    """Remove the pre-forward hooks through which PEFT's mixed-adapter batches pass ``adapter_names`` to each
    LoRA layer; returns how many there were.

    PEFT (0.21) registers them for one ``generate`` and removes them after it only when it succeeds (its
    ``_enable_peft_forward_hooks`` has no ``finally``). After a refused mixed batch every later forward got
    the refused batch's names: generation then failed ("Length of `adapter_names` should be the same as the
    number of inputs") or, at the same batch size, ran the wrong adapter on each row.
    """
    n = 0
    for module in model.modules():
        hooks = getattr(module, "_forward_pre_hooks", None)
        if not hooks:
            continue
        for key in [k for k, h in hooks.items()
                    if getattr(getattr(h, "func", None), "__name__", "") == "_adapter_names_pre_forward_hook"]:
            del hooks[key]
            module._forward_pre_hooks_with_kwargs.pop(key, None)
            n += 1
    return n


_MAGNITUDE_RE = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?$")
_SAME_SETTINGS = ("use_rslora", "use_dora", "lora_bias", "fan_in_fan_out", "peft_type")


def fill_slot(model, slot: str, path: Path) -> bool:
    """Copy the adapter at ``path`` into the existing LoRA tensors of adapter ``slot``; False (and nothing
    changed) when it does not fit them (other modules, rank, or settings that change the computation).

    This is what ``peft.utils.hotswap.hotswap_adapter`` does (weights copied in place, scaling updated),
    checked against the slot's own layers instead of a full ``model.state_dict()``, which on a 4-bit
    model repacks every quantisation state and costs more than the whole copy.
    """
    import math

    import torch
    from peft import LoraConfig
    from safetensors.torch import load_file

    from .adapters import _KEY_RE, named_lora_layers

    new = LoraConfig.from_pretrained(str(path))
    old = model.peft_config[slot]
    if any(getattr(new, k, None) != getattr(old, k, None) for k in _SAME_SETTINGS) or \
            new.rank_pattern or new.alpha_pattern or old.rank_pattern or old.alpha_pattern:
        return False
    layers = {n: l for n, l in named_lora_layers(model).items() if slot in l.lora_A}
    weights = Path(path) / "adapter_model.safetensors"
    try:
        state = load_file(str(weights))
    except Exception as exc:  # noqa: BLE001 - any parse failure is a corrupt file
        raise FtUsageError(f"{weights} is corrupt or truncated ({type(exc).__name__}: {exc}).") from None
    pairs, covered = [], set()
    for key, tensor in state.items():
        m = _KEY_RE.match(key) or _MAGNITUDE_RE.match(key)
        layer = layers.get("base_model.model." + m.group("module")) if m else None
        if layer is None:
            return False
        part = m.groupdict().get("ab", "m")
        if part == "m":  # DoRA's magnitude vector
            mags = getattr(layer, "lora_magnitude_vector", {})
            param = mags[slot].weight if slot in mags else None
        else:
            param = (layer.lora_A if part == "A" else layer.lora_B)[slot].weight
        if param is None or param.shape != tensor.shape:
            return False
        pairs.append((param, tensor))
        covered.add((m.group("module"), part))
    # every layer of the slot needs its new A and B (and magnitude: use_dora is the same on both sides)
    if len(covered) != (3 if new.use_dora else 2) * len(layers):
        return False
    scaling = new.lora_alpha / (math.sqrt(new.r) if new.use_rslora else new.r)
    with torch.no_grad():
        for param, tensor in pairs:
            param.copy_(tensor)
    for layer in layers.values():
        if isinstance(layer.scaling[slot], torch.Tensor):
            layer.scaling[slot].fill_(scaling)
        else:
            layer.scaling[slot] = scaling
        layer.r[slot] = new.r
        layer.lora_alpha[slot] = new.lora_alpha
    old.r, old.lora_alpha = new.r, new.lora_alpha
    return True


class AdapterRouter:
    def __init__(self, host, store: str | Path, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise FtUsageError(f"capacity must be at least 1 adapter in memory (got {capacity}).")
        self.host = host
        self.store = Path(store)
        self.capacity = capacity
        self._slots: OrderedDict = OrderedDict()  # slot name -> task adapter in it, least recently used first
        self._read: dict = {}  # slot name -> the folder it was filled from and that folder's files' stamp
        self.mixed_ok = True  # set False once PEFT refuses a mixed batch on this model

    # ------------------------------------------------------------------ memory
    def in_memory(self) -> list:
        """Task adapters resident in the router's slots, least recently used first."""
        self._forget_lost_slots()
        return list(self._slots.values())

    def describe(self) -> str:
        """The slots in memory, least recently used first, with the folder each was read from."""
        tasks = self.in_memory()
        head = f"Serving    {len(tasks)} of {self.capacity} slots in use; store {self.store}"
        if not tasks:
            return head + "\n(no adapter in a slot yet: %%lora_serve reads them from the store as requests name them)"
        rows = [f"  {task}  (from {self._read.get(slot, (None,))[0] or self.store / task})"
                for slot, task in self._slots.items()]
        return "\n".join([head + "; least recently used first:"] + rows)

    def _forget_lost_slots(self) -> None:
        configs = getattr(self.host.model, "peft_config", {}) or {}
        for slot in [s for s in self._slots if s not in configs]:  # e.g. the model was unloaded meanwhile
            del self._slots[slot]
            self._read.pop(slot, None)
        for slot in [s for s in self._slots if s in self._read and not self._read[s][0].is_dir()]:
            del self._slots[slot]  # its folder was deleted: the name serves nothing now, and its memory goes
            self._drop(slot)

    def rename(self, name: str, new: str, folder: Path) -> None:
        """Adapter ``name``'s folder ``folder`` was renamed ``new`` (beside it): a slot filled from it serves
        ``new`` now, from the same files."""
        for slot, task in self._slots.items():
            read, stamp = self._read.get(slot, (None, None))
            if task == name and read == Path(folder).resolve():
                self._slots[slot] = new
                self._read[slot] = (read.parent / new, stamp)

    def _resolve(self, name: str) -> Optional[Path]:
        """None when the session holds ``name`` itself; else its folder in the store (checked)."""
        if name in self.host.adapters:
            return None
        validate_name(name, self.host.model)
        path = self.store / name
        if not (path / "adapter_config.json").exists():
            known = sorted(p.name for p in self.store.iterdir() if (p / "adapter_config.json").exists()) \
                if self.store.is_dir() else []
            raise FtUsageError(
                f"no adapter {name!r} in memory or in the store {self.store}{did_you_mean(name, known + [BASE])}. "
                f"Store holds: {', '.join(known) or 'nothing'}."
            )
        return path

    def _load_new(self, path: Path, slot: str) -> None:
        from .adapters import check_fits, load_folder, read_adapter_folder, unfit_error

        model = self.host.model
        check_fits(model, path, read_adapter_folder(path), self.host.handle.name)
        try:
            self.host.handle.model = load_folder(model, path, slot)
        except (KeyError, ValueError, RuntimeError) as exc:
            raise unfit_error(path, self.host.handle.name, exc) from None

    def _drop(self, slot: str) -> None:
        from .adapters import drop_adapter

        self.host.handle.model = drop_adapter(self.host.model, slot)
        self._read.pop(slot, None)

    def _hotswap(self, path: Path, slot: str) -> bool:
        from .adapters import read_adapter_folder

        read_adapter_folder(path, parse_weights=False)  # fill_slot parses the weights itself
        return fill_slot(self.host.model, slot, path)

    def _ensure(self, name: str, keep: set) -> tuple:
        """Make ``name`` resident; return (PEFT adapter name, load ms, how)."""
        if name in self.host.adapters:  # the user's own (trained or loaded) adapter: never evicted
            t = time.perf_counter()
            if self.host._reload_if_rewritten(name):  # retrained elsewhere: read again
                return name, (time.perf_counter() - t) * 1000.0, "refreshed"
            return name, 0.0, "pinned"
        path = self._resolve(name)
        held = (path.resolve(), folder_stamp(path))
        stale = None
        for slot, task in self._slots.items():
            if task == name:
                if self._read.get(slot) == held:
                    self._slots.move_to_end(slot)
                    return slot, 0.0, "resident"
                stale = slot  # retrained, rewritten by a job, or another store's adapter of that name
        t = time.perf_counter()
        if stale is not None:  # refill its own slot from the folder as it is now
            del self._slots[stale]
            slot = stale
            if not self._hotswap(path, slot):
                self._drop(slot)
                self._load_new(path, slot)
            how = "reloaded"
        elif len(self._slots) < self.capacity:
            used = set(self._slots) | set(getattr(self.host.model, "peft_config", {}) or {})
            slot = next(f"{SLOT_PREFIX}{i}" for i in range(len(used) + 1) if f"{SLOT_PREFIX}{i}" not in used)
            self._load_new(path, slot)
            how = "loaded"
        else:
            slot = next(s for s, task in self._slots.items() if task not in keep)
            del self._slots[slot]
            if self._hotswap(path, slot):
                how = "hot-swapped"
            else:  # other target modules, rank or settings: replace the slot the slow way
                self._drop(slot)
                self._load_new(path, slot)
                how = "reloaded"
        self._slots[slot] = name
        self._read[slot] = held
        return slot, (time.perf_counter() - t) * 1000.0, how

    # ------------------------------------------------------------------ serving
    def serve(self, requests: list, max_new_tokens: int = 64, system: Optional[str] = None, sampling=None) -> list:
        """One answer per request; ``sampling`` (a core.inference.Sampling): how every answer is decoded
        (default greedy); ``max_new_tokens``: for requests that name no limit of their own."""
        reqs = as_requests(requests)
        if not reqs:
            return []
        for k, r in enumerate(reqs, 1):
            if not isinstance(r.prompt, str):
                raise FtUsageError(f"request {k} ({r.adapter}): a request's prompt is text (got "
                                   f"{type(r.prompt).__name__}: {r.prompt!r:.40}).")
            if not r.prompt.strip():
                raise FtUsageError(f"request {k} ({r.adapter}) has an empty prompt: every request needs one.")
        needed = list(dict.fromkeys(r.adapter for r in reqs if r.adapter != BASE))
        for name in needed:  # every name and prompt checked before any work is done (a slot emptied included)
            self._resolve(name)
        from .inference import check_prompts_fit

        check_prompts_fit(self.host.model, self.host.tokenizer, [r.prompt for r in reqs], system,
                          [f"request {k} ({r.adapter})" for k, r in enumerate(reqs, 1)])
        self._forget_lost_slots()
        while len(self._slots) > self.capacity:  # capacity lowered since the last batch
            self._drop(self._slots.popitem(last=False)[0])
        previous = self.host.adapters.active
        out: list = [None] * len(reqs)
        try:
            # adapters the user loaded are pinned; the others count against `capacity`, so they are
            # served in chunks of at most `capacity`, each of which fits in memory at once
            pinned = [n for n in needed if n in self.host.adapters]
            routed = [n for n in needed if n not in pinned]
            chunks = [routed[i:i + self.capacity] for i in range(0, len(routed), self.capacity)] or [[]]
            chunks[0] = pinned + chunks[0]
            for i, names in enumerate(chunks):
                rows = [k for k, r in enumerate(reqs) if r.adapter in names or (i == 0 and r.adapter == BASE)]
                if rows:
                    self._serve_chunk(reqs, rows, names, out, max_new_tokens, system, sampling)
        finally:  # leave the session's own selection exactly as it was (slots included: disabled)
            active = previous if previous in self.host.adapters else None
            activate(self.host.model, active)
            self.host.adapters.active = active
        return out

    def _serve_chunk(self, reqs, rows, names: set, out, max_new_tokens, system, sampling=None) -> None:
        from .inference import generate_batch

        loads = {n: self._ensure(n, set(names)) for n in names}  # task -> (PEFT name, ms, how)
        peft_name = {n: v[0] for n, v in loads.items()}
        model, tok = self.host.model, self.host.tokenizer
        limit = max((reqs[k].max_new_tokens or max_new_tokens) for k in rows)
        seen: set = set()

        def record(k, text, n, mode, swap_ms, seconds):
            r = reqs[k]
            first = r.adapter not in seen
            seen.add(r.adapter)
            _, ms, how = loads.get(r.adapter, (None, 0.0, "base"))
            cold = first and how in ("loaded", "hot-swapped", "reloaded", "refreshed")
            out[k] = Served(index=k, adapter=r.adapter, text=text, new_tokens=n, cold=cold,
                            load_ms=ms if cold else 0.0, swap_ms=swap_ms, mode=mode, batch_seconds=seconds,
                            how=how if cold or how in ("pinned", "base") else "resident")

        if (self.mixed_ok and hasattr(model, "peft_config") and len({reqs[k].adapter for k in rows}) > 1
                and not any(uses_dora(model, v) for v in peft_name.values())):
            model.base_model.enable_adapter_layers()  # (PEFT refuses DoRA in a mixed batch: those are grouped)
            t = time.perf_counter()
            try:
                try:
                    answers = generate_batch(model, tok, [reqs[k].prompt for k in rows], system=system,
                                             max_new_tokens=limit,
                                             limits=[reqs[k].max_new_tokens or max_new_tokens for k in rows],
                                             adapter_names=[peft_name.get(reqs[k].adapter, PEFT_BASE_ROW)
                                                            for k in rows], sampling=sampling)
                finally:  # refused or interrupted, PEFT leaves its hooks on every layer
                    remove_adapter_name_hooks(model)
            except FtUsageError:  # the user's to fix (the model is not at fault): said, and mixing stays on
                raise
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
            swap_ms = activate(model, peft_name.get(name, BASE))
            glimit = max((reqs[k].max_new_tokens or max_new_tokens) for k in ks)
            t = time.perf_counter()
            answers = generate_batch(model, tok, [reqs[k].prompt for k in ks], system=system, max_new_tokens=glimit,
                                     limits=[reqs[k].max_new_tokens or max_new_tokens for k in ks], sampling=sampling)
            seconds = time.perf_counter() - t
            for k, (text, n) in zip(ks, answers):
                record(k, text, n, "grouped", swap_ms, seconds)

