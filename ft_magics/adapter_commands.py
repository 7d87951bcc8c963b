"""The text subcommands of ``%lora_adapters`` (list, info, use, load, unload, delete, rename, merge, unmerge,
combine, export): parse the words, call the Session, print the outcome. No IPython import: user
mistakes are FtUsageError, which the magic turns into a UsageError."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

from .errors import FtUsageError, did_you_mean

USAGE = {
    "list": "list",
    "info": "info NAME",
    "use": "use NAME|base",
    "load": "load PATH [--name NAME]",
    "unload": "unload NAME",
    "delete": "delete NAME",
    "rename": "rename NAME NEW",
    "merge": "merge NAME",
    "unmerge": "unmerge",
    "combine": "combine a:0.7,b:0.3 --name NEW [--method linear|cat|svd|ties]",
    "export": "export NAME DIR [--merged [--dtype auto|fp32|bf16|fp16]] [--overwrite]",
}
COMMANDS = list(USAGE)
# words other tools use for a subcommand, where the closest spelling would point elsewhere ('remove' -> 'rename')
SYNONYMS = {"remove": "delete", "rm": "delete", "del": "delete", "ls": "list", "show": "info", "mv": "rename",
            "move": "rename", "switch": "use", "activate": "use", "select": "use", "add": "load", "fuse": "merge",
            "save": "export", "mix": "combine", "blend": "combine"}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would exit the kernel's process; say what is wrong instead
        raise FtUsageError(f"{message}; usage: %lora_adapters {USAGE[self.prog]}")


def _parse(cmd: str, words: list, *specs) -> argparse.Namespace:
    p = _Parser(prog=cmd, add_help=False, allow_abbrev=False)
    for args, kw in specs:
        p.add_argument(*args, **kw)
    ns, extra = p.parse_known_args(words)
    if extra:
        raise FtUsageError(f"unexpected {' '.join(extra)}; usage: %lora_adapters {USAGE[cmd]}")
    return ns


def _name(cmd: str, words: list) -> str:
    if len(words) != 1:
        said = f"unexpected {' '.join(words[1:])}; " if len(words) > 1 else f"{cmd} needs a name; "
        raise FtUsageError(f"{said}usage: %lora_adapters {USAGE[cmd]}")
    return words[0]


def switch(s, name: str) -> tuple:
    """Make ``name`` active (``Session.use``): ``(what it took, in words; the swap's ms)``: the swap's time, or for
    an adapter read from its folder first, the whole time (the swap alone understated what a load cost)."""
    import time

    from .core.adapters import BASE

    was_loaded = name == BASE or name in s.adapters
    t = time.perf_counter()
    ms = s.use(name)
    if was_loaded:
        return f"{name} (swapped in {ms:.2f} ms)", ms
    return f"{name} (loaded from disk and switched in {(time.perf_counter() - t) * 1e3:.0f} ms)", ms


def _note_other_base(s, name: str, out) -> None:
    """A word where adapter ``name`` was trained on another base than the one loaded (same layer shapes, so it
    loads, but its answers assume its own base)."""
    other = s.trained_on_another_base(name)
    if other:
        other, now, how = other
        out(f"Note: {name!r} was trained on {other}, not on the model loaded now ({now}): its answers and losses "
            f"assume that base ({how}).")


def run(session, words: list, out: Callable[[str], None] = print) -> None:
    cmd = words[0] if words else "list"
    rest = words[1:]
    s = session
    if cmd == "list":
        if rest:
            raise FtUsageError(f"unexpected {' '.join(rest)}; usage: %lora_adapters list")
        on_disk = s.adapters_on_disk()
        running = s.training_in_background
        if running:
            saved = running in on_disk or running in s.adapters  # a resumed or retrained name: its last save is listed
            out(f"training {running!r} in the background: "
                + (f"the {running!r} below is its last save, replaced when the run saves"
                   if saved else "it joins this list when it is saved")
                + " (%lora_stop stops it at the next step and saves it).")
        elsewhere, cut_short = s.unfinished_runs()
        for name, pid in elsewhere.items():
            out(f"{name}: being trained now by another process on this machine (pid {pid}); its adapter is "
                "listed here once that run saves it.")
        for name, step in cut_short.items():
            if name != running:
                out(f"{name}: its run was cut short at step {step} before it saved an adapter; %%lora_train {name} "
                    "--data ... --resume continues it from there.")
        if not s.adapters and not on_disk and not s.misnamed_on_disk():
            if running or cut_short or elsewhere:
                return
            out("No adapters yet. Train one with %%lora_train NAME --data ... or load one with "
                "%lora_adapters load PATH.")
            return
        active = s.adapters.active or "base"
        merged = s.merged_adapter
        from .core.adapters import number_text

        for a in s.adapters:
            mark = "*" if a.name == active else " "
            loss = f"{a.final_loss:.4f}" if a.final_loss is not None else "-"
            best = (a.extra or {}).get("best") or {}
            if best.get("restored"):  # keep_best saved an earlier step's weights: the last step's loss is not theirs
                loss += f" (kept step {best['step']}: eval {best['eval_loss']:.4f})"
            tag = " [merged]" if a.name == merged else ""
            gone = s.only_in_memory(a)
            out(f"{mark} {a.name:<20} r={a.r} alpha={number_text(a.alpha)} steps={a.steps or '-'} loss={loss} "
                f"{a.origin}{tag}  {a.path}" + (f"  (only in memory: {gone}; %lora_adapters export {a.name} DIR "
                                                 "keeps it)" if gone else ""))
        why = {n: s.misfit(n) for n in on_disk}
        fitting = [n for n in on_disk if why[n] is None]
        if fitting:
            out(f"on disk in {s.adapters_dir}, not loaded (used by name, they load): {', '.join(fitting)}"
                if s.handle is not None else f"on disk in {s.adapters_dir}: {', '.join(fitting)} (no model is loaded: "
                "%qlora_load one, then use them by name)")
        merged_in = [n for n in on_disk if why[n] and "is already merged into" in why[n]]
        if merged_in:
            out(f"on disk in {s.adapters_dir}, already merged into {s.handle.name} (applied again, their update "
                f"would count twice): {', '.join(merged_in)}")
        # a mismatch names the base the adapter was trained on; anything else is a damaged folder (a file cut
        # short by an interrupted copy, a config cut short, weights deleted part-way): its folder, and what is wrong
        others = [n for n in on_disk if why[n] and n not in merged_in and "trained on" in why[n]]
        broken = [n for n in on_disk if why[n] and n not in merged_in and n not in others]
        for n in broken:
            out(f"on disk in {s.adapters_dir}, unreadable: {n}: {why[n]} Delete it with %lora_adapters delete {n}.")
        if others:
            out(f"on disk in {s.adapters_dir}, trained on another base model (they do not fit "
                f"{s.handle.name}): {', '.join(others)}")
        for folder, name in s.misnamed_on_disk().items():
            out(f"on disk in {s.adapters_dir}, under a folder name that is no adapter name: {folder!r}; rename the "
                f"folder (e.g. to {name}), or load it with %lora_adapters load \"{s.adapters_dir / folder}\" --name {name}.")
        if s.handle is not None:
            out(f"active: {active}" + (" (merged into the base weights)" if merged else ""))
        return
    if cmd == "info":
        out(s.adapter_card(_name(cmd, rest)))
        return
    if cmd == "use":
        name = _name(cmd, rest)
        out(f"active adapter: {switch(s, name)[0]}")
        _note_other_base(s, name, out)
        return
    if cmd == "load":
        a = _parse(cmd, rest, (("path",), {}), (("--name",), {"default": None}))
        name = s.load_adapter(a.path, a.name)
        out(f"loaded adapter {name!r} from {a.path}; it is now active.")
        _note_other_base(s, name, out)
        return
    if cmd == "unload":
        name = _name(cmd, rest)
        s.unload_adapter(name)
        out(f"unloaded adapter {name!r} from memory (its folder stays on disk); active: {s.adapters.active or 'base'}.")
        return
    if cmd == "delete":
        name = _name(cmd, rest)
        loaded_from = s.adapters.require(name).path if name in s.adapters else None
        was_active = s.adapters.active == name
        cut_short = s.resumable_runs().get(name) if name not in s.adapters else None
        removed = s.delete_adapter(name)
        now = f" The base model is active now (it was {name!r})." if was_active else ""
        if removed and cut_short is not None and not (s.adapters_dir / name).exists():
            out(f"deleted the cut-short run {name!r}: its checkpoints up to step {cut_short} ({removed}).")
        elif removed:
            out(f"deleted adapter {name!r} and its folder {removed}.{now}")
        elif loaded_from and not Path(loaded_from).exists():
            out(f"deleted adapter {name!r} from memory; its folder {loaded_from} was already gone.{now}")
        else:
            out(f"deleted adapter {name!r} from memory; the folder it was loaded from was kept (delete removes "
                f"only its own folder, {s.adapters_dir / name}).{now}")
        return
    if cmd == "rename":
        if len(rest) != 2:
            said = f"unexpected {' '.join(rest[2:])}; " if len(rest) > 2 else "rename needs the name and the new name; "
            raise FtUsageError(f"{said}usage: %lora_adapters {USAGE[cmd]}")
        folder = s.rename_adapter(*rest)
        out(f"renamed adapter {rest[0]!r} to {rest[1]!r}" + (f"; its folder is now {folder}." if folder else
                                                           " in memory (its folder, outside the adapters folder, keeps its name)."))
        return
    if cmd == "merge":
        name = _name(cmd, rest)
        ms = s.merge_adapter(name)
        dtype = str(s.handle.dtype).replace("torch.", "")
        rounded = (f" The merged weights are {dtype}: the sum is rounded, so greedy answers can part from the unmerged "
                   "adapter's after some tokens (its update is computed at full precision beside the base)."
                   if dtype in ("bfloat16", "float16") else "")
        out(f"merged {name!r} into the base weights in {ms:.0f} ms (full-speed inference). "
            f"%lora_adapters unmerge restores the base exactly.{rounded}")
        return
    if cmd == "unmerge":
        if rest:
            raise FtUsageError(f"unexpected {' '.join(rest)}; usage: %lora_adapters unmerge")
        name = s.unmerge_adapter()
        out(f"unmerged {name!r}: base weights restored exactly; {name!r} stays loaded and active.")
        return
    if cmd == "combine":
        from .core.adapters import COMBINE_METHODS, parse_weights

        a = _parse(cmd, rest, (("weights",), {}), (("--name",), {"required": True}),
                   (("--method",), {"default": "linear"}))
        if a.method not in COMBINE_METHODS:
            raise FtUsageError(f"unknown --method {a.method!r}{did_you_mean(a.method, COMBINE_METHODS)}; "
                               f"use one of {', '.join(COMBINE_METHODS)}.")
        name = s.combine_adapters(a.weights, a.name, a.method, progress=out)
        used = ", ".join(f"{k} x {w:g}" for k, w in parse_weights(a.weights).items())  # 'a,b' means 1 each: say so
        out(f"combined {used} ({a.method}) into adapter {name!r}, saved to {s.adapters_dir / name}; it is now active.")
        return
    if cmd == "export":
        a = _parse(cmd, rest, (("name",), {}), (("dir",), {}), (("--merged",), {"action": "store_true"}),
                   (("--dtype",), {"default": "auto"}), (("--overwrite",), {"action": "store_true"}))
        if a.dtype != "auto" and not a.merged:
            raise FtUsageError("--dtype applies to --merged exports; an adapter keeps its own precision.")
        path = s.export_adapter(a.name, a.dir, merged=a.merged, dtype=a.dtype, overwrite=a.overwrite)
        what = ("a standalone model (adapter merged; safetensors + tokenizer) that "
                "AutoModelForCausalLM.from_pretrained loads" if a.merged else "the adapter in PEFT format")
        out(f"exported {a.name!r} to {path}: {what}.")
        return
    meant = SYNONYMS.get(cmd.lower())
    hint = f" (did you mean {meant!r}?)" if meant else did_you_mean(cmd, COMMANDS)
    raise FtUsageError(f"unknown subcommand {cmd!r}{hint}. Use: "
                       + "; ".join(USAGE.values()) + ".")
