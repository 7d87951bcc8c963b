"""Datasets in every common shape -> normalised records -> tokenised examples with loss masks.

Pipeline (each step is a pure function, so the magics, the Python API and the tests share it):

    load_rows(src)            file / folder / variable / demo:NAME  -> list of dict rows
    normalise(rows, ...)      detect the format, validate every row  -> list of Record
    tokenize(records, tok)    render (chat template or plain text)   -> input_ids + labels (-100 = no loss)

Everything a user can get wrong is an :class:`FtUsageError` raised *before* the model is touched.
"""
from __future__ import annotations

import contextlib
import contextvars
import glob
import hashlib
import io
import itertools
import json
import math
import numbers
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from ..errors import FtUsageError, did_you_mean
from ..paths import user_path
from .events import counted

DEMO_DIR = Path(__file__).resolve().parent.parent / "data"
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt")
# a data file may be compressed as a whole (train.jsonl.gz, as the Hub and many exports ship them): it is read
# through the decompressor, its format named by the suffix before the compression's
COMPRESSIONS = (".gz", ".bz2", ".xz")
ROLE_ALIASES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "system": "system",
    "developer": "system",  # OpenAI's newer name for the system message
    "tool": "tool",
    "function_call": "assistant",
    "observation": "tool",
    "function": "tool",
    "ipython": "tool",
}
CHAT_ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Record:
    """One normalised example: a conversation, or plain text."""

    messages: Optional[list] = None  # [{"role": ..., "content": str}, ...]
    text: Optional[str] = None
    tools: Optional[list] = None
    where: str = ""  # "file.jsonl, line 7": for errors found later (e.g. the chat template refusing it)
    answer_turns: Optional[int] = None  # only the last N assistant turns carry loss (None: every one)
    # one 0/1 per assistant turn, in order (OpenAI's per-message ``weight``: 0 = context, no loss); None: all 1
    weights: Optional[list] = None

    def __post_init__(self):
        if self.messages and self.weights is None and any("weight" in m for m in self.messages):
            self.weights = [m.pop("weight", 1) for m in self.messages if m["role"] == "assistant"]
            for m in self.messages:
                m.pop("weight", None)
            if all(self.weights):
                self.weights = None

    def to_json(self) -> dict:
        if self.text is not None:
            return {"text": self.text}
        out = {"messages": self.messages}
        if self.weights is not None:  # as the rows give them: the weight on each assistant message
            turns = iter(self.weights)
            out["messages"] = [dict(m, weight=next(turns)) if m["role"] == "assistant" else m for m in self.messages]
        if self.tools:
            out["tools"] = self.tools
        if self.answer_turns is not None:
            out["answer_turns"] = self.answer_turns
        return out


# ----------------------------------------------------------------------------- sources
TXT_MODES = ("auto", "document", "lines", "blocks")
# A file parsed into Python dicts, normalised and tokenised takes many times its size in memory (object
# headers, str copies, then lists of int objects for the token ids and labels): measured peak about 19x
# for the demo chat data (a 12 MiB .jsonl). Loading is refused when this many times the file size
# exceeds the free memory.
MEMORY_EXPANSION = 20


class Rows(list):
    """A list of row dicts that remembers where each row came from ("file.jsonl, line 7"), so an error
    about row i can point at the line to fix."""

    held_out = None  # (split name, its source): see _with_held_out
    only_split = None  # the name of the dataset's one split, when it is named for evaluation: see _only_split
    file_splits = None  # which files train, evaluate or are left out, where file names name splits: see _split_files
    index_labels = None  # a DataFrame's index label of each row (what df.loc takes), named instead of a position

    def __init__(self, rows=(), locs=None):
        super().__init__(rows)
        self.locs = list(locs) if locs is not None else None

    def where(self, i: int, default: str) -> str:
        if self.locs is not None and i < len(self.locs) and self.locs[i]:
            return self.locs[i]
        if self.index_labels is not None and i < len(self.index_labels):
            return f"{default}, index {self.index_labels[i]}"
        return f"{default}, row {i + 1}"

    def extend_from(self, other: list, label: str) -> None:
        if self.locs is None:
            self.locs = [None] * len(self)
        other_locs = getattr(other, "locs", None)
        for i in range(len(other)):
            loc = other_locs[i] if other_locs is not None else None
            self.locs.append(loc or f"{label}, row {i + 1}")
        super().extend(other)


def demo_datasets() -> list[str]:
    return sorted(p.stem for p in DEMO_DIR.glob("*.jsonl"))


def data_spec(src: Any, namespace: Optional[dict] = None) -> Optional[str]:
    """What names ``src`` (a --data / --eval argument) after a kernel restart: ``demo:NAME``, or the absolute path
    of an existing file or folder (a glob made absolute where it matches); None for what only this kernel holds (a
    variable, an object) or what does not exist. A run's record keeps it, so ``%lora_eval NAME`` can rebuild the
    run's held-out split in a later session (:meth:`ft_magics.session.Session.evaluate`)."""
    if isinstance(src, os.PathLike) and not isinstance(src, _Files):
        src = os.fspath(src)
    if not isinstance(src, str) or not src.strip():
        return None
    if src.startswith("demo:"):
        return src
    if namespace is not None and src.isidentifier() and _looks_like_data(namespace.get(src)):
        return None  # the variable is what was read, even where a file of that name exists
    try:
        path = user_path(src)
    except FtUsageError:
        return None
    if path.exists():
        return str(path.resolve())
    if any(c in src for c in "*?[") and not HUB_ID.fullmatch(src) and glob.glob(str(path), recursive=True):
        return os.path.abspath(str(path))
    return None


def _indexed(rows: list) -> "Rows":
    """Rows of an object in memory (a list, a Dataset), each named by its index, as Python reaches it
    (``rows[0]``, ``ds[0]``); a DataFrame's rows keep their index labels, and rows that know their lines keep them."""
    rows = rows if isinstance(rows, Rows) else Rows(rows)
    if rows.locs is None and rows.index_labels is None:
        rows.index_labels = range(len(rows))
    return rows


def load_rows(src: Any, namespace: Optional[dict] = None, txt_mode: str = "auto",
              max_rows: int = 0) -> tuple[list[dict], str]:
    """Rows (a list of dicts) and a short description of where they came from.

    ``max_rows`` > 0 reads only the first rows, streaming files instead of loading them whole; with 0 a
    file too large for the free memory is refused with a message that says so (nothing half-loaded)."""
    if txt_mode not in TXT_MODES:
        raise FtUsageError(f"txt_mode {txt_mode!r} is not one of {', '.join(TXT_MODES)}{did_you_mean(txt_mode, TXT_MODES)}.")
    limit = max_rows if max_rows and max_rows > 0 else None
    if isinstance(src, os.PathLike) and not isinstance(src, _Files):  # a pathlib.Path: the file or folder it names
        src = os.fspath(src)
    if isinstance(src, _Files):  # the eval split of a folder or glob whose file names name splits
        return _rows_from_files(list(src), txt_mode, limit, src.label), src.desc
    if not isinstance(src, str):
        return _indexed(_rows_from_object(src, "the given object", limit)), f"<{type(src).__name__}>"
    if not src.strip():
        raise FtUsageError("--data is empty: give a file path, demo:NAME or the name of a notebook variable.")
    if src.startswith("demo:"):
        name = src[5:]
        path = DEMO_DIR / f"{name}.jsonl"
        if not path.exists():
            raise FtUsageError(
                f"no bundled dataset {name!r}{did_you_mean(name, demo_datasets())}. "
                f"Bundled: {', '.join('demo:' + d for d in demo_datasets())}."
            )
        return _read_jsonl(path, limit), src
    path = user_path(src)
    variable = namespace.get(src) if namespace is not None and src.isidentifier() else None
    if path.exists() and _looks_like_data(variable):  # `parts` names a DataFrame and the folder parts/: in a
        # notebook the name means the variable; the Data line says how to read the folder instead
        return (_indexed(_rows_from_object(variable, f"variable {src!r}", limit)),
                f"variable {src} (not the {'folder' if path.is_dir() else 'file'} {src}: --data ./{src} reads that)")
    if path.exists():
        if limit is None:
            _check_memory(path)
        return _rows_from_path(path, txt_mode, limit), str(path)
    named_split = re.fullmatch(r"([A-Za-z_]\w*):([\w.-]+)", src)  # dd:test - a split of a DatasetDict variable
    if named_split and namespace is not None and hasattr(namespace.get(named_split.group(1)), "keys") \
            and _looks_like_data(namespace[named_split.group(1)]):
        name, split = named_split.groups()
        splits = list(namespace[name].keys())
        if split not in splits:
            raise FtUsageError(f"variable {name!r} has no split {split!r}{did_you_mean(split, [str(k) for k in splits])}; "
                               f"its splits: {', '.join(map(str, splits))}.")
        return _indexed(_rows_from_object(namespace[name][split], f"variable {name!r}, split {split!r}", limit)), \
            f"variable {name}, split '{split}'"
    expression = re.match(r"([A-Za-z_]\w*)\s*[\[(.]", src)
    if (expression and namespace is not None and _looks_like_data(namespace.get(expression.group(1)))
            and data_suffix(src) not in FILE_SUFFIXES):
        name = expression.group(1)
        raise FtUsageError(f"--data takes a variable's name, not an expression ({src!r}): assign it first, e.g. "
                           f"train_rows = {name}[...] in a cell, then --data train_rows.")
    if any(c in src for c in "*?[") and not HUB_ID.fullmatch(src):
        return _rows_from_glob(src, txt_mode, limit), src
    if namespace is not None and src.isidentifier():
        if src in namespace:
            return _indexed(_rows_from_object(namespace[src], f"variable {src!r}", limit)), f"variable {src}"
        names = [k for k, v in namespace.items() if not k.startswith("_") and _looks_like_data(v)]
        raise FtUsageError(
            f"--data {src!r} is neither a file nor a variable in this notebook{did_you_mean(src, names)}. "
            "Give a path to a .jsonl/.json/.csv/.tsv/.parquet/.txt file, a folder, demo:NAME, or define the "
            "variable first (a pandas DataFrame, a list of dicts or strings, a datasets.Dataset or DatasetDict)."
        )
    if HUB_ID.fullmatch(src) and data_suffix(src.split(":")[0]) not in FILE_SUFFIXES:
        return _rows_from_hub(src, limit), f"hub:{src}"
    if path.is_symlink():  # a link whose file is gone: "did you mean" its own name helped nobody
        raise FtUsageError(f"data file {src!r} is a link to {os.readlink(path)}, which does not exist: point the link "
                           "at the data file, or give the file's own path.")
    hint = ""
    if path.parent.exists():
        hint = did_you_mean(path.name, [p.name for p in path.parent.iterdir() if p.name != path.name])
    raise FtUsageError(f"data file {src!r} does not exist{hint} (looked relative to {Path.cwd()}).")


EVAL_SPLITS = ("validation", "valid", "val", "dev", "eval", "evaluation", "test")  # in order of preference
# the words of a data file's name that name its split, and the split each names
_SPLIT_WORDS = {"train": "train", "training": "train", "testing": "test", **{w: w for w in EVAL_SPLITS}}
# Which of several training splits a run reads (UltraFeedback's train_prefs / train_sft / train_gen) depends on
# what it trains: split_records sets this while it reads a preference objective's data.
_READING_PAIRS = contextvars.ContextVar("ft_magics_reading_pairs", default=False)


def _train_split(splits) -> Optional[str]:
    """The split a dataset with named splits trains on: 'train'; else its only train* split; else, among
    several, the one for this run's objective (a name holding 'pref' for a preference objective, 'sft' otherwise); or None."""
    splits = list(splits)
    if "train" in splits:
        return "train"
    candidates = [s for s in splits if str(s).lower().startswith("train")]
    if len(candidates) > 1:
        word = "pref" if _READING_PAIRS.get() else "sft"
        candidates = [s for s in candidates if word in str(s).lower()]
    return candidates[0] if len(candidates) == 1 else None


def _eval_split(splits, train: Optional[str] = "train") -> Optional[str]:
    """The split a dataset with splits (a DatasetDict, a dict of record lists, a JSON object, the Hub's split
    names) holds out for evaluation beside its ``train`` split, or None: validation, test, ... with the train
    split's suffix (test_prefs beside train_prefs)."""
    if train is None or train not in splits:
        return None
    suffix = str(train)[len("train"):].lower()
    suffix = suffix if suffix[:1] in ("", "_", "-") else ""  # train_prefs -> test_prefs; training -> test
    by_lower = {str(s).lower(): s for s in splits}  # TRAIN beside VALIDATION
    return next((by_lower[name + suffix] for name in EVAL_SPLITS if name + suffix in by_lower), None)


def _only_split(rows: list, split: str) -> "Rows":
    """``rows``, read from the one split a dataset has, named for evaluation (``rows.only_split``): the Data line
    names it, since the run trains on what the dataset's author meant for evaluation."""
    rows = rows if isinstance(rows, Rows) else Rows(rows)
    rows.only_split = split
    return rows


def _with_held_out(rows: list, split: str, source: Any) -> "Rows":
    """``rows`` (the 'train' split) remembering the eval split its source brings: ``rows.held_out`` is
    ``(split name, what load_rows reads it from)``. Training read 'train' alone, and the other split went
    silently unused; :func:`split_records` makes it the eval data."""
    rows = rows if isinstance(rows, Rows) else Rows(rows)
    rows.held_out = (split, source)
    return rows


# owner/name, optionally :split - what the Hugging Face Hub calls a dataset (not a local path: checked first)
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.\[\]:%-]+)?")


def _hub_unreachable(timeout: float = 3.0) -> Optional[str]:
    """Why the Hub cannot be reached from here (no network, no name resolution), or None: also None in
    offline mode (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE), where datasets reads its cache without the network."""
    import os
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return None
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError as exc:
        return f"{host} cannot be reached from this machine ({exc.strerror or type(exc).__name__})"
    return None


def _rows_from_hub(src: str, limit: Optional[int]) -> list[dict]:
    """Rows of a Hugging Face Hub dataset ``owner/name[:split]`` (split ``train`` unless given), through
    ``datasets.load_dataset``, which caches the download; a failure (no network, no such dataset, a gated
    one) is a usage error that says how to give the data instead."""
    import sys

    import datasets

    name, _, split = src.partition(":")
    named_split = bool(split)
    split = split or "train"
    if limit is not None and "[" not in split:
        split = f"{split}[:{limit}]"
    unreachable = _hub_unreachable()
    if unreachable:  # datasets would retry for ~20 s, printing each attempt, before the same conclusion
        local = user_path(name)
        raise FtUsageError(
            f"--data {src!r} is not a local file or folder (looked for {local}), and it cannot be a Hugging Face "
            f"Hub dataset here: {unreachable}. Check the path, or save the dataset where there is network "
            "(datasets' save_to_disk, or a .jsonl file) and give that path. (A dataset already in the local "
            "cache loads with HF_HUB_OFFLINE=1 set before the notebook starts.)")
    print(f"Loading {name} (split {split}) from the Hugging Face Hub through datasets.load_dataset ...",
          file=sys.stderr, flush=True)
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as exc:  # noqa: BLE001 - offline, unknown, gated, unknown split: all say the same
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise FtUsageError(
            f"--data {src!r} is not a local file or folder, and loading it as a Hugging Face Hub dataset "
            f"failed: {type(exc).__name__}: {first[:300]}. Check the name and split (owner/name:split), or, "
            "without access to the Hub, save it elsewhere (datasets' save_to_disk, or a .jsonl file) and "
            "give that path."
        ) from None
    rows = _rows_from_object(ds, f"Hub dataset {name}", limit)
    if not named_split:  # named without a split: it trains on 'train'; its eval split, if it has one, evaluates
        try:
            held = _eval_split(datasets.get_dataset_split_names(name))
        except Exception:  # noqa: BLE001 - the split names are a nicety; training goes on without an eval split
            held = None
        if held:
            return _with_held_out(rows, held, f"{name}:{held}")
    return rows


def _json_problem(exc) -> str:
    """json's message without its own trailing "at" ("Invalid control character at"): ours adds the column."""
    return exc.msg[:-3] if exc.msg.endswith(" at") else exc.msg


def _rows_from_glob(pattern: str, txt_mode: str, limit: Optional[int]) -> list[dict]:
    """Rows of every data file a glob pattern (``data/*.jsonl``, ``parts/**/*.csv``) matches, in name order."""
    base = user_path(pattern)
    matches = sorted(Path(m) for m in glob.glob(str(base), recursive=True))
    files = [m for m in matches if is_data_file(m)]
    if not files:
        others = f" ({len(matches)} other paths match, none a {'/'.join(FILE_SUFFIXES)} file)" if matches else ""
        raise FtUsageError(f"the pattern {pattern!r} matches no data file{others} (looked relative to {Path.cwd()}).")
    if limit is None:
        _check_size(sum(_data_bytes(f) for f in files), f"what {pattern!r} matches ({len(files)} files)")
    cwd = Path.cwd()
    label = lambda f: str(f.relative_to(cwd)) if f.is_relative_to(cwd) else str(f)  # noqa: E731
    fixed = list(itertools.takewhile(lambda part: not any(c in part for c in "*?["), Path(pattern).parts))
    return _rows_of_split_files(files, user_path(str(Path(*fixed))) if fixed else cwd, txt_mode, limit, label, "")


class _Files(tuple):
    """Data files read as one split (the eval split of a folder or glob), with how to label and describe them."""

    def __new__(cls, files, label, desc):
        obj = super().__new__(cls, files)
        obj.label, obj.desc = label, desc
        return obj


def _split_key(f: Path, base: Path) -> Optional[str]:
    """The split a data file's name (or the folder it is in below ``base``) names, from the split word on:
    train.jsonl -> train, data-test-00000-of-00001.parquet -> test, train_prefs.jsonl -> train_prefs,
    test/part0.jsonl -> test; None where no word of the name is a split's (part-0.jsonl, contest.jsonl)."""
    try:
        parts = f.relative_to(base).parts
    except ValueError:
        parts = (f.name,)
    for part in [p for p in parts[:-1]] + [Path(parts[-1]).stem.split(".")[0]]:
        words = re.findall(r"[a-z]+", part.lower())
        for i, w in enumerate(words):
            if w in _SPLIT_WORDS:
                rest = [x for x in words[i + 1:] if x != "of"]  # train-00000-of-00002: shard numbers, not a name
                return "_".join([_SPLIT_WORDS[w]] + rest)
    return None


def _split_files(files: list, base: Path) -> Optional[tuple]:
    """Where the files' names name splits (train.jsonl beside test.jsonl, train/ beside validation/, the Hub's
    train-00000-of-00001.parquet): ``(train files, eval split name, eval files, unused files)``, chosen as for a
    DatasetDict's splits; None where no file names the split to train on (every file trains, as before)."""
    keys = {f: _split_key(f, base) for f in files}
    named = sorted({k for k in keys.values() if k})
    train = _train_split(named)
    if train is None:
        return None
    held = _eval_split(named, train)
    pick = lambda k: [f for f in files if keys[f] == k]  # noqa: E731
    # (not `not in (train, held)`: with no eval split held is None, the key of every file that names no split,
    # and those files were left out of both lists: not read, and not named as not read)
    unused = [f for f in files if keys[f] != train and (held is None or keys[f] != held)]
    return pick(train), held, pick(held) if held else [], unused


def _rows_of_split_files(files: list, base: Path, txt_mode: str, limit: Optional[int], label, where: str) -> list:
    """The rows of a folder's or a glob's files: where their names name splits (:func:`_split_files`), the
    training split's, remembering the eval split as a DatasetDict's is remembered; else all of them."""
    split = _split_files(files, base)
    if split is None:
        return _rows_from_files(files, txt_mode, limit, label, where)
    train, held, held_files, unused = split
    rows = _rows_from_files(train, txt_mode, limit, label, where)
    if not held and not unused:
        return rows
    names = lambda fs: ", ".join(label(f) for f in fs[:3]) + (f" and {len(fs) - 3} more" if len(fs) > 3 else "")  # noqa: E731
    rows.file_splits = (f"split by file name: {names(train)} {'trains' if len(train) == 1 else 'train'}"
                        + (f", {names(held_files)} {'evaluates' if len(held_files) == 1 else 'evaluate'}" if held else "")
                        + (f"; not read: {names(unused)}" if unused else ""))
    return _with_held_out(rows, held, _Files(held_files, label, names(held_files))) if held else rows


def _available_memory() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


# a dataset folder's description, not its rows (LLaMA-Factory's dataset_info.json, a hub download's metadata)
DATASET_METADATA = {"dataset_info.json", "dataset_infos.json", "dataset_dict.json", "state.json"}


def saved_dataset(folder: Path) -> bool:
    """Whether ``folder`` is what datasets' ``save_to_disk`` writes: dataset_dict.json, or a Dataset's
    dataset_info.json beside its state.json and arrow files. A dataset_info.json alone sits beside ordinary data
    files in LLaMA-Factory's data/ folder and in some hub downloads: such a folder is read by its files."""
    if (folder / "dataset_dict.json").exists():
        return True
    return (folder / "dataset_info.json").exists() and (
        (folder / "state.json").exists() or any(folder.glob("*.arrow")))


def _check_memory(path: Path) -> None:
    """Refuse, before reading a byte, a file (or folder) that cannot be loaded whole into memory."""
    if path.is_dir():
        if saved_dataset(path):
            return  # arrow files are memory-mapped; rows are read as needed
        size = sum(_data_bytes(p) for p in path.iterdir() if is_data_file(p))
    else:
        size = _data_bytes(path)
    _check_size(size, str(path))


def _check_size(size: int, what: str) -> None:
    need, free = size * MEMORY_EXPANSION, _available_memory()
    if need > free:
        from .memory import human_bytes

        raise FtUsageError(
            f"{what} is {human_bytes(size)}: loading it whole needs about {human_bytes(need)} of memory and "
            f"{human_bytes(free)} is free. Set max_rows (e.g. --max-rows 100000) to stream only the first rows "
            "of .jsonl/.csv/.tsv/.parquet/.txt files, or split the file."
        )


def _looks_like_data(v: Any) -> bool:
    mod = type(v).__module__
    return isinstance(v, (list, tuple)) or mod.startswith(("pandas", "datasets"))


def _split_lists(obj: Any) -> bool:
    """A dict of splits, each a list of records (dicts), rather than a dict of columns; a split may be empty
    ({"train": [...], "test": []}) while another holds records."""
    return isinstance(obj, dict) and bool(obj) and any(obj.values()) and all(
        isinstance(v, list) and all(isinstance(r, dict) for r in v) for v in obj.values())


def _filled(obj: Any) -> list:
    """The splits of ``obj`` (a dict of splits, a DatasetDict) that hold records (a streaming split counts)."""
    return [s for s in obj if not hasattr(obj[s], "__len__") or len(obj[s])]


def _check_train_filled(obj: Any, train: str, what: str) -> None:
    """Refuse a dataset whose split to train on is empty, naming the splits that hold records: training on
    another split unasked (the test split, which would also be its eval data) is not what the author meant."""
    filled = _filled(obj)
    if train in filled:
        return
    others = ", ".join(f"{s!r} holds {len(obj[s]):,} records" if hasattr(obj[s], "__len__") else f"{s!r} streams some"
                       for s in filled)
    raise FtUsageError(f"{what}: its {train!r} split is empty, so there is nothing to train on"
                       + (f" ({others})" if others else "") + f"; put the training examples in {train!r}"
                       + (f", or {_pick_one(what, filled[0])}." if filled and what.startswith("variable") else "."))


def _column_records(columns: dict) -> list[dict]:
    """A dict of columns of one length as its records, one dict per position."""
    keys = list(columns)
    return [dict(zip(keys, vals)) for vals in zip(*columns.values())]


def _columns_as_records(obj: Any) -> Any:
    """``{"train": {"q": [...], "a": [...]}, "test": {...}}`` (each split a dict of columns of one length) as
    ``{"train": [records], ...}``; anything else as it is."""
    def columns(v):
        return (isinstance(v, dict) and v and all(isinstance(c, list) for c in v.values())
                and len({len(c) for c in v.values()}) == 1 and next(iter(v.values())))
    if isinstance(obj, dict) and obj and all(columns(v) for v in obj.values()):
        return {split: _column_records(cols) for split, cols in obj.items()}
    return obj


def _rows_from_object(obj: Any, what: str, limit: Optional[int] = None) -> list[dict]:
    obj = _columns_as_records(obj)
    held = _eval_split(_filled(obj), _train_split(obj)) \
        if type(obj).__name__ in ("DatasetDict", "IterableDatasetDict") or _split_lists(obj) else None
    rows = _rows_of_object(obj, what, limit)
    return _with_held_out(rows, held, obj[held]) if held else rows


def _pick_one(what: str, key: str) -> str:
    """How to train on one part of a variable holding several (--data takes a name, not an expression)."""
    m = re.match(r"variable '([^']+)'", what)
    if m:
        return f"put one in a variable first (part = {m.group(1)}[{key!r}]) and pass --data part"
    return f"keep one (e.g. {key!r}) in the file, or name it 'train'"


def empty_cells(rows) -> list[dict]:
    """``rows`` with each null cell (None) read as an empty one, as a CSV file's empty cell reads (NaN, which a
    text field reads as ""): a table's null - a parquet file's, a datasets table's, a DataFrame's object column's
    (its text columns hold NaN) - is the same missing value. A JSON row's null stays refused: the row wrote it."""
    return [{k: _EMPTY_CELL if v is None else v for k, v in row.items()} if isinstance(row, dict) else row
            for row in rows]


_EMPTY_CELL = float("nan")


def _rows_of_object(obj: Any, what: str, limit: Optional[int] = None) -> list[dict]:
    mod = type(obj).__module__
    name = type(obj).__name__
    if mod.startswith("pandas"):
        if hasattr(obj, "columns") and hasattr(obj, "to_dict"):
            if not obj.columns.is_unique:  # to_dict keeps the last of each name: the other column would be lost
                dups = sorted({str(c) for c in obj.columns[obj.columns.duplicated()]})
                raise FtUsageError(f"{what} has more than one column named {', '.join(map(repr, dups))}; give each "
                                   "column its own name (df.columns = [...]) or drop the extra ones.")
            df = obj if limit is None else obj.head(limit)
            if getattr(obj.columns, "nlevels", 1) > 1:  # a MultiIndex (pivot, groupby): ('x', 'prompt') -> x.prompt
                df = df.set_axis([".".join(str(p) for p in c if str(p)) for c in df.columns], axis=1)
            # a row is named by its index label (what df.loc[...] takes), not by its position: after a filter or a
            # shuffle "row 4" was another row than df.loc[4]
            rows = Rows(empty_cells(df.to_dict(orient="records")))
            if getattr(df.index, "nlevels", 1) == 1:
                rows.index_labels = [label if isinstance(label, numbers.Integral) else repr(label) for label in df.index]
            return rows
        if name == "Series" and all(isinstance(v, str) for v in obj.head(1000)):
            return [{"text": v} for v in (obj if limit is None else obj.head(limit))]
        raise FtUsageError(f"{what} is a pandas {name}; pass a DataFrame with named columns (or a Series of strings).")
    if mod.startswith("datasets"):
        if name in ("DatasetDict", "IterableDatasetDict"):
            splits = list(obj)
            if not splits:
                raise FtUsageError(f"{what} is an empty DatasetDict: it has no splits, so no examples.")
            train = _train_split(splits) or (splits[0] if len(splits) == 1 else None)
            if train is None:
                raise FtUsageError(
                    f"{what} is a DatasetDict without one split to train on (splits: {', '.join(splits)}); "
                    f"{_pick_one(what, splits[0])}.")
            _check_train_filled(obj, train, what)
            if str(train).lower() in EVAL_SPLITS and len(splits) == 1:
                return _only_split(_rows_of_object(obj[train], what, limit), train)
            obj = obj[train]
        if type(obj).__name__.startswith("Iterable"):
            if limit is None:
                raise FtUsageError(f"{what} is a streaming IterableDataset; set max_rows to take its first rows.")
            return empty_cells(dict(r) for r, _ in zip(obj, range(limit)))
        if limit is not None and len(obj) > limit:
            obj = obj.select(range(limit))
        return empty_cells(dict(r) for r in obj)
    if _split_lists(obj):  # {"train": [records], "test": [records]}: as a DatasetDict, or a JSON file of that shape
        train = _train_split(obj) or (next(iter(obj)) if len(obj) == 1 else None)
        if train is None:
            raise FtUsageError(f"{what} holds several lists of records ({', '.join(obj)}) and none is called "
                               f"'train'; {_pick_one(what, next(iter(obj)))}.")
        _check_train_filled(obj, train, what)
        rows = _rows_from_object(obj[train], what, limit)
        return _only_split(rows, train) if str(train).lower() in EVAL_SPLITS and len(obj) == 1 else rows
    if isinstance(obj, dict) and obj and all(isinstance(v, list) for v in obj.values()):
        lengths = {len(v) for v in obj.values()}
        if len(lengths) == 1:  # a dict of columns
            rows = _column_records(obj)
            return rows[:limit] if limit else rows
        if all(not v or not isinstance(v[0], dict) for v in obj.values()):  # columns, not lists of records
            sizes = ", ".join(f"{k} {len(v):,}" for k, v in obj.items())
            raise FtUsageError(f"{what} is a dict of columns of different lengths ({sizes}); each column needs one "
                               "value per example: make them the same length.")
    if isinstance(obj, (list, tuple)):
        rows = list(obj) if limit is None else list(obj[:limit])
        if rows and all(isinstance(r, str) for r in rows):
            return [{"text": r} for r in rows]
        kind = str if rows and isinstance(rows[0], str) else dict  # what the first item makes the list: texts or rows
        for i, r in enumerate(rows):
            if not isinstance(r, kind):
                first = "" if i == 0 else f" (item 0 is a {'string' if kind is str else 'dict'}" + (
                    ": the items may not be both)" if isinstance(r, (str, dict)) else ")")
                got = "None" if r is None else ("an " if type(r).__name__[0] in "aeiou" else "a ") + type(r).__name__
                raise FtUsageError(f"{what}: item {i} is {got}{first}; a list must hold dicts (one per example) or "
                                   "strings (one text each).")
        return rows
    var = re.fullmatch(r"variable '([A-Za-z_][A-Za-z0-9_]*)'", what)
    named = (f" To read the file or folder it names, write --data ${var.group(1)} (IPython puts the variable's value "
             f"in the line) or the path itself." if var and isinstance(obj, (str, os.PathLike)) else "")
    raise FtUsageError(
        f"{what} is a {name}; --data takes a pandas DataFrame, a list of dicts or strings, "
        f"a datasets.Dataset or DatasetDict.{named}"
    )


def data_suffix(path) -> str:
    """The format suffix of a data file's name, compression aside: ``.jsonl`` for ``train.jsonl`` and for
    ``train.jsonl.gz``."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    if len(suffixes) >= 2 and suffixes[-1] in COMPRESSIONS:
        return suffixes[-2]
    return Path(path).suffix.lower()


def is_data_file(path: Path) -> bool:
    """A file whose name says it holds data ftmagics reads (compressed or not)."""
    return path.is_file() and data_suffix(path) in FILE_SUFFIXES


def _open_data(path: Path, mode: str = "rb"):
    """``path`` opened for reading, through its decompressor where its name says it is compressed; text modes read
    UTF-8, a leading byte-order mark dropped (not read as text)."""
    import bz2
    import gzip
    import lzma

    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(Path(path).suffix.lower(), open)
    text = dict(encoding="utf-8-sig") if "b" not in mode else {}
    if opener is not open and "b" not in mode:
        mode = mode + "t" if "t" not in mode else mode
    try:
        return opener(path, mode, **text)
    except OSError as exc:
        raise FtUsageError(f"cannot read {path}: {exc.strerror or exc}. Check the path and its permissions.") from None


def _open_text(path: Path):
    return _open_data(path, "r")


def _data_bytes(path: Path) -> int:
    """About how many bytes ``path`` holds once read: its size, or for a compressed file what gzip's trailer says
    (below 4 GiB) or else ten times its size (bz2, xz: text compresses about that much)."""
    size = path.stat().st_size
    suffix = path.suffix.lower()
    if suffix == ".gz" and size >= 18:
        with open(path, "rb") as fh:
            fh.seek(-4, 2)
            whole = int.from_bytes(fh.read(4), "little")  # ISIZE: the uncompressed length modulo 2**32
        if size <= whole <= size * 1032:  # deflate's largest ratio: beyond it the trailer is not one (a cut file)
            return whole
    return size * 10 if suffix in COMPRESSIONS else size


def _csv_separator(path: Path, suffix: str) -> tuple:
    """``(the column separator of a .csv/.tsv file, lines to skip before the header)``: a tab for .tsv; Excel's
    ``sep=;`` first line where there is one (it names the separator and is not the header); for .csv a comma,
    unless the header line has none but a semicolon, tab or bar (spreadsheets in many locales export
    'question;answer'), or another of those splits the first rows into the same number of fields while commas
    do not, or only as prose does, followed by a space ('question;answer, short')."""
    import csv

    if suffix == ".tsv":
        return "\t", 0
    with _open_text(path) as f:
        head = f.read(1 << 16)
    m = re.match(r"\s*sep=(.)[ \t]*\r?\n", head)
    if m:
        return m.group(1), 1
    header = head.split("\n", 1)[0]
    others = [sep for sep in (";", "\t", "|") if sep in header]
    if "," not in header or not others:
        return ("," if "," in header or not others else others[0]), 0
    complete = head if len(head) < (1 << 16) else head[:head.rfind("\n") + 1]  # whole lines only
    records = lambda sep: [r for r in itertools.islice(csv.reader(io.StringIO(complete), delimiter=sep), 50) if r]  # noqa: E731

    def fits(sep: str) -> bool:  # every row as many fields as the header, and more than one
        counts = {len(r) for r in records(sep)}
        return len(counts) == 1 and counts.pop() > 1

    def prose(sep: str) -> bool:  # mostly followed by a space: punctuation in text, not a separator
        return complete.count(sep + " ") * 2 > complete.count(sep)

    fitting = [sep for sep in [","] + others if fits(sep)]
    plain = [sep for sep in fitting if not prose(sep)]
    return (plain or fitting or [","])[0], 0


def _json_kind(value) -> str:
    """What a JSON value is, in JSON's words: "a JSON array", "JSON null"."""
    if value is None:
        return "JSON null"
    kinds = {bool: "a JSON boolean", str: "a JSON string", list: "a JSON array", int: "a JSON number", float: "a JSON number"}
    return kinds.get(type(value), f"a JSON {type(value).__name__}")


def _csv_text(path: Path, skip: int = 0):
    """The file as text, the ``skip`` lines before its header (Excel's ``sep=`` line) read past."""
    fh = _open_text(path)
    for _ in range(skip):
        fh.readline()
    return fh


def _read_csv(path: Path, suffix: str, limit: Optional[int]) -> "Rows":
    """The rows of a .csv/.tsv file, every field the text written in it.

    Fields are read as strings, never type-guessed: pandas would turn a column of numbers into numbers
    ('02134' into 2134, '0.50' into 0.5) and a column of True/False into booleans. A row with more fields
    than the header is refused with its line number: pandas would silently read the first column of such a
    first row as an index and shift every column by one."""
    import csv
    import warnings

    import pandas as pd

    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))  # a 140k-character cell: Python's csv refused it
    sep, skip = _csv_separator(path, suffix)
    quoting = _tsv_quoting(path, skip) if sep == "\t" else csv.QUOTE_MINIMAL
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", pd.errors.ParserWarning)  # "leads to a loss of data": a too-long row
            df = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, index_col=False, nrows=limit,
                             quoting=quoting, skiprows=skip,
                             encoding="utf-8-sig")  # -sig: a byte-order mark (Excel's UTF-8 export) is not a column
    except (pd.errors.ParserWarning, pd.errors.ParserError) as exc:
        raise _csv_row_error(path, sep, quoting, skip=skip) or FtUsageError(
            f"cannot parse {path}: {str(exc).splitlines()[0]}") from None
    # pandas fills a short row's missing fields with "" (the answer read as empty), and renames a header's second
    # 'prompt' 'prompt.1' (a column then unused): both without a word
    if len(df.columns) > 1 and (df == "").to_numpy().any():
        short = _csv_row_error(path, sep, quoting, short=True, skip=skip)
        if short is not None:
            raise short
        df = df[(df != "").any(axis=1)]  # a spreadsheet's blank rows (',,'): no example, as a blank line is none
    # a cell that spans lines keeps the file's line ends: Windows' \r\n would train the model to write \r
    crlf = [c for c in df.columns if df[c].str.contains("\r", regex=False).any()]
    for c in crlf:
        df[c] = df[c].str.replace("\r\n", "\n", regex=False)
    header = _csv_header(path, sep, quoting, skip)
    # a spreadsheet's export often ends its rows in empty columns ('Question,Answer,,'): no name and no data
    blank = [i for i, h in enumerate(header) if not h and i < len(df.columns) and (df.iloc[:, i] == "").all()]
    if blank:
        df = df.drop(columns=[df.columns[i] for i in blank])
        header = [h for i, h in enumerate(header) if i not in blank]
    twice = sorted({h for h in header if header.count(h) > 1})
    if twice:
        raise FtUsageError(f"{path}: the header names more than one column {', '.join(map(repr, twice))}; give each "
                           "column its own name (only one of them would be read).")
    stripped = [str(c).strip() for c in df.columns]
    if len(set(stripped)) == len(stripped):  # "question, answer": the header's spaces are not the names
        df.columns = stripped
    # errors name "path, line N", the line the row starts on, as a refusal of the file names its rows: a row number
    # counted by pandas skipped blank lines and counted a quoted cell's line breaks as nothing
    lines = _csv_record_lines(path, sep, quoting, skip, limit)
    return Rows(df.to_dict(orient="records"),
                [f"{path}, line {lines[i]}" if i < len(lines) else f"{path}, row {i + 1}" for i in df.index])


def _csv_record_lines(path: Path, sep: str, quoting: int, skip: int = 0, limit: Optional[int] = None) -> list:
    """The line of the file each data row (after the header) starts on, in the order pandas reads them: blank
    lines are no row (pandas skips them; csv reads them as []), a quoted cell's line breaks are part of its row.
    With ``limit`` (max_rows: pandas read that many), the rest of the file is not read."""
    import csv

    starts = []
    with _csv_text(path, skip) as fh:
        # strict: a field whose opening quote closes before the field ends ('"Hello" she said') is an error, where
        # pandas and a lenient reader drop those quotes without a word
        reader = csv.reader(fh, delimiter=sep, quoting=quoting, strict=quoting != csv.QUOTE_NONE)
        before = 0
        try:
            for row in reader:
                if limit is not None and len(starts) > limit:
                    break
                if row:
                    starts.append(before + 1 + skip)
                before = reader.line_num
        except csv.Error as exc:
            if "expected after" not in str(exc):
                raise
            raise _quote_closed_early(path, sep, reader.line_num + skip) from None
    return starts[1:]  # the first is the header


def _quote_closed_early(path: Path, sep: str, line: int) -> FtUsageError:
    """The refusal of a CSV-quoted row with a field like '"Hello" she said', whose quotes a CSV reader drops."""
    with _open_text(path) as fh:
        text = next((t for i, t in enumerate(fh, 1) if i == line), "").rstrip("\r\n")
    field = next((f for f in text.split(sep) if f.startswith('"') and not f.endswith('"')), text)
    shown = field if len(field) <= 60 else field[:57] + "..."
    tsv = sep == "\t"
    return FtUsageError(
        f"{path}, line {line}: the field {shown} opens a quote that closes before the field ends; read "
        f"{'with the CSV-style quoting this file uses elsewhere (a field wrapped in quotes)' if tsv else 'as CSV'}, "
        f"its quotes would be lost ('\"Hello\" she said' reads as 'Hello she said'). Wrap the whole field in quotes "
        f"and double the quotes inside it ('\"\"\"Hello\"\" she said\"')"
        + (", or wrap no field in quotes: then every quote is text." if tsv else "."))


def _tsv_quoting(path: Path, skip: int = 0) -> int:
    """How a tab-separated file quotes: literally (csv.QUOTE_NONE, the TSV convention: a quote is text), unless
    it was written with CSV-style quoting (a field wrapped in quotes, as pandas writes one holding a tab or a
    line break, or a row that only has its fields once quotes join lines). Read with CSV quoting, a hand-written
    '"Hello" she said' lost its quotes and a stray quote merged the rows after it into one prompt."""
    import csv

    with _csv_text(path, skip) as fh:
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, [])
        for row in reader:
            if not row:
                continue
            if len(row) != len(header) or any(len(f) >= 2 and f[0] == f[-1] == '"' for f in row):
                return csv.QUOTE_MINIMAL
    return csv.QUOTE_NONE


_CP1252_HOLES = {0x81, 0x8D, 0x8F, 0x90, 0x9D}  # the bytes Windows-1252 leaves undefined


def legacy_encoding(data: bytes) -> str:
    """The single-byte encoding a non-UTF-8 text most likely is: ``cp1252`` (Windows, Excel: curly quotes, dashes
    and the euro sign at bytes 0x80-0x9F) where it uses those bytes, else ``latin-1``. Read as Latin-1, Windows
    text turns those characters into invisible control characters that train without a word."""
    upper = {b for b in data if 0x80 <= b <= 0x9F}
    return "cp1252" if upper and not upper & _CP1252_HOLES else "latin-1"


def _not_utf8(path: Path, suffix: str) -> FtUsageError:
    """The refusal of a file that is not UTF-8, with the way to convert it that fits its encoding and type: one
    bad line in a UTF-8 file is named by its line (converting the whole file would garble the rest), a Windows
    file is read as cp1252, a UTF-16 table exported as .txt is saved as .tsv."""
    with _open_data(path) as fh:
        data = fh.read(64 << 20)
    p = f"p = pathlib.Path({str(path)!r}); "
    utf16 = data[:2] in (b"\xff\xfe", b"\xfe\xff") or (len(data) >= 8 and data[1:8:2].count(0) == 4) or (
        len(data) >= 8 and data[0:8:2].count(0) == 4)  # (a BOM, or ASCII text with every other byte 0: no BOM)
    if utf16:
        enc = "utf-16" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else ("utf-16-le" if data[1] == 0 else "utf-16-be")
        try:
            first = data.decode(enc, errors="replace").lstrip("\ufeff").split("\n", 1)[0]
        except LookupError:  # pragma: no cover
            first = ""
        table = "\t" in first and suffix not in (".csv", ".tsv")  # Excel's "Unicode text": a tab-separated table
        target = "p.with_suffix('.tsv')" if table else "p"
        return FtUsageError(
            f"{path} is UTF-16 text, not UTF-8: save it as UTF-8 (in Python: {p}{target}.write_text(p.read_text("
            f"encoding='{enc}'), encoding='utf-8'))" + (", named .tsv: its lines are a tab-separated table (as .txt "
                                                          "they would train as plain text, the header too)" if table else "")
            + ", then train on it again.")
    try:
        data.decode("utf-8")
        bad = None
    except UnicodeDecodeError as exc:
        bad = exc.start
    rest = data.decode("utf-8", errors="ignore")
    if bad is not None and any(ord(c) > 127 for c in rest):  # valid multi-byte characters elsewhere: one bad spot
        line = data.count(b"\n", 0, bad) + 1
        column = bad - (data.rfind(b"\n", 0, bad) + 1) + 1
        snippet = data[max(0, bad - 20):bad + 5].decode("utf-8", errors="replace").replace("\n", " ")
        return FtUsageError(
            f"{path}, line {line}: not UTF-8 text (byte {column} of the line: ...{snippet}...), while the rest of the "
            f"file is UTF-8: that line was written in another encoding (an accented letter as one byte, e.g. from "
            "Latin-1). Retype or fix that line (and any like it) in an editor; do not convert the whole file, which "
            "would garble its correct characters.")
    enc = legacy_encoding(data)
    name = "Windows-1252 (Excel on Windows)" if enc == "cp1252" else "Latin-1 (Western European)"
    if suffix in (".csv", ".tsv"):
        how = (f"or read it in a cell with its encoding (it looks like {name}: pandas.read_csv(path, encoding="
               f"'{enc}', dtype=str, keep_default_na=False): every field as the text written, '02134' not 2134) and "
               "pass the DataFrame's name to --data")
    else:
        how = f"e.g. from {name} in Python: {p}p.write_text(p.read_text(encoding='{enc}'), encoding='utf-8')"
    return FtUsageError(f"{path} is not UTF-8 text. Save it as UTF-8, {how}.")


def _csv_header(path: Path, sep: str, quoting: int, skip: int = 0) -> list:
    """The header row's column names, stripped of spaces (and of a byte-order mark)."""
    import csv

    with _csv_text(path, skip) as fh:
        return [h.strip().lstrip("\ufeff").strip() for h in next(csv.reader(fh, delimiter=sep, quoting=quoting), [])]


def _quoted_example(sep: str) -> str:
    """A quoted field that holds the separator, as it is written in a file with that separator."""
    return '"like<TAB>this"' if sep == "\t" else f'"like{sep} this"'


def _csv_row_error(path: Path, sep: str, quoting: int = 0, short: bool = False,
                   skip: int = 0) -> Optional[FtUsageError]:
    """The first row with more fields than the header (with ``short``: fewer, blank lines aside), named by its
    line, or None."""
    import csv

    with _csv_text(path, skip) as fh:
        reader = csv.reader(fh, delimiter=sep, quoting=quoting)
        header = next(reader, [])
        for row in reader:
            if len(row) > len(header):
                return FtUsageError(
                    f"{path}, line {reader.line_num + skip}: {len(row)} fields where the header has {len(header)} "
                    f"({', '.join(h.strip() for h in header)}). Put quotes around a field that contains "
                    f"{'a tab' if sep == chr(9) else repr(sep)} ({_quoted_example(sep)}), or remove the extra field.")
            if short and 0 < len(row) < len(header) and any(f.strip() for f in row):
                missing = ", ".join(h.strip() for h in header[len(row):])
                return FtUsageError(
                    f"{path}, line {reader.line_num + skip}: {len(row)} field{'s' if len(row) != 1 else ''} where the header "
                    f"has {len(header)}: {missing} {'is' if len(header) - len(row) == 1 else 'are'} missing, and would "
                    f"be read as empty. Add the missing field(s) (an empty one is written as nothing after the "
                    f"{'tab' if sep == chr(9) else repr(sep)}), or remove the row.")
    return None


def _read_jsonl(path: Path, limit: Optional[int] = None, array_ok: bool = True) -> Rows:
    rows = Rows(locs=[])
    with _open_data(path) as fh:  # bytes, decoded line by line: a bad byte is reported on its own line
        for n, raw in enumerate(fh, 1):
            if limit is not None and len(rows) >= limit:
                break
            if n == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark (Windows editors, Excel)
                raw = raw[3:]
            if n == 1 and array_ok and raw.lstrip().startswith(b"["):  # one JSON array of records, named .jsonl
                return _read_json(path, limit)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                if n == 1 and raw[:2] in (b"\xff\xfe", b"\xfe\xff"):  # the whole file is UTF-16
                    raise _not_utf8(path, ".jsonl") from None
                enc = legacy_encoding(raw)
                raise FtUsageError(
                    f"{path}, line {n}: not UTF-8 text (byte {exc.start + 1}). Save the file as UTF-8 (if every line "
                    f"is in one other encoding, e.g. {'Windows-1252' if enc == 'cp1252' else 'Latin-1'}: p = pathlib."
                    f"Path({str(path)!r}); p.write_text(p.read_text(encoding='{enc}'), encoding='utf-8'); if only some "
                    "lines are, fix those lines).") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line.rstrip("\r\n"), parse_constant=_refuse_constant)  # (a line cut inside a
            except _JsonConstant as exc:  # string: "unterminated", not "control character", its line end read as
                raise FtUsageError(f"{path}, line {n}: {_constant_problem(exc)}") from None  # part of the string)
            except json.JSONDecodeError as exc:
                if not rows and array_ok and line.strip() in ("{", "["):  # pretty-printed: jq's default output,
                    spread = _spread_json(path, limit)  # json.dump(..., indent=2)
                    if spread is not None:
                        return spread
                last = not any(rest.strip() for rest in fh)  # (nothing is read after this error)
                cut = last and (exc.msg.startswith("Unterminated string") or exc.pos >= len(line.rstrip()) - 1)
                raise FtUsageError(
                    f"{path}, line {n}: not valid JSON ({_json_problem(exc)} at column {exc.colno}). " + (
                        "It is the file's last line and it stops mid-object: the file looks cut short (an "
                        "interrupted write, copy or download). Write the file again, or delete that line to train "
                        "on the lines before it." if cut else "Each line of a .jsonl file must be one JSON object.")
                ) from None
            if not isinstance(row, dict):
                raise FtUsageError(f"{path}, line {n}: {_json_kind(row)}, where each line is one example, an object "
                                   "{...}.")
            rows.append(row)
            rows.locs.append(f"{path}, line {n}")
    return rows


def _iter_blocks(fh):
    block: list = []
    for line in fh:
        if line.strip():
            block.append(line.rstrip("\n"))
        elif block:
            yield "\n".join(block).strip()
            block = []
    if block:
        yield "\n".join(block).strip()


def _read_txt(path: Path, mode: str, limit: Optional[int] = None) -> list[dict]:
    if mode == "auto":
        with _open_text(path) as fh:
            head = fh.read(1 << 20)
        mode = "blocks" if re.search(r"\n[ \t]*\n", head.strip()) else "lines"
    with _open_text(path) as fh:
        if mode == "document":
            text = fh.read()
            return [{"text": text}] if text.strip() else []
        parts = _iter_blocks(fh) if mode == "blocks" else (line.strip() for line in fh)
        rows = []
        for p in parts:
            if limit is not None and len(rows) >= limit:
                break
            if p:
                rows.append({"text": p})
        return rows


def _spread_json(path: Path, limit: Optional[int]) -> Optional[list]:
    """The rows of a .jsonl file whose objects are spread over several lines (pretty-printed: one JSON value, or
    objects one after another as ``jq`` prints them), or None where the text is not that either."""
    with _open_text(path) as fh:
        text = fh.read()
    decoder, values, i = json.JSONDecoder(), [], 0
    try:
        while True:
            while i < len(text) and text[i].isspace():
                i += 1
            if i >= len(text):
                break
            value, i = decoder.raw_decode(text, i)
            values.append(value)
    except json.JSONDecodeError:
        return None
    if len(values) == 1:  # one pretty-printed JSON value ({"train": [...]}): read as a .json file is
        return _read_json(path, limit) if isinstance(values[0], (dict, list)) else None
    if not values or not all(isinstance(v, dict) for v in values):
        return None
    return values[:limit] if limit is not None else values


class _JsonConstant(ValueError):
    """NaN, Infinity or -Infinity in a JSON file: Python's json reads them, JSON has none."""


def _refuse_constant(name: str):
    raise _JsonConstant(name)


def _constant_problem(exc: _JsonConstant) -> str:
    return (f"{exc} is not a JSON value (Python's json.dump writes it for a float NaN or infinity, as a DataFrame's "
            "empty cell). Write null for a missing value, or the text itself.")


def _read_json(path: Path, limit: Optional[int]) -> list[dict]:
    with _open_text(path) as fh:
        raw = fh.read()
    try:
        data = json.loads(raw, parse_constant=_refuse_constant)
    except _JsonConstant as exc:
        raise FtUsageError(f"{path}: {_constant_problem(exc)}") from None
    except json.JSONDecodeError as exc:
        if exc.lineno > 1:  # a .json file that is really JSON lines?
            try:
                return _read_jsonl(path, limit, array_ok=False)
            except FtUsageError as lines_exc:
                if exc.msg == "Extra data":  # one complete value per line until then: JSON lines, with its error
                    raise FtUsageError(f"{lines_exc} ({path.name} holds JSON lines, one object per line, not one "
                                       "JSON value: its lines are read as a .jsonl file's)") from None
        raise FtUsageError(
            f"{path}, line {exc.lineno}: not valid JSON ({_json_problem(exc)} at column {exc.colno})."
        ) from None
    held = None
    data = _columns_as_records(data)  # {"train": {columns}, "test": {columns}}: as splits of records
    if isinstance(data, dict):
        lists = [k for k, v in data.items() if isinstance(v, list) and v and all(isinstance(r, dict) for r in v)]
        named = _train_split(data)
        if lists and named not in (None, *lists):  # {"train": [], "test": [...]}
            _check_train_filled(data, named, str(path))
        train = _train_split(lists) or (lists[0] if len(lists) == 1 else None)
        if train is not None:  # {"data": [...]}, {"train": [...], "test": [...]}
            held = _eval_split(lists, train)
            held = (held, data[held]) if held else None
            data = data[train]
        elif all(isinstance(v, list) for v in data.values()) and len({len(v) for v in data.values()}) == 1:
            pass  # a dict of columns: handled by _rows_from_object
        elif len(lists) > 1:
            raise FtUsageError(
                f"{path}: the JSON object holds several lists of records ({', '.join(lists)}) and none is "
                "called 'train'; keep one, or give a list of records or JSON lines."
            )
        elif data and all(isinstance(v, list) for v in data.values()):
            sizes = {k: len(v) for k, v in data.items()}  # a dict of columns, one of them short: no row is whole
            raise FtUsageError(
                f"{path}: the JSON object is a set of columns of different lengths "
                f"({', '.join(f'{k}: {n} entries' for k, n in sizes.items())}); each column needs one entry "
                "per example. Fill the short column(s), or give a list of records instead.")
        else:
            data = [data]
    elif not isinstance(data, list):  # 3, "text", null: not records
        raise FtUsageError(f"{path} holds a single JSON {type(data).__name__ if data is not None else 'null'}, not "
                           "records: a .json file holds a list of objects (one per example) or an object whose list "
                           "is the records; JSON lines (.jsonl) hold one object per line.")
    rows = _rows_from_object(data, str(path), limit)
    return _with_held_out(rows, *held) if held else rows


def _rows_from_files(files: list, txt_mode: str, limit: Optional[int], label, where: str = "") -> list[dict]:
    """The rows of several data files in turn, each row's location labelled with ``label(file)``."""
    rows = Rows(locs=[])
    for f in files:
        if limit is not None and len(rows) >= limit:
            break
        if f.stat().st_size == 0:
            raise FtUsageError(f"{f} is empty; remove it{where} or fill it.")
        part = _rows_from_path(f, txt_mode, None if limit is None else limit - len(rows))
        rows.extend_from(part, label(f))
    return rows


def _rows_from_path(path: Path, txt_mode: str, limit: Optional[int] = None) -> list[dict]:
    if path.is_dir():
        if saved_dataset(path):
            import datasets

            try:
                ds = datasets.load_from_disk(str(path))
            except Exception as exc:  # noqa: BLE001 - corrupt arrow files, version mismatches
                raise FtUsageError(f"cannot read the saved dataset {path}: {type(exc).__name__}: {exc}") from None
            return _rows_from_object(ds, f"saved dataset {path}", limit)
        if (path / "config.json").is_file() and any(path.glob("*.safetensors")) or any(path.glob("*.gguf")):
            raise FtUsageError(f"folder {path} holds a model (config.json and weights), not data: --data takes a "
                               "dataset (a file, a folder of data files, a variable). A model is loaded with "
                               "%qlora_load.")
        # hidden files (.notes.jsonl, macOS' ._resource forks) are not data, as a glob skips them
        files = sorted(p for p in path.iterdir()
                       if is_data_file(p) and not p.name.startswith(".") and p.name.lower() not in DATASET_METADATA)
        # train/ beside test/: with the files of the subfolders whose names name splits, if they name the training one
        in_splits = sorted(p for d in path.iterdir() if d.is_dir() and _split_key(d / "x", path)
                           for p in d.rglob("*") if is_data_file(p)
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if in_splits and _split_files(files + in_splits, path) is not None:
            files = sorted(files + in_splits)
        if not files:
            deeper = sorted({p.parent for p in path.rglob("*") if is_data_file(p)
                             and not any(part.startswith(".") for part in p.relative_to(path).parts)})
            raise FtUsageError(
                f"folder {path} holds no {', '.join(FILE_SUFFIXES)} files and is not a saved dataset "
                "(datasets' save_to_disk writes dataset_info.json)"
                + (f"; its subfolders are not searched, and {deeper[0].relative_to(path)}/ holds data: --data "
                   f"{deeper[0]} reads it" if deeper else "") + "."
            )
        rows = _rows_of_split_files(files, path, txt_mode, limit, lambda f: str(f.relative_to(path)),
                                    where=f" from {path}")
        read = set(files)  # (with a split-named subfolder's files where they split: named by the split note)
        skipped = sorted(p for p in path.rglob("*") if p.parent != path and p not in read and is_data_file(p)
                         and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if skipped:  # half the data left out without a word: the subfolders' files are not read, and said so
            shown = ", ".join(str(p.relative_to(path)) for p in skipped[:3]) + (
                f" and {len(skipped) - 3} more" if len(skipped) > 3 else "")
            suffixes = {data_suffix(p) for p in files + skipped}
            pattern = str(path / "**" / ("*" + suffixes.pop() if len(suffixes) == 1 else "*"))
            rows.file_splits = "; ".join(filter(None, [rows.file_splits, (
                f"not read: {shown} in its subfolders (a folder's own files are read; --data '{pattern}' reads "
                "every level)")]))
        return rows
    suffix = data_suffix(path)
    if suffix not in FILE_SUFFIXES:
        raise FtUsageError(
            f"{path.name}: unsupported file type {suffix or '(no extension)'!r}"
            f"{did_you_mean(suffix, FILE_SUFFIXES)}; use one of {', '.join(FILE_SUFFIXES)}"
            f" (each also compressed: {', '.join(COMPRESSIONS)}, e.g. train.jsonl.gz)"
            + (f". A spreadsheet: read it in a cell, df = pandas.read_excel({str(path)!r}, dtype=str) (every cell as "
               "the text shown), then --data df; or save it as CSV" if suffix in (".xlsx", ".xls", ".xlsm", ".ods")
               else "") + "."
        )
    if path.stat().st_size == 0:
        raise FtUsageError(f"{path} is empty (0 bytes): it holds no examples.")
    try:
        if suffix != ".parquet":  # text with NUL bytes: UTF-16 without a byte-order mark reads as valid UTF-8
            with _open_data(path) as fh:  # (ASCII with a NUL after each letter), and would train as such
                if b"\x00" in fh.read(4096):
                    raise _not_utf8(path, suffix)
        if suffix == ".jsonl":
            return _read_jsonl(path, limit)
        if suffix == ".json":
            if limit is not None:
                _check_memory(path)  # plain JSON cannot be streamed: it is parsed whole
            return _read_json(path, limit)
        if suffix in (".csv", ".tsv"):
            return _read_csv(path, suffix, limit)
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            # a compressed parquet file (rare: parquet compresses inside) is read whole: parquet needs to seek
            pf = pq.ParquetFile(io.BytesIO(_open_data(path).read()) if path.suffix.lower() in COMPRESSIONS else path)
            if limit is None:
                return empty_cells(pf.read().to_pylist())
            rows = []
            for batch in pf.iter_batches(batch_size=min(limit, 10_000)):
                rows += batch.to_pylist()
                if len(rows) >= limit:
                    break
            return empty_cells(rows[:limit])
        return _read_txt(path, txt_mode, limit)
    except FtUsageError:
        raise
    except UnicodeDecodeError:
        raise _not_utf8(path, suffix) from None
    except EOFError:
        raise FtUsageError(f"{path} ends early: the compressed file is cut short (an interrupted download or copy?). "
                           "Fetch or compress it again.") from None
    except OSError as exc:
        raise FtUsageError(f"cannot read {path}: {exc}.") from None
    except Exception as exc:  # noqa: BLE001 - pandas/pyarrow parser errors
        raise FtUsageError(f"cannot parse {path}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None


# ----------------------------------------------------------------------------- formats
FORMAT_KEYS = {
    "chat": ("messages",),
    "sharegpt": ("conversations",),
    "prompt-completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "text": ("text",),
}


def parse_map(spec: Optional[str]) -> dict:
    if not spec:
        return {}
    out = {}
    for part in str(spec).split(","):
        if not part.strip():
            continue
        if "=" not in part:
            raise FtUsageError(f"--map {spec!r}: each entry must be 'source_column=field', e.g. question=prompt.")
        a, b = (s.strip() for s in part.split("=", 1))
        if not a or not b:
            raise FtUsageError(f"--map {spec!r}: empty column name in {part!r}.")
        if a in out:  # the last would win without a word
            raise FtUsageError(f"--map {spec!r}: column {a!r} is mapped twice ({a}={out[a]} and {a}={b}); map it once.")
        if b in out.values():  # one field from two columns: one of them would be dropped without a word
            first = next(k for k, v in out.items() if v == b)
            raise FtUsageError(f"--map {spec!r}: {first!r} and {a!r} both map to {b!r}; a field takes one column "
                               "(to combine columns, join them into one first, e.g. in pandas).")
        out[a] = b
    return out


# every field a format reads (FORMAT_KEYS and the optional ones): matched in any letter case
FORMAT_FIELDS = ("messages", "conversations", "prompt", "completion", "instruction", "input", "output", "text",
                 "system", "tools")


def _plain(name: Any) -> str:
    """A column's name as matched against field names: any letter case, no surrounding spaces (a CSV header
    written "prompt, completion" has a column ' completion')."""
    return str(name).strip().lower()


def _field_case(keys: Iterable) -> dict:
    """``{column: field}`` for columns that are a format's field names in another letter case ('Instruction') or
    with spaces around them (' output'), where the field itself is not a column too."""
    keys = [k for k in keys if isinstance(k, str)]
    return {k: _plain(k) for k in keys if k != _plain(k) and _plain(k) in FORMAT_FIELDS and _plain(k) not in keys}


def _spaced_columns(mapping: dict, keys: set) -> dict:
    """``mapping`` with each source column that is not a column but names exactly one column with spaces around
    it (--map "completion=..." for a CSV's ' completion') replaced by that column."""
    out = {}
    for a, b in mapping.items():
        spaced = [k for k in keys if isinstance(k, str) and k.strip() == a] if a not in keys else []
        out[spaced[0] if len(spaced) == 1 else a] = b
    return out


def detect_format(keys: Iterable[str]) -> Optional[str]:
    keys = set(keys)
    for fmt, need in FORMAT_KEYS.items():
        if all(k in keys for k in need):
            return fmt
    return None


PROMPT_NAMES = ("prompt", "question", "query", "instruction", "input", "q", "user", "source", "request", "context")
ANSWER_NAMES = ("completion", "answer", "response", "output", "target", "a", "reply", "assistant", "solution",
                "label", "chosen")
TEXT_NAMES = ("text", "content", "body", "document", "passage", "sentence", "article", "story")


def conversation_cell(value: Any) -> Any:
    """``value`` as a list of messages where it is one written as JSON text (a CSV cell, a string column: TRL's
    conversational prompt / completion / chosen / rejected saved to a table), else unchanged. Text that only looks
    like one stays text."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("[") and text.endswith("]") and ('"role"' in text or '"from"' in text):
            try:
                parsed = json.loads(text)
            except ValueError:
                return value
            if isinstance(parsed, list) and parsed and all(isinstance(m, dict) and ("role" in m or "from" in m)
                                                           for m in parsed):
                return parsed
    return value


def _is_conversation(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "role" in m for m in value)


def _turn_pair(m: Any) -> bool:
    """``{"user": "hi", "assistant": "hello"}``: one exchange, each side under its role's name (no role field)."""
    return (isinstance(m, dict) and bool(m) and "role" not in m and "from" not in m
            and all(_plain(k) in ROLE_ALIASES for k in m))


def _spelled_turns(seq: list, where: str = "data") -> list:
    """A conversation written another way, as role/content messages: a list of exchanges keyed by role
    (``[{"user": .., "assistant": ..}, ...]``, system first, then the user, then the answer), or a list of plain
    strings, which alternate user and assistant from the first (a dialog's utterances; one alone is a question
    without an answer). Anything else as it is."""
    if all(_turn_pair(m) for m in seq):
        order = {role: i for i, role in enumerate(CHAT_ROLES)}
        return [{"role": k, "content": m[k]} for m in seq
                for k in sorted(m, key=lambda k: order[ROLE_ALIASES[_plain(k)]])]
    if seq and isinstance(seq[0], str):
        bad = next((j for j, m in enumerate(seq) if not isinstance(m, str)), None)
        if bad is not None:
            kind = type(seq[bad]).__name__
            got = {"NoneType": "null", "dict": "an object", "list": "a list", "bool": "true/false", "int": "a number",
                   "float": "a number"}.get(kind, f"a {kind}")
            raise FtUsageError(f"{where}, message {bad}: the dialog's utterances are plain strings (message 0 is one), "
                               f"and this one is {got}; write every utterance as text, or every message as an object "
                               "with 'role' and 'content'.")
        return [{"role": ("user", "assistant")[i % 2], "content": m} for i, m in enumerate(seq)]
    return seq


def _is_spelled_conversation(value: Any) -> bool:
    """A list that :func:`_spelled_turns` reads as a conversation."""
    try:
        return isinstance(value, list) and bool(value) and _is_conversation(_spelled_turns(value))
    except FtUsageError:
        return True  # a dialog with a bad utterance: the map that reads it also names the utterance


def _is_texty(value: Any) -> bool:
    return isinstance(value, (str, int, float)) and not isinstance(value, bool)


def _mapless(name, strict: bool = False) -> bool:
    """Whether column ``name`` cannot be written in a --map (it holds ',' or '='), or (not ``strict``) reads as a
    sentence (ends in '.', '?' or '!' after a space-separated phrase): a data row taken for the header."""
    name = str(name)
    if "," in name or "=" in name:
        return True
    return not strict and " " in name.strip() and name.rstrip().endswith((".", "?", "!"))


def suggest_map(keys: Iterable[str], sample: Optional[dict] = None) -> Optional[str]:
    """A --map value that would make these columns a known format, guessed from common column names and,
    given a ``sample`` row, from what the columns hold (a list of role/content messages is a chat; a
    nested object is nothing to train on)."""
    keys = list(keys)
    if sample is not None:
        chats = [str(k) for k in keys if _is_conversation(conversation_cell(sample.get(k)))
                 or _is_spelled_conversation(sample.get(k))]
        if chats:
            return f"{chats[0]}=messages"
        keys = [k for k in keys if _is_texty(sample.get(k))]
    by_lower = {_plain(k): str(k) for k in keys}
    prompt = next((by_lower[n] for n in PROMPT_NAMES if n in by_lower), None)
    answer = next((by_lower[n] for n in ANSWER_NAMES if n in by_lower and by_lower[n] != prompt), None)
    if prompt and answer:
        return f"{prompt}=prompt,{answer}=completion"
    text = next((by_lower[n] for n in TEXT_NAMES if n in by_lower), None)
    if text and answer:  # sentence + label: the label answers the text (as text alone, it would be dropped)
        return f"{text}=prompt,{answer}=completion"
    if text:
        return f"{text}=text"
    names = list(by_lower.values())  # in the data's column order: the question usually comes first
    if len(names) >= 2:
        return f"{names[0]}=prompt,{names[1]}=completion"
    if len(names) == 1:
        return f"{names[0]}=text"
    return None


# Column pairs whose meaning is unambiguous: read as prompt + completion without a --map.
PROMPT_COMPLETION_PAIRS = (
    ("question", "answer"), ("question", "response"), ("query", "response"), ("query", "answer"),
    ("prompt", "response"), ("prompt", "answer"), ("prompt", "output"), ("input", "output"), ("input", "target"),
    ("instruction", "response"), ("source", "target"), ("human", "assistant"), ("user", "assistant"),
    ("q", "a"),
)


def known_pair(keys: Iterable[str]) -> Optional[tuple[str, str]]:
    """The (prompt column, answer column) when exactly one well-known pair is present (any letter case)."""
    by_lower = {_plain(k): str(k) for k in keys}
    found = [(by_lower[p], by_lower[a]) for p, a in PROMPT_COMPLETION_PAIRS if p in by_lower and a in by_lower]
    return found[0] if len(found) == 1 else None


def _preference_error(keys: list, where: str, sample: Optional[dict]) -> Optional[FtUsageError]:
    """Rows of preference pairs (prompt / chosen / rejected, as DPO trainers take them): what they are, and
    the --map that fine-tunes on the preferred answers instead of guessing at the columns."""
    by_lower = {_plain(k): str(k) for k in keys}
    if not {"chosen", "rejected"} <= set(by_lower):
        return None
    chosen = by_lower["chosen"]
    prompt = next((by_lower[n] for n in PROMPT_NAMES if n in by_lower), None)
    if prompt is not None:  # (a conversational prompt and answer too: the prompt's turns stay the context)
        fix = f"{prompt}=prompt,{chosen}=completion"
    elif sample is not None and _is_conversation(conversation_cell(sample.get(chosen))):  # whole conversations: the implicit prompt
        fix = f"{chosen}=messages"
    else:
        fix = None
    how = (f' To fine-tune on the preferred answers alone: --map "{fix}".' if fix
           else f" To fine-tune on the preferred answers alone, give each row a prompt and map {chosen!r} to completion.")
    return FtUsageError(
        f"{where}: these rows are preference pairs ({', '.join(sorted(map(str, keys)))}). To train on the pairs, "
        f"set objective: dpo (or orpo, ipo, simpo) in the cell body; objective: sft, the default, learns one answer per "
        f"example and would not use {by_lower['rejected']!r}.{how}"
    )


def _missing_fields_error(keys: list, where: str, renamed: Optional[dict] = None,
                          sample: Optional[dict] = None) -> FtUsageError:
    """``renamed``: the user's --map (source -> field), already applied to ``keys``; the suggested --map is
    then written in the data's own column names, the user's entries included. ``sample``: the first row."""
    preference = _preference_error(keys, where, sample) if not renamed else None
    if preference is not None:
        return preference
    shown = ", ".join(sorted(map(str, keys))) or "(none)"
    by_lower = {_plain(k): str(k) for k in keys}
    prompt = next((by_lower[n] for n in PROMPT_NAMES if n in by_lower), None)
    if prompt is not None and not renamed and not any(n in by_lower for n in ANSWER_NAMES + TEXT_NAMES):
        return FtUsageError(  # a prompt column and nothing to answer it: the answers are what is missing
            f"{where}: the rows have a prompt column ({prompt!r}) but no answer column (fields: {shown}). "
            f"Add the answers as 'completion' (or response, answer, output; another name: --map "
            f"\"{prompt}=prompt,COLUMN=completion\"). To train on the prompts as plain text instead: "
            f"--map \"{prompt}=text\".")
    formats = "; ".join(f"{fmt}: {' + '.join(need)}" for fmt, need in FORMAT_KEYS.items())
    fix = suggest_map(keys, sample)
    if fix and renamed:
        back = {field: source for source, field in renamed.items()}
        pairs = [p.split("=", 1) for p in fix.split(",")]
        fix = ",".join(f"{back.get(col, col)}={field}" for col, field in pairs)
    suggestion = f' For these columns: --map "{fix}".' if fix else ""
    if any(_mapless(k) for k in keys):  # a CSV without its header line: its first row was read as the names
        suggestion = (" The column names read like a first row of data, not names: a table's first line names its "
                      "columns, so add one (e.g. prompt,completion) at the top of the file"
                      + (" (no --map can name a column holding ',' or '=')." if any(_mapless(k, strict=True)
                                                                                    for k in keys) else "."))
    return FtUsageError(
        f"{where}: cannot tell the dataset format from the fields found ({shown}). "
        f"Known formats and the fields they need: {formats}. "
        f"Rename columns with --map source=field (or the YAML key map:).{suggestion}"
    )


def _content_text(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # parts: [{"type": "text", "text": ...}, ...]
        out = []
        for part in content:
            if isinstance(part, str):
                out.append(part)
            elif isinstance(part, dict):
                kind = part.get("type", "text")
                if kind != "text":
                    raise FtUsageError(f"{where}: content part of type {kind!r}; only text parts are supported.")
                val = part.get("text", part.get("value"))
                if not isinstance(val, str):
                    raise FtUsageError(f"{where}: a text part needs a string 'text' or 'value'.")
                out.append(val)
            else:
                raise FtUsageError(f"{where}: content parts must be dicts or strings, got {type(part).__name__}.")
        return "".join(out)
    if isinstance(content, (int, float)) and not isinstance(content, bool):
        return str(content)
    raise FtUsageError(f"{where}: content must be a string or a list of text parts, got {type(content).__name__}.")


def _string_field(row: dict, key: str, where: str, required: bool = True) -> str:
    val = row.get(key)
    if isinstance(val, float) and math.isnan(val):  # pandas' empty cell: as a CSV file's empty cell reads, ""
        return ""
    if val is None:
        if required:
            err = FtUsageError(f"{where}: field {key!r} is missing or null. Fill it, or drop such rows (for a "
                               f"DataFrame: df.dropna(subset=[{key!r}])).")
            err.field = key  # (normalise names the user's own column where it was renamed)
            raise err
        return ""
    if isinstance(val, (int, float)) and not isinstance(val, bool):
        return str(val)
    if isinstance(val, bool):  # true/false or True/False: which spelling the model should learn is the user's call
        what = ("the answer as the text the model should produce" if key in ("completion", "chosen", "rejected", "output")
                else "it as the text the model should read")
        raise FtUsageError(f"{where}: field {key!r} is a boolean ({json.dumps(val)}), not text. Write {what}, e.g. "
                           f"\"{'yes' if val else 'no'}\" or \"{json.dumps(val)}\".")
    if not isinstance(val, str):
        raise FtUsageError(f"{where}: field {key!r} must be a string, got {type(val).__name__}.")
    return val


def _messages(seq: Any, where: str, role_key="role", content_key="content") -> list:
    if hasattr(seq, "tolist") and not isinstance(seq, (str, bytes)):  # numpy arrays from parquet/pandas
        seq = seq.tolist()
    if isinstance(seq, str) and seq.lstrip().startswith("["):  # a list written as JSON text (a CSV column)
        seq = _json_text(seq, f"{where}: the messages are text that starts like a JSON list but is not valid JSON",
                         ". Fix the JSON, or store the data as JSON lines (.jsonl), where a list of messages needs no "
                         "quoting.")
    if seq is None or (isinstance(seq, float) and math.isnan(seq)):
        raise FtUsageError(f"{where}: the messages are missing (an empty or null cell). Fill it, or drop such rows.")
    if not isinstance(seq, (list, tuple)):
        raise FtUsageError(f"{where}: expected a list of messages, got {type(seq).__name__}.")
    if not seq:
        raise FtUsageError(f"{where}: the list of messages is empty.")
    seq = _spelled_turns(seq, where)
    out = []
    for j, m in enumerate(seq):
        if not isinstance(m, dict):
            raise FtUsageError(f"{where}, message {j}: expected an object with {role_key!r} and {content_key!r}.")
        if role_key not in m and content_key not in m:  # 'From'/'Value', 'Role'/'Content': as the list's own key
            m = {(k.lower() if isinstance(k, str) and k.lower() not in m else k): v for k, v in m.items()}
        raw_role = m.get(role_key)
        if raw_role is None:  # the other convention: ShareGPT's from/value, or role/content in conversations
            other = next(((r, c) for r, c in (("role", "content"), ("from", "value")) if r != role_key and r in m), None)
            if other is not None:
                raw_role, content_key = m.get(other[0]), other[1]
        if raw_role is None:
            raise FtUsageError(
                f"{where}, message {j}: no role (fields: {', '.join(sorted(map(str, m))) or 'none'}). Each message "
                "needs 'role' and 'content' (or ShareGPT's 'from' and 'value').")
        role = ROLE_ALIASES.get(_plain(raw_role))
        if role is None:
            raise FtUsageError(
                f"{where}, message {j}: unknown role {raw_role!r}{did_you_mean(str(raw_role), ROLE_ALIASES)}. "
                f"Roles: {', '.join(sorted(ROLE_ALIASES))}."
            )
        if content_key in m:
            content = m[content_key]
        elif "content" in m or "value" in m:
            content = m.get("content", m.get("value"))
        elif role == "assistant" and (m.get("tool_calls") is not None or m.get("function_call") is not None):
            content = None  # OpenAI's fine-tuning format writes a call without a content field
        else:
            raise FtUsageError(
                f"{where}, message {j}: no {content_key!r} field (fields: {', '.join(sorted(map(str, m)))})."
            )
        function_call = _plain(raw_role) == "function_call"  # ShareGPT's call turn (its value: the call)
        if function_call and isinstance(content, dict):  # the call written as an object rather than as JSON text
            content = json.dumps(content, ensure_ascii=False)
        msg = {"role": role, "content": _content_text(content, f"{where}, message {j}")}
        if role == "assistant" and m.get("weight") is not None:  # OpenAI's fine-tuning format: 0 = no loss
            msg["weight"] = _turn_weight(m["weight"], f"{where}, message {j}")
        for extra in ("tool_calls", "name", "tool_call_id"):  # function calling: the template writes them
            if m.get(extra) is not None:
                msg[extra] = m[extra]
        if function_call and "tool_calls" not in msg:  # ShareGPT's call: JSON text
            call = _call_of_text(msg["content"])
            if call is not None:
                msg.update(content="", tool_calls=[{"type": "function", "function": call}], call_text=msg["content"])
            else:  # not {"name": ..., "arguments": ...}: it trains as the text written, which the report counts
                msg["call_unread"] = True
        call = m.get("function_call")  # OpenAI's older single call: the same as one tool call
        if role == "assistant" and isinstance(call, dict) and "tool_calls" not in msg:
            msg["tool_calls"] = [{"type": "function", "function": call}]
        elif role == "assistant" and call is not None and "tool_calls" not in msg:
            raise FtUsageError(f"{where}, message {j}: function_call must be an object with 'name' and 'arguments' "
                               f"(got {type(call).__name__}).")
        out.append(msg)
    return out


def _call_of_text(text: str) -> Optional[dict]:
    """A ShareGPT ``function_call`` turn's value (LLaMA-Factory, Glaive: ``{"name": ..., "arguments": ...}`` as
    JSON text) as a tool call's function, or None where it is not one."""
    try:
        call = json.loads(text)
    except (TypeError, ValueError):
        return None
    if not (isinstance(call, dict) and isinstance(call.get("name"), str)):
        return None
    return {"name": call["name"], "arguments": call.get("arguments", {})}


def _turn_weight(value: Any, where: str) -> int:
    """An assistant message's ``weight`` (OpenAI's chat fine-tuning format): 1 trains on the turn, 0 keeps it as
    context only. Anything else is refused: the loss is not scaled per turn, so 0.5 has no meaning here."""
    if hasattr(value, "item"):  # numpy scalars from parquet/pandas
        value = value.item()
    text = str(value).strip().lower()
    if text in ("0", "0.0", "false"):
        return 0
    if text in ("1", "1.0", "true"):
        return 1
    raise FtUsageError(f"{where}: weight {value!r} is not 0 or 1. An assistant message's weight says whether it is "
                       "trained on (1, the default) or kept as context only (0), as in OpenAI's fine-tuning format; "
                       "set it to 0 or 1, or drop it.")


def _json_text(text: str, problem: str, fix: str) -> Any:
    """``text`` parsed as JSON (a list held as text: a CSV column, a parquet string column); invalid JSON is
    refused as ``problem (what is wrong, where)`` followed by ``fix``."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise FtUsageError(f"{problem} ({_json_problem(exc)} at character {exc.pos}){fix}") from None


def _tools(row: dict, where: str) -> Optional[list]:
    """The row's ``tools`` (function schemas the chat template writes into the prompt): a list, or a JSON list
    written as text (a CSV column, a string column of a parquet file). Text that is not one is refused: dropped,
    the tool calls would train without the schemas the model sees at inference."""
    tools = row.get("tools")
    if hasattr(tools, "tolist") and not isinstance(tools, (str, bytes)):  # numpy arrays from parquet/pandas
        tools = tools.tolist()
    if isinstance(tools, str):
        if not tools.strip():
            return None
        tools = _json_text(tools, f"{where}: 'tools' is text but not valid JSON",
                           "; give a JSON list of function schemas, or drop the column.")
        if not isinstance(tools, list):
            raise FtUsageError(f"{where}: 'tools' holds JSON {type(tools).__name__}, not a list of function schemas.")
    return tools if isinstance(tools, list) else None


def _tool_call_names(messages: list) -> list:
    names = []
    for m in messages:
        for call in m.get("tool_calls") or []:
            fn = call.get("function", call) if isinstance(call, dict) else None
            if isinstance(fn, dict) and fn.get("name"):
                names.append(str(fn["name"]))
    return names


def _with_nested(rows, paths: list) -> "Rows":
    """The rows with a column for each dotted path (``data.q``: the field ``q`` of the object in ``data``)."""
    def get(row, path):
        value = row
        for part in path.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        return value

    return _remade(rows, lambda r: {**r, **{p: get(r, p) for p in paths}})


_KIND_NAMES = {"str": "text", "int": "numbers", "float": "numbers", "bool": "true/false", "list": "lists",
               "NoneType": "null", "dict": "objects"}


def _check_nested_path(rows, path: str, where: str) -> None:
    """Refuse a dotted --map path (``data.x``) that no row has, naming what there is where it stops."""
    parts = path.split(".")
    depth, fields, kinds = 0, set(), set()  # how far the path got, and the fields / kinds of value found there
    for row in rows:
        value = row
        for d, part in enumerate(parts):
            if isinstance(value, dict) and part in value:
                value = value[part]
                continue
            if d > depth:
                depth, fields, kinds = d, set(), set()
            if d == depth:
                fields |= set(map(str, value)) if isinstance(value, dict) else set()
                kinds.add(_KIND_NAMES.get(type(value).__name__, type(value).__name__))
            break
        else:
            return  # some row has it
    parent = ".".join(parts[:depth])
    if fields:
        options = [f"{parent}.{f}" for f in sorted(fields)]
        raise FtUsageError(f"{where}: --map names {path!r}, which does not exist{did_you_mean(path, options)}. "
                           f"The fields in {parent!r}: {', '.join(sorted(fields))}.")
    raise FtUsageError(f"{where}: --map names {path!r}, but {parent!r} holds {', '.join(sorted(kinds))}, not "
                       "objects with fields. Fields inside a column of objects are named with dots: column.field.")


def _renamed(rows, mapping: dict) -> "Rows":
    """The rows with columns renamed by ``mapping`` (source -> field), keeping where each row came from."""
    return _remade(rows, lambda r: {mapping.get(k, k): v for k, v in r.items()})


def _remade(rows, remake) -> "Rows":
    """``remake`` applied to every row, each keeping where it came from."""
    out = Rows([remake(r) for r in rows], getattr(rows, "locs", None))
    out.index_labels = getattr(rows, "index_labels", None)
    return out


def normalise(rows: list[dict], fmt: str = "auto", text_field: Optional[str] = None,
              column_map: Optional[str] = None, where: str = "data") -> tuple[list[Record], str]:
    """Validate every row and turn it into a :class:`Record`; return the records and the format used."""
    if not rows:
        raise FtUsageError(f"{where} has no rows: it holds no examples.")
    locate = rows.where if isinstance(rows, Rows) else (lambda i, default: f"{default}, row {i + 1}")
    mapping = parse_map(column_map)
    if text_field and mapping.get(text_field, "text") != "text":
        raise FtUsageError(f"text_field {text_field!r} trains that column as plain text, but --map maps it to "
                           f"{mapping[text_field]!r}: drop text_field (the format is then read from the mapped "
                           f"columns), or drop {text_field}={mapping[text_field]} from the map.")
    if text_field:
        mapping.setdefault(text_field, "text")
        if fmt == "auto":  # the column named is the text to train on, whatever else the rows hold (chat, pairs)
            fmt = "text"
    origin: dict = {}  # a field as read -> the user's column it came from (--map, Instruction, question/answer)
    if rows and any(not isinstance(k, str) for k in rows[0]):  # a DataFrame's 0, 1 columns: named as typed
        rows = _remade(rows, lambda r: {str(k): v for k, v in r.items()})
    if rows and any(k.startswith("\ufeff") for k in rows[0] if isinstance(k, str)):  # a byte-order mark read into
        rows = _remade(rows, lambda r: {(k.lstrip("\ufeff") if isinstance(k, str) else k): v  # the first column's
                                        for k, v in r.items()})  # name (pandas.read_csv without utf-8-sig)
    if mapping:
        keys0 = set().union(*(r.keys() for r in rows[:1000]))
        nested = [a for a in mapping if a not in keys0 and "." in a and a.split(".", 1)[0] in keys0]
        if nested:  # --map "data.q=prompt": a field inside a column of objects
            for path in nested:
                _check_nested_path(rows[:1000], path, where)
            rows = _with_nested(rows, nested)
            keys0 |= set(nested)
        mapping = _spaced_columns(mapping, keys0)
        missing = [a for a in mapping if a not in keys0]
        if missing:
            given = "text_field (--text-field)" if missing == [text_field] and text_field not in parse_map(column_map) else "--map"
            objects = sorted(k for k in keys0 if isinstance(rows[0].get(k), dict))
            inside = (f" Fields inside a column of objects are named with dots, e.g. --map "
                      f"\"{objects[0]}.{next(iter(rows[0][objects[0]]), 'field')}=prompt\"." if objects else "")
            err = FtUsageError(
                f"{where}: {given} names column(s) {', '.join(map(repr, missing))} that do not exist"
                f"{did_you_mean(missing[0], keys0)}. Columns: {', '.join(sorted(map(str, keys0)))}.{inside}"
            )
            err.missing_columns = missing if given == "--map" else None  # (split_records names eval_map)
            raise err
        rows = _renamed(rows, mapping)
        origin.update({b: a for a, b in mapping.items()})
    keys = list(dict.fromkeys(k for r in rows[:1000] for k in r))  # the columns, in the data's order
    shown_fmt = None
    found_auto = fmt == "auto"
    if fmt == "auto":
        found = detect_format(keys)
        cased = _field_case(keys) if found is None else {}
        if cased and detect_format(cased.get(k, k) for k in keys):  # Instruction / Input / Output: alpaca
            rows = _renamed(rows, cased)
            origin.update({b: a for a, b in cased.items()})
            keys = [cased.get(k, k) for k in keys]
            found = detect_format(keys)
            shown_fmt = f"{found} (columns {', '.join(f'{a} -> {b}' for a, b in cased.items())})"
        pair = known_pair(keys) if found is None else None
        if pair is not None:  # e.g. question/answer: no --map needed, and the report says how it was read
            rows = _renamed(rows, {pair[0]: "prompt", pair[1]: "completion"})
            origin.update({"prompt": pair[0], "completion": pair[1]})
            found, shown_fmt = "prompt-completion", f"prompt-completion (columns {pair[0]} -> prompt, {pair[1]} -> completion)"
        if found is None:
            raise _missing_fields_error(keys, where, mapping, rows[0] if isinstance(rows[0], dict) else None)
        fmt = found
    elif fmt not in FORMAT_KEYS:
        raise FtUsageError(f"unknown format {fmt!r}{did_you_mean(fmt, FORMAT_KEYS)}; use auto or one of {', '.join(FORMAT_KEYS)}.")
    records = []
    detected = None  # where a row of the detected format is, for a row in another one
    if found_auto:
        need = FORMAT_KEYS[fmt]
        first = next((i for i, r in enumerate(rows[:1000]) if isinstance(r, dict) and all(k in r for k in need)), 0)
        detected = locate(first, where)
    for i, r in enumerate(rows):
        loc = locate(i, where)
        try:
            rec = _normalise_row(r, fmt, loc, detected, source=where)
        except FtUsageError as exc:
            field = getattr(exc, "field", None)
            if field in origin:  # say the column as the user has it ('Answer'), not as it was read ('completion')
                raise FtUsageError(str(exc).replace(repr(field), repr(origin[field]))) from None
            raise
        rec.where = loc
        records.append(rec)
    return records, shown_fmt or fmt


def _normalise_row(row: dict, fmt: str, where: str, detected: Optional[str] = None, source: str = "") -> Record:
    """``detected``: ``fmt`` was read from the first rows' columns, not set by the user; where a row of it is.
    ``source``: the data as the user named it (a folder's path, for a pattern that reads part of it)."""
    if not isinstance(row, dict):
        raise FtUsageError(f"{where}: expected an object, got {type(row).__name__}.")
    need = FORMAT_KEYS[fmt]
    absent = [k for k in need if k not in row]
    if absent:
        other = detect_format(row)
        if other is None and known_pair(row) is not None:
            other = "prompt-completion"
        if other is not None and other != fmt and detected:  # e.g. a folder of files in two formats
            fix = (f"this row is in the {other} format, while {detected} is {fmt}: the rows of one dataset share "
                   "one format; convert or rename the odd rows' columns, or train on the two parts separately")
            here, there = where.split(", ")[0], detected.split(", ")[0]
            if here != there and data_suffix(Path(here)) != data_suffix(Path(there)):  # a stray file in a folder
                folder = source if source and os.path.isdir(os.path.expanduser(source)) else "FOLDER"
                kind = data_suffix(Path(there))
                fix += (f" (if {here} is no part of the data, move it out of the folder, or read the folder's {kind} "
                        f"files alone: --data '{os.path.join(folder, '*' + kind)}')")
        elif other is not None and other != fmt:  # e.g. format: chat copied from elsewhere, on prompt/completion rows
            fix = f"this row is in the {other} format: drop the format setting (auto detects it) or use format: {other}"
        elif detected:  # the dataset's other rows have the field: this row lacks it (a --map would remap them all)
            fix = (f"the dataset's other rows have {' and '.join(map(repr, absent))}: add {'it' if len(absent) == 1 else 'them'}"
                   " to this row, or remove the row")
        else:
            guess = suggest_map(row, row)
            fix = "Fix the row or use --map" + (f' (e.g. --map "{guess}")' if guess else "")
        raise FtUsageError(
            f"{where}: the {fmt} format needs field(s) {', '.join(map(repr, absent))}; "
            f"this row has {', '.join(sorted(map(str, row))) or 'no fields'}. {fix[0].upper() + fix[1:]}."
        )
    if fmt == "text":
        return Record(text=_string_field(row, "text", where))
    if fmt in ("chat", "sharegpt"):
        msgs = (_messages(row["messages"], where) if fmt == "chat"
                else _messages(row["conversations"], where, role_key="from", content_key="value"))
        system = row.get("system")  # a system prompt in a field of its own, beside the conversation
        if isinstance(system, str) and system.strip() and msgs[0]["role"] != "system":
            msgs.insert(0, {"role": "system", "content": system})
        return Record(messages=msgs, tools=_tools(row, where))
    if fmt == "prompt-completion":
        p, c = conversation_cell(row["prompt"]), conversation_cell(row["completion"])
        if isinstance(p, list) or isinstance(c, list):
            pm = _messages(p, f"{where}, prompt") if isinstance(p, list) else [
                {"role": "user", "content": _string_field(row, "prompt", where)}]
            for m in pm:  # an earlier answer inside the prompt is context (TRL's conversational prompt/completion)
                if m["role"] == "assistant":
                    m["weight"] = 0
            cm = _messages(c, f"{where}, completion") if isinstance(c, list) else [
                {"role": "assistant", "content": _string_field(row, "completion", where)}]
            msgs = pm + cm
        else:
            msgs = [
                {"role": "user", "content": _string_field(row, "prompt", where)},
                {"role": "assistant", "content": _string_field(row, "completion", where)},
            ]
        if isinstance(row.get("system"), str) and row["system"]:
            msgs.insert(0, {"role": "system", "content": row["system"]})
        return Record(messages=msgs)
    if fmt == "alpaca":
        instruction = _string_field(row, "instruction", where)
        extra = _string_field(row, "input", where, required=False)
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        msgs = []
        if isinstance(row.get("system"), str) and row["system"]:
            msgs.append({"role": "system", "content": row["system"]})
        history = row.get("history") or []
        if not isinstance(history, list):
            raise FtUsageError(f"{where}: 'history' must be a list of [instruction, answer] pairs.")
        for h in history:
            if not (isinstance(h, (list, tuple)) and len(h) == 2 and all(isinstance(x, str) for x in h)):
                raise FtUsageError(f"{where}: each 'history' entry must be a pair [instruction, answer] of strings.")
            msgs += [{"role": "user", "content": h[0]}, {"role": "assistant", "content": h[1]}]
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": _string_field(row, "output", where)}]
        return Record(messages=msgs)
    raise AssertionError(fmt)


def fingerprint(records: list[Record]) -> str:
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps(r.to_json(), sort_keys=True, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


def split(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Reproducible train/eval split (same seed, same split)."""
    if fraction <= 0:
        return records, []
    idx = list(range(len(records)))
    random.Random(seed).shuffle(idx)
    n_eval = max(1, int(round(len(records) * fraction)))
    if n_eval >= len(records):
        raise FtUsageError(
            f"eval_fraction {fraction:g} leaves no training rows out of {len(records)}: give more rows, set "
            "eval_fraction: 0 (no held-out evaluation), or give held-out data with --eval.")
    eval_idx = set(idx[:n_eval])
    return [r for i, r in enumerate(records) if i not in eval_idx], [records[i] for i in sorted(eval_idx)]


# ----------------------------------------------------------------------------- tokenisation
@dataclass
class TokenizedExample:
    input_ids: list
    labels: list  # -100 where no loss
    position_ids: Optional[list] = None  # only for packed rows: positions restart at 0 for each example

    @property
    def n_loss_tokens(self) -> int:
        """The tokens the loss predicts: the first of a row has no token before it to be predicted from."""
        return sum(1 for x in self.labels[1:] if x != -100)

    def features(self) -> dict:
        out = {"input_ids": self.input_ids, "labels": self.labels}
        if self.position_ids is not None:
            out["position_ids"] = self.position_ids
        return out


@dataclass
class DataReport:
    source: str
    format: str
    rows: int
    train_rows: int
    eval_rows: int
    lengths: list = field(default_factory=list)
    truncated: int = 0
    dropped_overlong: int = 0
    split_rows: int = 0  # overlong: split - the rows the overlong examples became
    prompt_cut: int = 0  # overlong: truncate_prompt - examples kept whole but for the middle of their prompt
    dropped_no_answer: int = 0  # the answer was cut away entirely by truncation
    answer_starts: list = field(default_factory=list)  # where those answers began (token index)
    dropped_empty: int = 0  # nothing carried loss even before truncation
    dropped_unweighted: int = 0  # every answer had weight 0 (context only)
    dropped_at: dict = field(default_factory=dict)  # each dropped_* counter's rows ("d.jsonl, line 7", "index 3")
    eval_dropped: int = 0
    eval_dropped_why: str = ""  # e.g. "1 with an empty answer, 2 too long"
    warnings: list = field(default_factory=list)
    example: str = ""
    rendering: str = ""
    fingerprint: str = ""
    loss_tokens: int = 0
    split: str = ""
    max_seq_len: int = 0
    overlong: str = "truncate"
    train_on: str = "answers"
    packing: str = ""  # how examples were packed, and what keeps them apart; empty: no packing
    packed_examples: int = 0  # with packing: the training examples (after drops) behind the packed rows
    objective: str = "sft"  # dpo / orpo: the rows are preference pairs
    attention: str = ""  # the attention implementation packing relies on
    context: int = 0  # the model's context window (max_position_embeddings) where known: no advice goes past it
    spec: Optional[dict] = None  # {"data": ..., "eval": ...} as data_spec gives them, where both survive a restart

    def count(self, outcome: str, ex: "TokenizedExample", where: str = "") -> None:
        """Count what :func:`fit_length` did to ``ex`` (as tokenised, before any cut); ``where``: its row."""
        if outcome == "kept":
            return
        setattr(self, outcome, getattr(self, outcome) + 1)
        if where and outcome.startswith("dropped"):
            self.dropped_at.setdefault(outcome, []).append(where)
        if outcome == "dropped_no_answer":  # cut, and nothing left to learn: truncated too
            self.truncated += 1
            self.answer_starts.append(next(i for i, lab in enumerate(ex.labels) if lab != -100))

    def stats(self) -> dict:
        if not self.lengths:
            return {}
        s = sorted(self.lengths)
        pick = lambda q: s[min(len(s) - 1, int(math.ceil(q * len(s))) - 1)] if q > 0 else s[0]  # noqa: E731
        return {"min": s[0], "median": pick(0.5), "p95": pick(0.95), "max": s[-1]}

    def keep_whole(self, longest: int, unit: str = "example") -> str:
        """The advice for examples cut by max_seq_len: the --max-seq-len that keeps them whole, or, where they are
        longer than the model's context window, that none does (past it the model never learned positions)."""
        if self.context and longest > self.context:
            return (f"the longest ({longest:,} tokens) is beyond the model's context window ({self.context:,}), so no "
                    f"max_seq_len keeps it whole: {self.context} is the most the model reads")
        want = _round_up(longest)
        return f"--max-seq-len {min(want, self.context) if self.context else want} keeps every {unit} whole"

    @property
    def over_max(self) -> int:
        return sum(1 for n in self.lengths if n > self.max_seq_len) if self.max_seq_len else 0

    def _at(self, outcome: str) -> str:
        """`` (d.jsonl, lines 7, 9)``: where the rows dropped as ``outcome`` are, where the reader knew."""
        where = places(self.dropped_at.get(outcome) or [])
        return f" ({where})" if where else ""

    def text(self) -> str:
        from ..config import objective_name

        st = self.stats()
        lines = [
            f"Data       {self.source}: {self.format} format, {counted(self.rows, 'row')} "
            f"-> {self.train_rows:,} train / {self.eval_rows:,} eval{' (' + self.split + ')' if self.split else ''}",
            f"Rendering  {self.rendering}; loss on "
            f"{'every token' if self.train_on == 'all' or self.format == 'text' else 'the answers only'}"
            + (f"; {objective_name(self.objective)} compares each pair's chosen and rejected answer"
               if self.objective != "sft" else ""),
        ]
        if st:
            lines.append(
                f"Tokens     min {st['min']} / median {st['median']} / p95 {st['p95']} / max {st['max']} per example; "
                f"{self.loss_tokens:,} loss-bearing tokens in training"
            )
        unit = "example" if self.objective == "sft" else "pair"
        if self.max_seq_len:
            line = (f"Length     {self.over_max:,} of {len(self.lengths):,} {unit}s exceed "
                    f"max_seq_len={self.max_seq_len}")
            if self.over_max and self.overlong == "split":
                line += f": split into {counted(self.split_rows, 'row')} of at most {self.max_seq_len} tokens (overlong: split)"
            elif self.over_max:
                cut = (f" ({self.dropped_no_answer:,} of them cut before their answer: dropped, below)"
                       if self.dropped_no_answer else "")  # ("0 dropped" read as if none were, above "Dropped 1,032")
                middle = (f"{self.prompt_cut:,} kept with the middle of their prompt cut, "
                          if self.overlong == "truncate_prompt" else "")
                line += (f": {middle}{self.truncated:,} truncated{cut}, {self.dropped_overlong:,} dropped whole (overlong: "
                         f"{self.overlong}); "
                         + self.keep_whole(st['max'], unit)
                         + ("; overlong: split trains on all of it" if self.format == "text" else ""))
            lines.append(line)
        if self.dropped_no_answer:
            at_context = bool(self.context) and self.max_seq_len >= self.context
            lines.append(
                f"Dropped    {counted(self.dropped_no_answer, unit)}{self._at('dropped_no_answer')} whose answer was "
                "cut away entirely by truncation (no loss-bearing token left); " + (
                    f"their prompts alone fill the {self.context:,} tokens the model reads: shorten those prompts to "
                    "keep them" if at_context else "raise max_seq_len to keep them")
                + ("" if self.overlong == "truncate_prompt" or self.train_on == "all" else
                   ", or set overlong: truncate_prompt to keep their answers and cut the middle of their prompts")
            )
        empty = f"{counted(self.dropped_empty, unit)}{self._at('dropped_empty')}"
        if self.dropped_empty and self.format == "text":
            lines.append(f"Dropped    {empty} with no text to learn from (empty or blank)")
        elif self.dropped_empty:
            lines.append(f"Dropped    {empty} with no answer to learn from (empty or "
                         "blank: it would teach the model to end its turn at once"
                         + ("; or no assistant turn at all)" if unit == "example" else ")"))
        if self.dropped_unweighted:
            lines.append(f"Dropped    {counted(self.dropped_unweighted, 'example')}{self._at('dropped_unweighted')} "
                         "whose every answer has weight 0 (context only: nothing to learn from)")
        if self.eval_dropped:
            lines.append(f"Dropped    {counted(self.eval_dropped, 'eval example')} "
                         f"({self.eval_dropped_why or 'too long, or no answer token left'})")
        if self.packing:
            lines.append(f"Packing    {self.packing}")
        for w in self.warnings:
            lines.append(f"Warning    {w}")
        if self.example:
            lines.append("Example    (text between ⟦ and ⟧ carries loss)")
            lines += ["  " + line for line in self.example.splitlines()]
        return "\n".join(lines)


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def plain_turn(m: dict) -> str:
    """A message as plain text, with the line break(s) after it: how a tokenizer without a chat template sees a
    conversation, in training (:func:`_render_plain`) and in the prompts it is asked (``inference.build_prompt``)."""
    return m["content"] + ("\n\n" if m["role"] in ("assistant", "system") else "\n")


def _render_plain(messages: list) -> tuple[str, list]:
    """Plain prompt+answer text for tokenizers without a chat template; spans of answer text."""
    text, spans = "", []
    for m in messages:
        if m["role"] == "assistant":
            spans.append((len(text), len(text) + len(m["content"])))
        text += plain_turn(m)
    return text.rstrip("\n"), spans


_TEMPLATE_WRITES: dict = {}  # (chat template, "calls" | "tools") -> whether the template writes them


def template_writes(tokenizer, what: str) -> bool:
    """Whether the tokenizer's chat template writes an assistant turn's tool calls (``what="calls"``) or the tools'
    schemas (``"tools"``) into the text: probed once per template with a made-up function's name. A template that
    raises on them (some refuse tools) writes nothing."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return False
    key = (str(template), what)
    if key not in _TEMPLATE_WRITES:
        name = "ft_magics_probe_function"
        user = {"role": "user", "content": "hi"}
        try:
            if what == "calls":
                text = tokenizer.apply_chat_template([user, {"role": "assistant", "content": "", "tool_calls": [
                    {"type": "function", "function": {"name": name, "arguments": {}}}]}], tokenize=False)
            else:
                text = tokenizer.apply_chat_template([user], tools=[{"type": "function", "function": {
                    "name": name, "description": "a probe", "parameters": {"type": "object", "properties": {}}}}],
                    tokenize=False)
        except Exception:  # noqa: BLE001 - a template's own refusal (raise_exception) or a jinja error: it does not
            text = ""
        _TEMPLATE_WRITES[key] = name in str(text)
    return _TEMPLATE_WRITES[key]


def _calls_for(tokenizer, messages: list) -> list:
    """``messages`` with ShareGPT's function_call turns (their JSON text kept as ``call_text``) as the template can
    write them: tool calls where it writes calls, else the JSON text as the answer, as it was written."""
    if not any("call_text" in m or "call_unread" in m for m in messages):
        return messages
    as_calls = has_chat_template(tokenizer) and template_writes(tokenizer, "calls")
    out = []
    for m in messages:
        if "call_unread" in m:
            m = {k: v for k, v in m.items() if k != "call_unread"}
        if "call_text" in m:
            kept = {k: v for k, v in m.items() if k != "call_text" and (as_calls or k != "tool_calls")}
            m = kept if as_calls else {**kept, "content": m["call_text"]}
        out.append(m)
    return out


def _render_chat(tokenizer, messages: list, tools=None) -> tuple[str, list]:
    """Render with the chat template and find the character spans of every assistant turn.

    An assistant turn's span runs from the end of the prompt the template renders before it (with the
    generation prompt) to the end of the conversation rendered up to and including it, so the turn's
    closing tokens (e.g. ``<|im_end|>``) carry loss: the model learns to stop."""
    kw = {"tokenize": False}
    if tools:
        kw["tools"] = tools
    full = tokenizer.apply_chat_template(messages, **kw)
    spans = []
    stable = True
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        upto = full if k == len(messages) - 1 else tokenizer.apply_chat_template(messages[: k + 1], **kw)
        if k:
            prefix = tokenizer.apply_chat_template(messages[:k], add_generation_prompt=True, **kw)
        else:  # the conversation opens with an answer: its header (and any default system turn) is prompt
            at = upto.rfind(m["content"]) if m["content"] else -1
            prefix = upto[:at] if at > 0 else ""
        if not (full.startswith(upto) and upto.startswith(prefix)):
            stable = False
            break
        spans.append((len(prefix), len(upto)))
    if not stable:  # templates that rewrite earlier turns (e.g. drop old reasoning): the last answer only
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prefix = tokenizer.apply_chat_template(messages[:last], add_generation_prompt=True, **kw)
        spans = [(len(prefix), len(full))] if full.startswith(prefix) else [(0, len(full))]
    return full, spans


def _trained_spans(spans: list, record: Record) -> list:
    """The answer spans that carry loss: the last ``answer_turns`` of them, less those of weight 0. ``spans`` has
    one span per assistant turn, or the last turn's only (a template that rewrites earlier turns)."""
    weights = record.weights or [1] * len(spans)
    marked = list(zip(spans, weights[-len(spans):] if spans else []))
    marked = marked[-record.answer_turns:] if record.answer_turns else marked
    return [span for span, w in marked if w]


def render(tokenizer, record: Record) -> tuple[str, list, bool]:
    """(text, answer spans, add special tokens?) for one record."""
    if record.text is not None:
        return record.text, [(0, len(record.text))], True
    messages = _calls_for(tokenizer, record.messages)
    if has_chat_template(tokenizer):
        text, spans = _render_chat(tokenizer, messages, record.tools)
        shown = spans[-record.answer_turns:] if record.answer_turns else spans
        answers = "".join(text[a:b] for a, b in shown)  # not the tool list a template may print up front
        missing = [n for n in _tool_call_names(messages) if n not in answers]
        if missing:  # the template dropped the calls: the turn would teach an empty answer
            raise FtUsageError(
                f"{record.where or 'an example'}: an assistant turn calls {missing[0]!r} (tool_calls), but this "
                "model's chat template does not write tool calls, so the turn would train as an empty answer. "
                "Load a model whose chat template supports tools, or write the call into the message content."
            )
        return text, _trained_spans(spans, record), False
    text, spans = _render_plain(messages)
    return text, _trained_spans(spans, record), True


def _example(tokenizer, text: str, spans: list, special: bool, ids: list, offsets: list,
             train_on: str) -> TokenizedExample:
    """Token ids and offsets of a rendered text -> the example, with labels on the answer spans."""
    ids, offsets = list(ids), [tuple(o) for o in offsets]
    eos = tokenizer.eos_token_id
    if special and eos is not None:
        ended = False
        if not ids or ids[-1] != eos:
            ids.append(eos)  # so the model learns to stop
            offsets.append((len(text), len(text) + 1))
            ended = True
        elif offsets[-1] == (0, 0):  # the tokenizer's post-processor added it (add_eos_token): it carried no
            offsets[-1] = (len(text), len(text) + 1)  # loss, and the model never learned to stop
            ended = True
        if ended:
            spans = [(s, e + 1 if e == len(text) else e) for s, e in spans]
    if train_on == "all":
        return TokenizedExample(input_ids=ids, labels=list(ids))
    # a token carries loss when its characters overlap an answer span; special tokens a post-processor
    # adds (BOS) have the empty offset (0, 0) and never do
    if len(spans) == 1:
        (ss, se), = spans
        labels = [t if s < se and e > ss and e > s else -100 for t, (s, e) in zip(ids, offsets)]
    else:
        labels = [t if e > s and any(s < se and e > ss for ss, se in spans) else -100
                  for t, (s, e) in zip(ids, offsets)]
    return TokenizedExample(input_ids=ids, labels=labels)


def tokenize_record(tokenizer, record: Record, train_on: str = "answers") -> TokenizedExample:
    text, spans, special = render(tokenizer, record)
    enc = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
    return _example(tokenizer, text, spans, special, enc["input_ids"], enc["offset_mapping"], train_on)


def _render_checked(tokenizer, rec: Record) -> tuple[str, list, bool]:
    try:
        return render(tokenizer, rec)
    except FtUsageError:
        raise
    except Exception as exc:  # noqa: BLE001 - jinja TemplateError from the model's own chat template
        roles = ", ".join(m["role"] for m in rec.messages or [])
        raise FtUsageError(
            f"{rec.where or 'an example'}: the model's chat template refused this conversation "
            f"(roles: {roles or 'none'}): {type(exc).__name__}: {exc}. Many templates need user and "
            "assistant turns to alternate and know no 'tool' role; fix the row or load another model."
        ) from None


ENCODE_BATCH = 1024  # texts per call of the tokenizer: its Rust side encodes a batch on every core
TOKENIZED_CACHE_ENTRIES = 4  # the last tokenised record lists kept (a train and an eval set; two sides each for pairs)
_TOKENIZED: dict = {}


def _tokenizer_key(tokenizer) -> tuple:
    template = getattr(tokenizer, "chat_template", None)
    return (id(tokenizer), getattr(tokenizer, "name_or_path", ""), len(tokenizer), tokenizer.eos_token_id,
            hashlib.sha256(json.dumps(template, sort_keys=True, default=str).encode()).hexdigest())


# where tokenising reports its progress: (what it is doing, records done, records in all); see data_progress
_PROGRESS: contextvars.ContextVar = contextvars.ContextVar("ft_magics_data_progress", default=None)


@contextlib.contextmanager
def data_progress(report: Callable[[str, int, int], None]):
    """While active, :func:`tokenize_records` calls ``report(stage, done, total)`` as it goes (every batch): a
    large dataset took tens of seconds with nothing on the screen, and the cell looked hung."""
    token = _PROGRESS.set(report)
    try:
        yield
    finally:
        _PROGRESS.reset(token)


def tokenize_records(tokenizer, records: list[Record], train_on: str = "answers") -> list[TokenizedExample]:
    """:func:`tokenize_record` of every record, with the texts encoded in batches, and remembered: the same
    records with the same tokenizer (a cell run again with other settings) are not tokenised again.

    Measured on 20,000 question/answer rows with the demo tokenizer (2 cores): 5.4 s one record at a time;
    batched, with the last answer's conversation rendered once, 3.7-4.0 s; from the cache 0.4 s (the
    whole of Session.prepare_data: 5.5-6.3 s before)."""
    key = (_tokenizer_key(tokenizer), train_on, fingerprint(records))
    hit = _TOKENIZED.pop(key, None)
    if hit is None:
        progress = _PROGRESS.get() or (lambda stage, done, total: None)
        rendered = []
        for at in range(0, len(records), ENCODE_BATCH):
            rendered += [_render_checked(tokenizer, rec) for rec in records[at:at + ENCODE_BATCH]]
            progress("rendering", len(rendered), len(records))
        hit = [None] * len(records)
        done = 0
        for special in (False, True):
            idx = [i for i, r in enumerate(rendered) if r[2] is special]
            for at in range(0, len(idx), ENCODE_BATCH):
                part = idx[at:at + ENCODE_BATCH]
                enc = tokenizer([rendered[i][0] for i in part], add_special_tokens=special,
                                return_offsets_mapping=True)
                for j, i in enumerate(part):
                    text, spans, _ = rendered[i]
                    hit[i] = _example(tokenizer, text, spans, special, enc["input_ids"][j], enc["offset_mapping"][j],
                                      train_on)
                done += len(part)
                progress("tokenising", done, len(records))
    _TOKENIZED[key] = hit  # the newest last
    while len(_TOKENIZED) > TOKENIZED_CACHE_ENTRIES:
        del _TOKENIZED[next(iter(_TOKENIZED))]
    return list(hit)


def forget_tokenized() -> None:
    """Drop the remembered tokenisations (their memory goes with them)."""
    _TOKENIZED.clear()


def tokenize(records: list[Record], tokenizer, max_seq_len: int, train_on: str = "answers",
             overlong: str = "truncate", report: Optional[DataReport] = None) -> list[TokenizedExample]:
    """Tokenise ``records``; cut or drop the overlong ones; drop (and count in ``report``) every example
    left without a loss-bearing token, so no step ever trains on nothing."""
    out = []
    for record, ex in zip(records, tokenize_records(tokenizer, records, train_on)):
        empty = _nothing_to_learn(record, train_on)
        if empty:
            fitted, outcome = None, empty
        elif overlong == "split" and len(ex.input_ids) > max_seq_len:
            rows = [r for r in (TokenizedExample(ex.input_ids[i:i + max_seq_len], ex.labels[i:i + max_seq_len])
                                for i in range(0, len(ex.input_ids), max_seq_len)) if r.n_loss_tokens]
            out.extend(rows)
            fitted, outcome = None, "kept"
            if report is not None:
                report.split_rows += len(rows)
        else:
            fitted, outcome = fit_length(ex, max_seq_len, overlong)
        if report is not None:
            if not empty:  # the Tokens and Length lines describe what can train, the overlong too (they advise on
                report.lengths.append(len(ex.input_ids))  # them), not a row with nothing to learn from
            report.count(outcome, ex, record.where)
        if fitted is not None:
            out.append(fitted)
    return out


def _nothing_to_learn(record: Record, train_on: str) -> str:
    """The report's outcome for a record that has nothing to train on ("dropped_unweighted": every answer has
    weight 0; "dropped_empty": no answer, or blank text), or "" for one that has."""
    if train_on != "all" and record.weights is not None and not any(record.weights):
        return "dropped_unweighted"  # every answer is context (weight 0)
    if train_on != "all" and _answerless(record):  # only the end-of-turn token would carry loss (the model
        return "dropped_empty"  # would learn to end its turn at once), or no assistant turn has any
    if record.messages is None and not (record.text or "").strip():  # plain text of spaces
        return "dropped_empty"
    return ""


def _answerless(record: Record) -> bool:
    """A conversation whose answers are all empty (blank, no tool call), or that has none."""
    if record.messages is None:
        return False
    answers = [m for m in record.messages if m.get("role") == "assistant"]
    if not answers:  # no assistant turn at all: nothing to learn either
        return True
    if record.weights is not None:  # the answers trained on
        answers = [m for m, w in zip(answers, record.weights) if w]
    return bool(answers) and all(not str(m.get("content") or "").strip() and not m.get("tool_calls") for m in answers)


def fit_length(ex: TokenizedExample, max_seq_len: int, overlong: str = "truncate",
               cut: Optional[int] = None) -> tuple:
    """``(the example as it trains, or None when it cannot, what happened)``; what happened is "kept",
    "truncated", "prompt_cut" (overlong: truncate_prompt), "dropped_overlong", "dropped_empty" (no loss-bearing
    token at all) or "dropped_no_answer" (the whole answer lay beyond ``max_seq_len``): the :class:`DataReport`
    counters of those names. ``cut``: the prompt tokens truncate_prompt takes out (both sides of a preference
    pair lose the same ones); by default as many as the example is over."""
    if ex.n_loss_tokens == 0:
        return None, "dropped_empty"
    if len(ex.input_ids) <= max_seq_len and not cut:
        return ex, "kept"
    if overlong == "drop":
        return None, "dropped_overlong"
    if overlong == "truncate_prompt":
        shorter = cut_prompt(ex, len(ex.input_ids) - max_seq_len if cut is None else cut)
        if shorter is not None and len(shorter.input_ids) <= max_seq_len:
            return shorter, "prompt_cut"
    cut = TokenizedExample(ex.input_ids[:max_seq_len], ex.labels[:max_seq_len])
    return (cut, "truncated") if cut.n_loss_tokens else (None, "dropped_no_answer")


def cut_prompt(ex: TokenizedExample, excess: int) -> Optional[TokenizedExample]:
    """``ex`` without ``excess`` tokens from the middle of its prompt (what comes before its first loss-bearing
    token): the prompt's start (the template's header, the instruction) and its end (the question after a long
    document) stay, and so does the answer. None where the prompt is too short to give that many and keep at
    least :data:`PROMPT_KEPT` tokens."""
    first = next((i for i, lab in enumerate(ex.labels) if lab != -100), 0)
    keep = first - excess
    if excess <= 0 or keep < PROMPT_KEPT:
        return None
    head = keep // 2
    return TokenizedExample(ex.input_ids[:head] + ex.input_ids[head + excess:],
                            ex.labels[:head] + ex.labels[head + excess:])


PROMPT_KEPT = 8  # overlong: truncate_prompt leaves at least this much of a prompt, else cuts the answer's end


def show_loss_tokens(tokenizer, ex: TokenizedExample, limit: int = 600) -> str:
    """Decode an example with ⟦...⟧ around the loss-bearing stretches."""
    parts, cur, cur_loss = [], [], None
    for tok, lab in zip(ex.input_ids, ex.labels):
        is_loss = lab != -100
        if cur_loss is not None and is_loss != cur_loss:
            parts.append((cur_loss, tokenizer.decode(cur)))
            cur = []
        cur.append(tok)
        cur_loss = is_loss
    if cur:
        parts.append((cur_loss, tokenizer.decode(cur)))
    text = "".join(f"⟦{t}⟧" if loss else t for loss, t in parts)
    if len(text) <= limit:
        return text
    # too long to show whole: each long stretch loses its middle, the context's more than the loss-bearing text's,
    # so the example still shows where the loss falls (a long system prompt, a tool schema, cut at the end, hid it)
    text = "".join(f"⟦{_middle_cut(t, limit // 2)}⟧" if loss else _middle_cut(t, limit // 3) for loss, t in parts)
    first_loss = text.find("⟧")
    end = max(limit, first_loss + 1)
    return text if len(text) <= end else text[:end] + " …"


def _middle_cut(text: str, keep: int) -> str:
    """``text``, or its first and last ``keep // 2`` characters around a note of what was left out."""
    if len(text) <= keep + 40:
        return text
    half = keep // 2
    return f"{text[:half]} … [{len(text) - 2 * half:,} characters] … {text[-half:]}"


# ----------------------------------------------------------------------------- packing
def pack(examples: list[TokenizedExample], max_seq_len: int) -> list[TokenizedExample]:
    """Pack examples into rows of at most ``max_seq_len`` tokens (best fit, longest first).

    Each row keeps ``position_ids`` that restart at 0 for every example: transformers reads a restart
    as the start of a new sequence and masks attention across it (sdpa, eager, flex: a block-diagonal
    causal mask; flash attention: variable-length kernels). The first label of each example is -100:
    in a packed row the token before it belongs to another example, which must not learn to predict it.
    """
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i].input_ids), i))
    rows: list[list[int]] = []
    free: list[list[int]] = [[] for _ in range(max_seq_len + 1)]  # free[c]: rows with c tokens of room
    room: list[int] = []
    for i in order:
        n = len(examples[i].input_ids)
        row = None
        for c in range(n, max_seq_len + 1):
            if free[c]:
                row = free[c].pop()
                break
        if row is None:
            row = len(rows)
            rows.append([])
            room.append(max_seq_len)
        rows[row].append(i)
        room[row] -= n
        free[room[row]].append(row)
    packed = []
    for members in sorted(rows, key=lambda m: min(m)):
        ids, labels, pos = [], [], []
        for i in sorted(members):
            one = as_one_document(examples[i].features())
            ids += one["input_ids"]
            labels += one["labels"]
            pos += one["position_ids"]
        packed.append(TokenizedExample(ids, labels, pos))
    return packed


def packing_flattens(model) -> bool:
    """Flash-attention kernels isolate packed sequences only in a single flattened row (batch size 1);
    sdpa/eager/flex build a per-row block-diagonal mask, so padded rows work there."""
    return "flash" in str(attention_implementation(model) or "")


def padding_free_attention(model, device) -> bool:
    """Whether the attention that training runs keeps the examples of one flattened row apart at the cost of
    their own lengths: flash attention (variable-length kernels), and on the CPU ft_magics' own attention
    in place of SDPA (``core.speed.attention_for``: each example as a row of its own). SDPA elsewhere would
    take the row's block-diagonal mask and compute the whole row."""
    impl = str(attention_implementation(model) or "")
    return "flash" in impl or (impl == "sdpa" and str(device).startswith("cpu"))


def as_one_document(features: dict) -> dict:
    """One example's features as a packed row of one example (:func:`pack`'s layout: positions from 0, the
    first label -100), for :func:`collate_packed` to join with others. The first label is never a target in
    a row of its own either (nothing precedes it), so the loss is the same."""
    n = len(features["input_ids"])
    return {"input_ids": features["input_ids"], "labels": [-100] + list(features["labels"][1:]),
            "position_ids": list(range(n))}


def attention_implementation(model) -> Optional[str]:
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None)


def collate_packed(features: list[dict], pad_token_id: int, flatten: bool = False) -> dict:
    """Batch packed rows without an attention mask, so the model derives it from ``position_ids``.

    Padding gets its own positions 0..k-1 (a separate block, labels -100): real tokens never attend
    to it. With ``flatten`` the rows are joined into one row (no padding at all). ``use_cache=False``:
    transformers only derives the packed mask when no KV cache is made, and models default to making one."""
    import torch

    if flatten:
        ids = [t for f in features for t in f["input_ids"]]
        labels = [t for f in features for t in f["labels"]]
        pos = [t for f in features for t in f["position_ids"]]
        return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
                "position_ids": torch.tensor([pos]), "use_cache": False}
    width = max(len(f["input_ids"]) for f in features)
    ids, labels, pos = [], [], []
    for f in features:
        k = width - len(f["input_ids"])
        ids.append(list(f["input_ids"]) + [pad_token_id] * k)
        labels.append(list(f["labels"]) + [-100] * k)
        pos.append(list(f["position_ids"]) + list(range(k)))
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "position_ids": torch.tensor(pos),
            "use_cache": False}


def check_packing_isolation(model, tokenizer) -> tuple[bool, str]:
    """Ask the loaded model itself whether packed examples stay apart: the logits of a short text must
    be the same alone and packed after another text (through :func:`collate_packed`, exactly as in
    training). Returns (isolated, attention implementation). Forward passes only; no weight changes."""
    import torch

    impl = attention_implementation(model) or "unknown"
    a = tokenizer("The quick brown fox jumps over the lazy dog.", add_special_tokens=False)["input_ids"]
    b = tokenizer("How do I reset my password? Use the reset link.", add_special_tokens=False)["input_ids"]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    rows = [
        {"input_ids": a + b, "labels": a + b, "position_ids": list(range(len(a))) + list(range(len(b)))},
        {"input_ids": b, "labels": b, "position_ids": list(range(len(b)))},
    ]
    flatten = packing_flattens(model)
    batch = collate_packed(rows, pad, flatten=flatten)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    from .training import training_layout

    import logging

    quiet = logging.getLogger("transformers.modeling_utils")  # its "pass an attention_mask, input_ids may be padded"
    level = quiet.level  # is about these probe rows (GPT-2, pad = bos), not the user's data
    quiet.setLevel(logging.ERROR)
    try:  # in the layout training runs in (PEFT's DoRA reads a 4-bit weight repacked for inference as garbage)
        with torch.no_grad(), training_layout(model):
            alone = model(input_ids=torch.tensor([b], device=device), use_cache=False).logits[0].float()
            out = model(input_ids=batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device),
                        use_cache=False).logits.float()
            packed = out[0, len(a):len(a) + len(b)]
            leaked = model(input_ids=torch.tensor([a + b], device=device), use_cache=False).logits[0, len(a):].float()
    finally:
        model.train(was_training)
        quiet.setLevel(level)
    d_packed = (packed - alone).abs().max().item()
    d_leak = (leaked - alone).abs().max().item()
    return bool(d_leak > 0 and d_packed <= 0.1 * d_leak), impl


# ----------------------------------------------------------------------------- quality + prepare
def _identity(record) -> str:
    """A record as sorted JSON text: two records are the same example when these are equal (duplicates within
    the training data, eval rows that are also training rows)."""
    return json.dumps(record.to_json(), sort_keys=True)


_FEW = "the usual guidance is 100-500 high-quality examples at the least."


def few_examples_warning(n: int, rows: Optional[int] = None, unit: str = "example") -> Optional[str]:
    """The warning for a small training set: ``n`` examples (or pairs) that train (of ``rows`` read, where drops
    left fewer)."""
    if n >= 100:
        return None
    of = f" (of {counted(rows, 'row')} read; the others were dropped, see above)" if rows is not None and rows > n else ""
    return f"only {counted(n, unit)} train{of}; {_FEW}"


def quality_warnings(records: list[Record], unit: str = "example") -> list:
    """The small-set, duplicate and blank-prompt warnings; ``unit``: what a record is called (pairs)."""
    warnings = []
    few = few_examples_warning(len(records), unit=unit)
    if few:
        warnings.append(few)
    copies: dict = {}
    for r in records:
        key = _identity(r)
        copies[key] = copies.get(key, 0) + 1
    repeated = [c for c in copies.values() if c > 1]
    if repeated:  # "4 identical rows" read "3 exact duplicates (they weigh double)": they weigh 4x
        extra = sum(repeated) - len(repeated)
        most = max(repeated)
        warnings.append(f"{extra} exact duplicate {unit if extra == 1 else unit + 's'}: "
                        f"{counted(len(repeated), unit)} appear{'s' if len(repeated) == 1 else ''} more than "
                        f"once (up to {most} times), and each copy weighs once more in training.")
    blank = blank_prompt_warning(records, unit)
    if blank:
        warnings.append(blank)
    return warnings  # (an empty or blank example is dropped, and counted in the report, as it is tokenised)


def blank_prompt_warning(records: list, unit: str = "example", scored: bool = False) -> Optional[str]:
    """A warning for conversations with a blank user turn (an empty or whitespace-only prompt; a CSV's empty
    cell): they train as they are, the answer to no question, which is rarely what a row meant. ``scored``: the
    records are eval data, which the eval loss scores rather than trains on."""
    blank = [r for r in records if r.messages and any(
        m["role"] == "user" and not str(m.get("content") or "").strip() for m in r.messages)]
    if not blank:
        return None
    where = places([r.where for r in blank if r.where])
    one = len(blank) == 1
    what = ("its answer is scored as" if one else "their answers are scored as") if scored else (
        "it trains" if one else "they train")
    return (f"{counted(len(blank), unit)} {'has' if len(blank) == 1 else 'have'} an empty prompt (a blank user "
            f"turn{': ' + where if where else ''}): {what} the answer to no question. Fill the prompt in, or remove "
            "the row, unless that is what you want.")


def places(wheres: list, show: int = 3) -> str:
    """Where some rows are, briefly: "d.jsonl, lines 7, 9, 12 and 4 more" from "d.jsonl, line 7" and the like."""
    if not wheres:
        return ""
    head = [w.rpartition(", ") for w in wheres[:show]]
    more = f" and {len(wheres) - show:,} more" if len(wheres) > show else ""
    if all(sep and src == head[0][0] for src, sep, _ in head) and all(" " in at for _, _, at in head):
        unit = head[0][2].split(" ")[0]  # line / row
        if all(at.split(" ")[0] == unit for _, _, at in head):
            plural = ("indexes" if unit == "index" else f"{unit}s") if len(wheres) > 1 else unit
            return f"{head[0][0]}, {plural} " + ", ".join(at.split(" ", 1)[1] for _, _, at in head) + more
    return "; ".join(wheres[:show]) + more


def special_spellings(tokenizer) -> set:
    """The text of each special token of the tokenizer (``<|im_end|>``), which text holding it is read as."""
    specials = {t for t in getattr(tokenizer, "all_special_tokens", []) or [] if isinstance(t, str) and len(t) >= 3}
    for tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(tok, "special", False) and len(str(tok.content)) >= 3:
            specials.add(str(tok.content))
    return specials


def special_token_warning(records: list, tokenizer, scored: bool = False) -> Optional[str]:
    """A warning when the data's own text holds a special token's spelling (``<|im_end|>`` in an answer, pasted
    from a log or a chat export): the tokenizer reads it as that token, so the model learns to end its turn, or
    start a role, there; the printed example cannot show it, since it decodes to the same text."""
    specials = special_spellings(tokenizer)
    if not specials:
        return None
    found: dict = {}  # token -> examples holding it
    first = None
    for r in records:
        text = json.dumps(r.to_json(), ensure_ascii=False)
        held = [t for t in specials if t in text]
        for t in held:
            found[t] = found.get(t, 0) + 1
        if held and first is None:
            first = getattr(r, "where", "") or None
    if not found:
        return None
    tokens = ", ".join(f"{t!r} ({counted(n, 'example')})" for t, n in sorted(found.items(), key=lambda kv: -kv[1]))
    return (f"the data's text spells special tokens of the tokenizer: {tokens}{f', first at {first}' if first else ''}. "
            + ("Each is read as that token, not as text, and the eval loss scores it as one. " if scored else
               "Each is read as that token, not as text: in an answer the model learns to end its turn (or start a "
               "role) there. ")
            + "Remove or rewrite them where they are not meant as markup.")


def tool_warnings(records: list, tokenizer) -> list:
    """What this model's chat template leaves out of function-calling data: the tools' schemas (the model would
    learn to call functions it is never shown), and ShareGPT's function_call turns as calls (they train as the
    JSON text they were written as)."""
    out = []
    with_tools = sum(1 for r in records if getattr(r, "tools", None))
    if with_tools and not template_writes(tokenizer, "tools"):
        out.append(f"{counted(with_tools, 'example')} with tools: this model's chat template does not write the "
                   "tools' schemas into the prompt, so it learns to call functions it is not shown. Describe the "
                   "tools in the system message, or load a model whose chat template supports tools.")
    unread = sum(1 for r in records if any("call_unread" in m for m in getattr(r, "messages", None) or []))
    if unread:
        out.append(f"{counted(unread, 'example')} with function_call turns that are not a call as JSON ({{\"name\": "
                   "..., \"arguments\": ...}): each such turn trains as the text written, not as a tool call.")
    as_text = sum(1 for r in records if any("call_text" in m for m in getattr(r, "messages", None) or []))
    if as_text and not template_writes(tokenizer, "calls"):
        out.append(f"{counted(as_text, 'example')} with function_call turns: this model's chat template does not "
                   "write tool calls, so each call trains as its JSON text ({\"name\": ..., \"arguments\": ...}) "
                   "in the answer, and the model will call tools that way.")
    return out


def overlap_warning(train_records: list, eval_records: list) -> Optional[str]:
    """A warning when eval examples are also training examples (--eval the same file, a validation split cut
    from train, duplicated rows split by eval_fraction): their loss measures memory, not what generalises."""
    if not eval_records:
        return None
    seen = {_identity(r) for r in train_records}
    both = sum(1 for r in eval_records if _identity(r) in seen)
    if not both:
        return None
    return (f"{both:,} of the {counted(len(eval_records), 'eval example')} also appear in the training data, so the "
            "eval loss on them is not held out (it measures what the model memorised). Evaluate on rows kept out of "
            "training.")


# where each format's loss-bearing answer lives (what an example without one lacks)
ANSWER_PART = {
    "chat": "assistant messages", "sharegpt": "gpt/assistant turns", "prompt-completion": "completions",
    "alpaca": "outputs",
}


# columns that hold part of what is asked: left out of a prompt/completion reading, the prompt misses them
CONTEXT_NAMES = ("context", "input", "system_prompt", "instruction", "question", "prompt", "query", "passage",
                 "document", "history")


def _unused_prompt_columns(rows: list, fmt: str, column_map: Optional[str]) -> Optional[str]:
    """For prompt/completion rows, a note when columns named like part of the question (context, input,
    system_prompt, ...) sit beside the prompt unused: Dolly's instruction + context, OpenOrca's system_prompt +
    question were trained on the instruction or the question alone, without a word."""
    if not fmt.startswith("prompt-completion") or not rows or not isinstance(rows[0], dict):
        return None
    used = set(parse_map(column_map)) | {"prompt", "completion", "system"}
    m = re.search(r"\(columns (.*)\)$", fmt)  # how normalise read a known pair: "question -> prompt, ..."
    if m:
        used |= {part.split(" -> ")[0] for part in m.group(1).split(", ")}
    left = [str(k) for k in rows[0] if str(k) not in used and _plain(k) in CONTEXT_NAMES]
    system = next((c for c in left if "system" in c.lower()), None)
    if system is not None and "system" not in rows[0]:  # a system prompt has its own field
        return (f"column {system!r} is not used: the rows are read as prompt and completion. It is a system prompt: "
                f"--map \"{system}=system\" puts it before each prompt.")
    if not left:
        return None
    prompt = next((k for k in rows[0] if str(k) in used and str(k) not in ("completion", "system")
                   and _plain(k) in CONTEXT_NAMES + PROMPT_NAMES), "prompt")
    answer = next((part.split(" -> ")[0] for part in (m.group(1).split(", ") if m else [])
                   if part.endswith(" -> completion")), "completion")
    if len(left) == 1:  # the alpaca reading joins the two itself: instruction, a blank line, then the input
        pairs = [f"{prompt}=instruction"] if prompt != "instruction" else []
        pairs += [f"{left[0]}=input"] + ([f"{answer}=output"] if answer != "output" else [])
        return (f"column {left[0]!r} is not used: the prompt is {prompt!r} alone. To include it, --map "
                f"\"{','.join(pairs)}\" reads the rows as alpaca: {prompt!r}, a blank line, then {left[0]!r}.")
    return (f"column{'s' if len(left) > 1 else ''} {', '.join(map(repr, left))} {'are' if len(left) > 1 else 'is'} not "
            f"used: the prompt is {prompt!r} alone. To include {'them' if len(left) > 1 else 'it'}, join the columns "
            f"into one first (e.g. df['full'] = df['{prompt}'] + '\\n\\n' + df['{left[0]}']) and --map it to prompt.")


def _unused_text_column(rows: list, fmt: str, column_map: Optional[str]) -> Optional[str]:
    """For rows read in a structured format (alpaca, prompt/completion, chat), a note when a ``text`` column sits
    beside them unused: tatsu-lab/alpaca carries the whole prompt and answer again as ``text``, and TRL's
    SFTTrainer would train on that column. Here the structured columns win; the note says so, and how to switch."""
    base = fmt.split(" (")[0]
    if base in ("text", "preference pairs") or not rows or not isinstance(rows[0], dict):
        return None
    col = next((str(k) for k in rows[0] if _plain(k) == "text" and str(k) not in parse_map(column_map)), None)
    if col is None:
        return None
    return (f"column {col!r} is not used: the rows are read in the {base} format, so the model learns the answers "
            f"(the loss is on them alone). To train on {col!r} as plain text instead (every token): format: text"
            + (f" with text_field: {col}" if col != "text" else "") + ".")


def _unused_case_twin(rows: list, column_map: Optional[str]) -> Optional[str]:
    """A note when a column differs from a field's own column only in letter case or spaces ('Prompt' beside
    'prompt'): the field's column is read and the other left out without a word."""
    if not rows or not isinstance(rows[0], dict):
        return None
    keys = [k for k in rows[0] if isinstance(k, str)]
    mapped = parse_map(column_map)
    twin = next((k for k in keys if k != _plain(k) and _plain(k) in FORMAT_FIELDS and _plain(k) in keys
                 and k not in mapped), None)
    if twin is None:
        return None
    return (f"column {twin!r} is not used: {_plain(twin)!r} is read as the {_plain(twin)} (the two differ only in "
            f"letter case or spaces). Drop or rename the one not meant.")


# column names that read as a judgement on the row's answer (KTO's label, a rater's thumbs-up); a true/false column
# of another name is metadata (parallel_tool_calls, synthetic, deleted) and says nothing about the answer
VERDICT_NAMES = {"label", "labels", "verdict", "good", "is_good", "desirable", "is_desirable", "undesirable", "accepted",
                 "is_accepted", "correct", "is_correct", "approved", "is_approved", "preferred", "is_preferred",
                 "thumbs_up", "helpful", "is_helpful", "acceptable", "is_acceptable", "valid", "is_valid", "keep",
                 "chosen_label", "rating_ok", "passed", "pass"}


def _unused_verdict_column(rows: list, fmt: str) -> Optional[str]:
    """For conversations and prompt/completion rows, a note when a column holds true/false verdicts on the answers
    (KTO's ``label``: desirable or not): it is not read, so the answers marked false train as good ones."""
    if fmt.split(" (")[0] == "text" or not rows or not isinstance(rows[0], dict):
        return None
    sample = rows[:1000]
    for k in rows[0]:
        if _plain(k) not in VERDICT_NAMES:  # a flag of another meaning (OpenAI's parallel_tool_calls: false)
            continue
        values = [r.get(k) for r in sample if isinstance(r, dict)]
        if values and all(isinstance(v, bool) or str(v).strip().lower() in ("true", "false") for v in values):
            bad = sum(1 for v in values if v is False or str(v).strip().lower() == "false")
            if bad:
                return (f"column {str(k)!r} holds true/false verdicts and is not used: every row trains as a good "
                        f"answer, the {bad:,} marked false too (of the first {len(values):,}). Keep only the rows to "
                        "learn from (those marked true; for a DataFrame, df[df['" + str(k) + "']]), or give "
                        "preferred/rejected answer pairs (chosen/rejected) with objective: dpo.")
    return None


def _unused_answer_column(rows: list, fmt: str, text_field: str) -> Optional[str]:
    """For the text format, a note when a column named like an answer (label, answer, output, ...) sits
    beside the text unused: a classification or question set trained as plain text by mistake."""
    if fmt != "text" or not rows or not isinstance(rows[0], dict):
        return None
    text = text_field or "text"
    cols = [str(k) for k in rows[0] if str(k) != text and _plain(k) in ANSWER_NAMES]
    if not cols:
        return None
    prompts = [str(k) for k in rows[0] if str(k) not in (text, cols[0]) and _plain(k) in PROMPT_NAMES]
    instead = "drop text_field and use " if text_field else ""  # text_field makes it text, whatever the map says
    if prompts:  # question + answer + text: the pair is the likelier intent, and the question must not be lost
        return (f"columns {prompts[0]!r} and {cols[0]!r} are not used: the text format trains on {text!r} alone. "
                f"To train {cols[0]!r} as the answer to {prompts[0]!r}: {instead}--map "
                f"\"{prompts[0]}=prompt,{cols[0]}=completion\" (the {text!r} column is then left out).")
    return (f"column {cols[0]!r} is not used: the text format trains on {text!r} alone. To train {cols[0]!r} as "
            f"the answer to the text: {instead}--map \"{text}=prompt,{cols[0]}=completion\".")


def _unused_pair_columns(rows: list, fmt: str, mapping: Optional[str] = None) -> Optional[str]:
    """Under objective: sft, a note when chosen / rejected columns sit beside the conversation trained on (as in
    LLaMA-Factory's ShareGPT preference rows): preference pairs trained as one conversation by mistake. Not where
    ``mapping`` (--map) makes the chosen column the conversation: the preferred answers alone, on purpose."""
    if fmt.split(" (")[0] not in ("chat", "sharegpt") or not rows or not isinstance(rows[0], dict):
        return None
    by_lower = {_plain(k): str(k) for k in rows[0]}
    if not {"chosen", "rejected"} <= set(by_lower) or by_lower["chosen"] in parse_map(mapping):
        return None
    return (f"columns {by_lower['chosen']!r} and {by_lower['rejected']!r} are not used: objective: sft trains on the "
            f"conversation alone. To train on the preference pairs, set objective: dpo (or orpo, ipo, simpo).")


def _eval_map(cfg, erows: list) -> Optional[str]:
    """The column mapping the eval data is read with: ``eval_map`` if set, else ``map`` - unless the eval rows hold
    none of the columns ``map`` renames (eval data already in a format of its own: mapping it would fail)."""
    if getattr(cfg, "eval_map", None) is not None:
        return cfg.eval_map
    mapping = parse_map(cfg.map)
    if not mapping or not erows:
        return cfg.map
    keys = {str(k).strip() for r in erows[:1000] if isinstance(r, dict) for k in r}
    return cfg.map if any(a.split(".", 1)[0].strip() in keys or a in keys for a in mapping) else None


def split_records(src: Any, cfg, namespace: Optional[dict] = None, eval_src: Any = None,
                  txt_mode: Optional[str] = None) -> tuple:
    """``(records, format, description, unused-column note, train records, eval records, split description)``:
    the rows of --data normalised, and the held-out part: --eval's rows, else the source's own eval split
    (``rows.held_out``: see :func:`_with_held_out`), else ``eval_fraction`` of the rows (seeded). For a
    preference objective (``cfg.pairs``) the records are ``core.preference.Pair`` s."""
    if getattr(cfg, "pairs", False):
        from .preference import normalise_pairs as normalise_rows
    else:
        normalise_rows = normalise
    txt_mode = txt_mode or getattr(cfg, "txt_mode", "auto")
    max_rows = getattr(cfg, "max_rows", 0)
    reading = _READING_PAIRS.set(bool(getattr(cfg, "pairs", False)))
    try:
        rows, desc = load_rows(src, namespace, txt_mode, max_rows)
    finally:
        _READING_PAIRS.reset(reading)
    held = getattr(rows, "held_out", None) if eval_src is None else None
    if held:  # what the Data line calls the eval data: the eval split's files, or the split by name
        held = (held[1], held[1].desc if isinstance(held[1], _Files) else f"the '{held[0]}' split of {desc}")
    if getattr(rows, "only_split", None):
        desc += f", split '{rows.only_split}' (its only split, so it trains)"
    if getattr(rows, "file_splits", None):
        desc += f" ({rows.file_splits})"
    records, fmt = normalise_rows(rows, cfg.format, cfg.text_field, cfg.map, where=desc)
    unused_note = (_unused_case_twin(rows, cfg.map) or _unused_answer_column(rows, fmt, cfg.text_field)
                   or _unused_prompt_columns(rows, fmt, cfg.map)
                   or _unused_verdict_column(rows, fmt) or _unused_pair_columns(rows, fmt, cfg.map)
                   or _unused_text_column(rows, fmt, cfg.map))
    del rows
    if eval_src is not None or held is not None:
        try:
            erows, edesc = load_rows(held[0] if held else eval_src, namespace, txt_mode, max_rows)
            if getattr(erows, "held_out", None):  # --eval names a dataset with splits: its eval split, not 'train'
                split_name, source = erows.held_out
                erows, edesc = load_rows(source, namespace, txt_mode, max_rows)[0], f"the '{split_name}' split of {edesc}"
        except FtUsageError as exc:  # the same messages as for --data: say which of the two is wrong
            raise FtUsageError(f"the eval data ({held[1] if held else '--eval'}): {exc}") from None
        edesc = held[1] if held else edesc
        eval_map = _eval_map(cfg, erows)
        try:
            eval_records, eval_fmt = normalise_rows(erows, cfg.format, cfg.text_field, eval_map, where=edesc)
        except FtUsageError as exc:
            if getattr(exc, "missing_columns", None) and getattr(cfg, "eval_map", None) is None:
                raise FtUsageError(f"{exc} (--map is for --data's columns; give the eval data's own with "
                                   "eval_map: or --eval-map, e.g. --eval-map \"q=prompt,a=completion\")") from None
            raise
        train_records = records
        split_desc = f"eval from {edesc}" + (" (eval_fraction not used)" if held and cfg.eval_fraction else "")
        kind, eval_kind = fmt.split(" (")[0], eval_fmt.split(" (")[0]
        if (kind == "text") != (eval_kind == "text") and getattr(cfg, "train_on", "answers") != "all":
            split_desc += (f" - in the {eval_kind} format, not {kind}: its loss is on "
                           f"{'every token' if eval_kind == 'text' else 'the answers'}, training's on "
                           f"{'every token' if kind == 'text' else 'the answers'}, so the two losses do not compare")
    else:
        train_records, eval_records = split(records, cfg.eval_fraction, cfg.seed)
        split_desc = (f"eval_fraction {cfg.eval_fraction:g}, seed {cfg.seed}" if eval_records else "no eval data")
        share = len(eval_records) / max(len(records), 1)
        if eval_records and share > 2 * cfg.eval_fraction:  # one row of few: far more than the fraction asked
            split_desc += (f" - {counted(len(eval_records), 'row')} of {len(records)} held out, {share:.0%} of the "
                           "data: too few rows for that fraction (eval_fraction: 0 trains on all of them)")
    return records, fmt, desc, unused_note, train_records, eval_records, split_desc


@dataclass
class AnswerCase:
    """A held-out example as a question with a known answer: what generation is scored on."""

    prompt: str
    reference: str
    system: Optional[str] = None
    history: list = field(default_factory=list)  # earlier turns


def answer_cases(records: list) -> list:
    """The examples whose conversation ends with an assistant answer, split into what the model is asked
    (system prompt, earlier turns, the last user message) and the answer it should give. An empty answer, or one
    of weight 0, is no reference (the loss leaves those rows out too): a blank reply would match it."""
    cases = []
    for r in records:
        msgs = r.messages or []
        if len(msgs) < 2 or msgs[-1].get("role") != "assistant" or msgs[-2].get("role") != "user":
            continue
        if not str(msgs[-1].get("content") or "").strip() or (getattr(r, "weights", None) and not r.weights[-1]):
            continue
        system = msgs[0]["content"] if msgs[0].get("role") == "system" else None
        history = [m for m in msgs[1 if system is not None else 0:-2]]
        cases.append(AnswerCase(prompt=msgs[-2]["content"], reference=msgs[-1]["content"], system=system,
                                history=history))
    return cases


def prepare(src: Any, tokenizer, cfg, namespace: Optional[dict] = None, eval_src: Any = None,
            txt_mode: Optional[str] = None, model: Any = None) -> tuple[list, list, DataReport]:
    """Everything between a --data argument and tokenised train/eval examples, plus the report.

    Only reads ``model`` (for ``packing``: a forward-pass check that packed examples stay apart), and
    only once every row has been validated and tokenised."""
    from .inference import context_limit

    pairs = getattr(cfg, "pairs", False)
    if pairs:
        from .preference import pair_warnings, show_pair, tokenize_pairs
    records, fmt, desc, unused_note, train_records, eval_records, split_desc = split_records(
        src, cfg, namespace, eval_src, txt_mode)
    chat = has_chat_template(tokenizer)
    if fmt == "text":
        rendering = "plain text (text format)"
    elif chat:
        rendering = "the tokenizer's chat template"
    else:
        rendering = "plain prompt + answer text (the tokenizer has no chat template)"
    report = DataReport(
        source=desc, format=fmt, rows=len(records), train_rows=len(train_records), eval_rows=len(eval_records),
        rendering=rendering, fingerprint=fingerprint(records + (eval_records if eval_src is not None else [])),
        split=split_desc, max_seq_len=cfg.max_seq_len, overlong=cfg.overlong, train_on=cfg.train_on,
        context=context_limit(model) or 0,
    )
    report.objective = getattr(cfg, "objective", "sft")
    spec = {"data": data_spec(src, namespace), "eval": None if eval_src is None else data_spec(eval_src, namespace)}
    report.spec = spec if spec["data"] and (eval_src is None or spec["eval"]) else None
    if getattr(cfg, "eval_steps", 0) and not eval_records:
        report.split += (f"; eval_steps: {cfg.eval_steps} has nothing to evaluate: give --eval FILE or "
                         "eval_fraction: 0.1")
    report.warnings = (pair_warnings if pairs else quality_warnings)(train_records) + ([unused_note] if unused_note else [])
    if pairs and train_records and all(p.chosen == p.rejected for p in train_records):
        from ..config import objective_name

        raise FtUsageError(f"{desc}: in every one of the {counted(len(train_records), 'pair')} the chosen and the "
                           f"rejected answer are the same, so {objective_name(cfg.objective)} has nothing to learn (its "
                           "loss stays constant). Check the rejected column (--map ...=rejected), or train on the chosen "
                           "answers with objective: sft.")
    literal = special_token_warning(train_records, tokenizer)
    if literal:
        report.warnings.append(literal)
    report.warnings.extend(tool_warnings(train_records, tokenizer))
    overlap = overlap_warning(train_records, eval_records)
    if overlap:
        report.warnings.append(overlap)
    for check in (blank_prompt_warning(eval_records, "pair" if pairs else "example", scored=True),
                  special_token_warning(eval_records, tokenizer, scored=True)):
        if check:
            report.warnings.append(f"eval data: {check}")
    unweighted = sum(1 for r in train_records if getattr(r, "weights", None))  # (preference pairs have none)
    if unweighted and cfg.train_on == "all":
        report.warnings.append(f"{counted(unweighted, 'example')} with assistant messages of weight 0: train_on: all "
                               "trains on every token, so the weights are not applied; use train_on: answers to "
                               "keep those messages as context only.")
    if eval_src is not None and cfg.eval_fraction > 0:
        report.warnings.append(f"eval_fraction {cfg.eval_fraction:g} is not used: the held-out data is the eval "
                               "data given (--eval), and every training row trains.")
    eval_report = DataReport(source=desc, format=fmt, rows=0, train_rows=0, eval_rows=len(eval_records),
                             context=report.context)
    if pairs:
        train = tokenize_pairs(train_records, tokenizer, cfg.max_seq_len, cfg.overlong, report)
        evals = tokenize_pairs(eval_records, tokenizer, cfg.max_seq_len, cfg.overlong, eval_report)
    else:
        if cfg.overlong == "split" and fmt.split(" (")[0] != "text" and cfg.train_on != "all":
            raise FtUsageError(
                f"overlong: split cuts a long example into consecutive rows, for text learned whole (the text "
                f"format, or train_on: all); {desc} is in the {fmt.split(' (')[0]} format, whose later rows would "
                "lose the prompt they answer. Use overlong: truncate or drop, or a larger max_seq_len.")
        train = tokenize(train_records, tokenizer, cfg.max_seq_len, cfg.train_on, cfg.overlong, report)
        evals = tokenize(eval_records, tokenizer, cfg.max_seq_len, cfg.train_on, cfg.overlong, eval_report)
    if eval_records and not evals:  # the run would go on without evaluations: keep_best, early stopping idle
        raise FtUsageError(
            f"every one of the {counted(len(eval_records), 'eval example')} was dropped: at max_seq_len="
            f"{cfg.max_seq_len} none keeps a token of its answer (or none has one), so the run would evaluate "
            f"nothing. Raise max_seq_len ({eval_report.keep_whole(max(eval_report.lengths, default=0))}) or give eval "
            "rows with answers that fit.")
    report.eval_dropped = len(eval_records) - len(evals)
    why = [(eval_report.dropped_empty, "with an empty or blank answer, or none"),
           (eval_report.dropped_no_answer, "whose answer truncation cut away"),
           (eval_report.dropped_overlong, "too long (overlong: drop)"),
           (eval_report.dropped_unweighted, "whose every answer has weight 0")]
    report.eval_dropped_why = ", ".join(f"{n} {what}" for n, what in why if n)
    if train and len(train) != len(train_records):  # the small-set warning counts what trains: after the drops,
                                                   # and after overlong: split made several rows of one example
        few = few_examples_warning(len(train), len(train_records), "pair" if pairs else "example")
        report.warnings = [w for w in report.warnings if not w.endswith(_FEW)]
        if few:
            report.warnings.insert(0, few)
    if not train:
        if report.dropped_unweighted and report.dropped_unweighted + report.dropped_empty == len(train_records):
            raise FtUsageError(
                f"{desc}: no example has an answer to learn from: every assistant message has weight 0 (context "
                f"only) or is empty, in all {len(train_records)} examples. Set weight: 1 on the answers to train "
                "on (or drop the weight fields).")
        if report.dropped_empty == len(train_records) and cfg.train_on != "all":
            raise FtUsageError(
                f"{desc}: no example has an answer to learn from: in the {fmt.split(' (')[0]} format the loss is on "
                f"the {ANSWER_PART.get(fmt.split(' (')[0], 'answers')}, and every one of the "
                f"{len(train_records)} examples has none "
                "(empty, or missing). Add the answers, or train on every token with train_on: all."
                + (f" Also: {unused_note}" if unused_note else "")
            )
        if report.dropped_overlong:
            text = fmt.split(" (")[0] == "text"
            raise FtUsageError(
                f"{desc}: no training example is left: {counted(report.dropped_overlong, 'example')} longer than "
                f"max_seq_len={cfg.max_seq_len} {'was' if report.dropped_overlong == 1 else 'were'} dropped (overlong: "
                f"drop){' and the rest had no answer' if report.dropped_overlong < len(train_records) else ''}. Use "
                f"overlong: truncate{' or split (consecutive rows of the text)' if text else ''}, or a larger "
                f"max_seq_len ({report.keep_whole(max(report.lengths))}).")
        if report.answer_starts:
            first = min(report.answer_starts)
            if report.context and first >= report.context:
                advice = (f"The model reads at most {report.context:,} tokens (its context window), so shorten the "
                          "prompts.")
            else:
                advice = (f"Raise max_seq_len above {first:,} ({report.keep_whole(max(report.lengths))}), or shorten "
                          "the prompts.")
            raise FtUsageError(
                f"{desc}: max_seq_len={cfg.max_seq_len} cut away every answer: the answers begin after "
                f"{first:,} to {max(report.answer_starts):,} tokens of prompt. " + advice
            )
        raise FtUsageError(
            f"{desc}: no training example has a loss-bearing token left (all answers empty or cut away by "
            f"max_seq_len={cfg.max_seq_len}). Raise max_seq_len or check the answer fields."
        )
    report.loss_tokens = sum(e.n_loss_tokens for e in train)
    report.example = show_pair(tokenizer, train[0]) if pairs else show_loss_tokens(tokenizer, train[0])
    if getattr(cfg, "packing", False):
        train, evals = _pack_checked(train, evals, tokenizer, cfg, model, report)
    beyond = context_note(report.context, train)
    if beyond:
        report.warnings.append(beyond)
    return train, evals, report


def context_note(window: int, examples: list) -> Optional[str]:
    """What to say when training rows are longer than the model's context ``window`` (positions it never
    learned: a max_seq_len of 100000 on an 8k model is accepted, and those rows train on garbage positions)."""
    longer = sum(1 for e in examples if len(e.input_ids) > window) if window else 0
    if not longer:
        return None
    return (f"{counted(longer, 'training row')} longer than the model's context window ({window:,} tokens): "
            f"it never learned positions past that. Set max_seq_len: {window} (overlong: truncate, drop or split).")


def _round_up(n: int, step: int = 64) -> int:
    return -(-n // step) * step


def _pack_checked(train, evals, tokenizer, cfg, model, report):
    if model is None:
        raise FtUsageError("packing needs the loaded model (to check its attention keeps examples apart).")
    isolated, impl = check_packing_isolation(model, tokenizer)
    if not isolated:
        raise FtUsageError(
            f"packing: true, but this model's attention implementation ({impl!r}) lets packed examples attend "
            "to each other (checked with a forward pass). Set packing: false, or load the model with sdpa, "
            "eager or flash attention."
        )
    n = report.packed_examples = len(train)
    train = pack(train, cfg.max_seq_len)
    evals = pack(evals, cfg.max_seq_len) if evals else evals
    fill = sum(len(r.input_ids) for r in train) / (len(train) * cfg.max_seq_len)
    how = ("one flattened row per batch, flash-attention varlen kernels" if packing_flattens(model)
           else "a block-diagonal causal mask")
    report.attention = impl
    report.packing = (
        f"{counted(n, 'example')} -> {counted(len(train), 'row')} of <= {cfg.max_seq_len} tokens ({fill:.0%} full); "
        f"examples kept apart by {impl} attention with position_ids restarting per example ({how}), "
        "checked on this model"
    )
    report.loss_tokens = sum(e.n_loss_tokens for e in train)
    return train, evals
