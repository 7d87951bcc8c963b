"""Datasets in every common shape -> normalised records -> tokenised examples with loss masks.

Pipeline (each step is a pure function, so the magics, the Python API and the tests share it):

    load_rows(src)            file / folder / variable / demo:NAME  -> list of dict rows
    normalise(rows, ...)      detect the format, validate every row  -> list of Record
    tokenize(records, tok)    render (chat template or plain text)   -> input_ids + labels (-100 = no loss)

Everything a user can get wrong is an :class:`FtUsageError` raised *before* the model is touched.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

from ..errors import FtUsageError, did_you_mean

DEMO_DIR = Path(__file__).resolve().parent.parent / "data"
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt")
ROLE_ALIASES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "system": "system",
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

    def to_json(self) -> dict:
        if self.text is not None:
            return {"text": self.text}
        out = {"messages": self.messages}
        if self.tools:
            out["tools"] = self.tools
        return out


# ----------------------------------------------------------------------------- sources
def demo_datasets() -> list[str]:
    return sorted(p.stem for p in DEMO_DIR.glob("*.jsonl"))


def load_rows(src: Any, namespace: Optional[dict] = None, txt_mode: str = "auto") -> tuple[list[dict], str]:
    """Rows (a list of dicts) and a short description of where they came from."""
    if not isinstance(src, str):
        return _rows_from_object(src, "the given object"), f"<{type(src).__name__}>"
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
        return _read_jsonl(path), src
    path = Path(src).expanduser()
    if path.exists():
        return _rows_from_path(path, txt_mode), str(path)
    if namespace is not None and src.isidentifier():
        if src in namespace:
            return _rows_from_object(namespace[src], f"variable {src!r}"), f"variable {src}"
        names = [k for k, v in namespace.items() if not k.startswith("_") and _looks_like_data(v)]
        raise FtUsageError(
            f"--data {src!r} is neither a file nor a variable in this notebook{did_you_mean(src, names)}. "
            "Give a path to a .jsonl/.json/.csv/.tsv/.parquet/.txt file, demo:NAME, or define the variable first."
        )
    hint = ""
    if path.parent.exists():
        hint = did_you_mean(path.name, [p.name for p in path.parent.iterdir()])
    raise FtUsageError(f"data file {src!r} does not exist{hint} (looked relative to {Path.cwd()}).")


def _looks_like_data(v: Any) -> bool:
    mod = type(v).__module__
    return isinstance(v, (list, tuple)) or mod.startswith(("pandas", "datasets"))


def _rows_from_object(obj: Any, what: str) -> list[dict]:
    mod = type(obj).__module__
    if mod.startswith("pandas") and hasattr(obj, "to_dict"):
        if hasattr(obj, "columns"):
            return obj.to_dict(orient="records")
        raise FtUsageError(f"{what} is a pandas {type(obj).__name__}; pass a DataFrame with named columns.")
    if mod.startswith("datasets"):
        if type(obj).__name__ in ("DatasetDict", "IterableDatasetDict"):
            if "train" not in obj:
                raise FtUsageError(f"{what} is a DatasetDict without a 'train' split (splits: {', '.join(obj)}).")
            obj = obj["train"]
        return [dict(r) for r in obj]
    if isinstance(obj, dict) and obj and all(isinstance(v, list) for v in obj.values()):
        lengths = {len(v) for v in obj.values()}
        if len(lengths) == 1:  # a dict of columns
            keys = list(obj)
            return [dict(zip(keys, vals)) for vals in zip(*obj.values())]
    if isinstance(obj, (list, tuple)):
        rows = list(obj)
        if all(isinstance(r, str) for r in rows):
            return [{"text": r} for r in rows]
        for i, r in enumerate(rows):
            if not isinstance(r, dict):
                raise FtUsageError(
                    f"{what}: item {i} is a {type(r).__name__}; a list must hold dicts (one per example) or strings."
                )
        return rows
    raise FtUsageError(
        f"{what} is a {type(obj).__name__}; --data takes a pandas DataFrame, a list of dicts or strings, "
        "or a datasets.Dataset."
    )


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    try:
        fh = open(path, encoding="utf-8")
    except OSError as exc:
        raise FtUsageError(f"cannot read {path}: {exc.strerror}.") from None
    with fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise FtUsageError(
                    f"{path}, line {n}: not valid JSON ({exc.msg} at column {exc.colno}). "
                    "Each line of a .jsonl file must be one JSON object."
                ) from None
            except UnicodeDecodeError:
                raise FtUsageError(f"{path}, line {n}: not UTF-8 text.") from None
            if not isinstance(row, dict):
                raise FtUsageError(f"{path}, line {n}: a JSON {type(row).__name__}, expected an object {{...}}.")
            rows.append(row)
    return rows


def _read_txt(path: Path, mode: str) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    if mode == "auto":
        mode = "blocks" if "\n\n" in text.strip() else "lines"
    if mode == "document":
        return [{"text": text}]
    if mode == "blocks":
        parts = [p.strip() for p in text.split("\n\n")]
    elif mode == "lines":
        parts = [p.strip() for p in text.splitlines()]
    else:
        raise FtUsageError(f"txt mode {mode!r} is not one of document, lines, blocks, auto.")
    return [{"text": p} for p in parts if p]


def _rows_from_path(path: Path, txt_mode: str) -> list[dict]:
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            import datasets

            return _rows_from_object(datasets.load_from_disk(str(path)), f"saved dataset {path}")
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in FILE_SUFFIXES)
        if not files:
            raise FtUsageError(f"folder {path} holds no {', '.join(FILE_SUFFIXES)} files and is not a saved dataset.")
        rows: list[dict] = []
        for f in files:
            rows += _rows_from_path(f, txt_mode)
        return rows
    suffix = path.suffix.lower()
    if path.stat().st_size == 0:
        raise FtUsageError(f"{path} is empty.")
    try:
        if suffix == ".jsonl":
            return _read_jsonl(path)
        if suffix == ".json":
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                # a .json file that is really JSON lines
                try:
                    return _read_jsonl(path)
                except FtUsageError:
                    raise FtUsageError(
                        f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})."
                    ) from None
            if isinstance(data, dict):
                lists = [k for k, v in data.items() if isinstance(v, list)]
                if len(lists) == 1 and all(isinstance(r, dict) for r in data[lists[0]]):
                    data = data[lists[0]]
                else:
                    data = [data] if not lists else _rows_from_object(data, str(path))
            return _rows_from_object(data, str(path))
        if suffix in (".csv", ".tsv"):
            import pandas as pd

            df = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", keep_default_na=False)
            return df.to_dict(orient="records")
        if suffix == ".parquet":
            import pandas as pd

            return pd.read_parquet(path).to_dict(orient="records")
        if suffix == ".txt":
            return _read_txt(path, txt_mode)
    except FtUsageError:
        raise
    except UnicodeDecodeError:
        raise FtUsageError(f"{path} is not UTF-8 text.") from None
    except OSError as exc:
        raise FtUsageError(f"cannot read {path}: {exc}.") from None
    except Exception as exc:  # noqa: BLE001 - pandas/pyarrow parser errors
        raise FtUsageError(f"cannot parse {path}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
    raise FtUsageError(
        f"{path.name}: unsupported file type {suffix!r}{did_you_mean(suffix, FILE_SUFFIXES)}; "
        f"use one of {', '.join(FILE_SUFFIXES)}."
    )


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
        out[a] = b
    return out


def detect_format(keys: Iterable[str]) -> Optional[str]:
    keys = set(keys)
    for fmt, need in FORMAT_KEYS.items():
        if all(k in keys for k in need):
            return fmt
    return None


def _missing_fields_error(keys: set, where: str) -> FtUsageError:
    shown = ", ".join(sorted(map(str, keys))) or "(none)"
    formats = "; ".join(f"{fmt}: {' + '.join(need)}" for fmt, need in FORMAT_KEYS.items())
    suggestion = ""
    str_keys = sorted(map(str, keys))
    if len(str_keys) >= 2:
        suggestion = f" For example: --map \"{str_keys[0]}=prompt,{str_keys[1]}=completion\"."
    elif len(str_keys) == 1:
        suggestion = f" For example: --map \"{str_keys[0]}=text\"."
    return FtUsageError(
        f"{where}: cannot tell the dataset format from the fields found ({shown}). "
        f"Formats and their fields — {formats}. Rename columns with --map source=field.{suggestion}"
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
    if val is None or (isinstance(val, float) and math.isnan(val)):
        if required:
            raise FtUsageError(f"{where}: field {key!r} is missing or null.")
        return ""
    if isinstance(val, (int, float)) and not isinstance(val, bool):
        return str(val)
    if not isinstance(val, str):
        raise FtUsageError(f"{where}: field {key!r} must be a string, got {type(val).__name__}.")
    return val


def _messages(seq: Any, where: str, role_key="role", content_key="content") -> list:
    if not isinstance(seq, (list, tuple)) or not seq:
        raise FtUsageError(f"{where}: expected a non-empty list of messages, got {type(seq).__name__}.")
    out = []
    for j, m in enumerate(seq):
        if not isinstance(m, dict):
            raise FtUsageError(f"{where}, message {j}: expected an object with {role_key!r} and {content_key!r}.")
        raw_role = m.get(role_key)
        if raw_role is None and role_key == "role" and "from" in m:
            raw_role, content_key = m.get("from"), "value"
        role = ROLE_ALIASES.get(str(raw_role).lower()) if raw_role is not None else None
        if role is None:
            raise FtUsageError(
                f"{where}, message {j}: unknown role {raw_role!r}{did_you_mean(str(raw_role), ROLE_ALIASES)}. "
                f"Roles: {', '.join(sorted(ROLE_ALIASES))}."
            )
        content = m.get(content_key, m.get("content", m.get("value")))
        out.append({"role": role, "content": _content_text(content, f"{where}, message {j}")})
    return out


def normalise(rows: list[dict], fmt: str = "auto", text_field: Optional[str] = None,
              column_map: Optional[str] = None, where: str = "data") -> tuple[list[Record], str]:
    """Validate every row and turn it into a :class:`Record`; return the records and the format used."""
    if not rows:
        raise FtUsageError(f"{where} has no rows.")
    mapping = parse_map(column_map)
    if text_field:
        mapping.setdefault(text_field, "text")
    if mapping:
        keys0 = set().union(*(r.keys() for r in rows[:1000]))
        missing = [a for a in mapping if a not in keys0]
        if missing:
            raise FtUsageError(
                f"{where}: --map names column(s) {', '.join(map(repr, missing))} that do not exist"
                f"{did_you_mean(missing[0], keys0)}. Columns: {', '.join(sorted(map(str, keys0)))}."
            )
        rows = [{mapping.get(k, k): v for k, v in r.items()} for r in rows]
    keys = set().union(*(r.keys() for r in rows[:1000]))
    if fmt == "auto":
        found = detect_format(keys)
        if found is None:
            raise _missing_fields_error(keys, where)
        fmt = found
    elif fmt not in FORMAT_KEYS:
        raise FtUsageError(f"unknown format {fmt!r}{did_you_mean(fmt, FORMAT_KEYS)}; use auto or one of {', '.join(FORMAT_KEYS)}.")
    records = [_normalise_row(r, fmt, f"{where}, row {i + 1}") for i, r in enumerate(rows)]
    return records, fmt


def _normalise_row(row: dict, fmt: str, where: str) -> Record:
    if not isinstance(row, dict):
        raise FtUsageError(f"{where}: expected an object, got {type(row).__name__}.")
    need = FORMAT_KEYS[fmt]
    absent = [k for k in need if k not in row]
    if absent:
        raise FtUsageError(
            f"{where}: the {fmt} format needs field(s) {', '.join(map(repr, absent))}; "
            f"this row has {', '.join(sorted(map(str, row))) or 'no fields'}. Fix the row or use --map."
        )
    if fmt == "text":
        return Record(text=_string_field(row, "text", where))
    if fmt == "chat":
        msgs = _messages(row["messages"], where)
        tools = row.get("tools")
        return Record(messages=msgs, tools=tools if isinstance(tools, list) else None)
    if fmt == "sharegpt":
        msgs = _messages(row["conversations"], where, role_key="from", content_key="value")
        system = row.get("system")
        if isinstance(system, str) and system and msgs[0]["role"] != "system":
            msgs.insert(0, {"role": "system", "content": system})
        tools = row.get("tools")
        if isinstance(tools, str):
            try:
                tools = json.loads(tools)
            except json.JSONDecodeError:
                tools = None
        return Record(messages=msgs, tools=tools if isinstance(tools, list) else None)
    if fmt == "prompt-completion":
        p, c = row["prompt"], row["completion"]
        if isinstance(p, list) or isinstance(c, list):
            pm = _messages(p, f"{where}, prompt") if isinstance(p, list) else [
                {"role": "user", "content": _string_field(row, "prompt", where)}]
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
        raise FtUsageError(f"eval_fraction {fraction} leaves no training rows out of {len(records)}.")
    eval_idx = set(idx[:n_eval])
    return [r for i, r in enumerate(records) if i not in eval_idx], [records[i] for i in sorted(eval_idx)]


# ----------------------------------------------------------------------------- tokenisation
@dataclass
class TokenizedExample:
    input_ids: list
    labels: list  # -100 where no loss

    @property
    def n_loss_tokens(self) -> int:
        return sum(1 for x in self.labels if x != -100)


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
    dropped_no_answer: int = 0
    warnings: list = field(default_factory=list)
    example: str = ""
    rendering: str = ""
    fingerprint: str = ""
    loss_tokens: int = 0

    def stats(self) -> dict:
        if not self.lengths:
            return {}
        s = sorted(self.lengths)
        pick = lambda q: s[min(len(s) - 1, int(math.ceil(q * len(s))) - 1)] if q > 0 else s[0]  # noqa: E731
        return {"min": s[0], "median": pick(0.5), "p95": pick(0.95), "max": s[-1]}

    def text(self) -> str:
        st = self.stats()
        lines = [
            f"Data       {self.source}: {self.format} format, {self.rows} rows "
            f"-> {self.train_rows} train / {self.eval_rows} eval   ({self.rendering})",
        ]
        if st:
            lines.append(
                f"Tokens     min {st['min']} / median {st['median']} / p95 {st['p95']} / max {st['max']} per example; "
                f"{self.loss_tokens} loss-bearing tokens in training"
            )
        if self.truncated or self.dropped_overlong or self.dropped_no_answer:
            lines.append(
                f"Length     {self.truncated} truncated, {self.dropped_overlong} dropped as too long, "
                f"{self.dropped_no_answer} dropped because no answer token survived truncation"
            )
        for w in self.warnings:
            lines.append(f"Warning    {w}")
        if self.example:
            lines.append("Example    (text between ⟦ and ⟧ carries loss)")
            lines += ["  " + line for line in self.example.splitlines()]
        return "\n".join(lines)


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _render_plain(messages: list) -> tuple[str, list]:
    """Plain prompt+answer text for tokenizers without a chat template; spans of answer text."""
    text, spans = "", []
    for m in messages:
        if m["role"] == "assistant":
            start = len(text)
            text += m["content"]
            spans.append((start, len(text)))
            text += "\n\n"
        elif m["role"] == "system":
            text += m["content"] + "\n\n"
        else:
            text += m["content"] + "\n"
    return text.rstrip("\n"), spans


def _render_chat(tokenizer, messages: list, tools=None) -> tuple[str, list]:
    """Render with the chat template and find the character spans of every assistant turn."""
    kw = {"tokenize": False}
    if tools:
        kw["tools"] = tools
    full = tokenizer.apply_chat_template(messages, **kw)
    spans = []
    stable = True
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = tokenizer.apply_chat_template(messages[:k], add_generation_prompt=True, **kw) if k else ""
        upto = tokenizer.apply_chat_template(messages[: k + 1], **kw)
        if not (full.startswith(upto) and upto.startswith(prefix)):
            stable = False
            break
        spans.append((len(prefix), len(upto)))
    if not stable:  # templates that rewrite earlier turns: fall back to the last answer only
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prefix = tokenizer.apply_chat_template(messages[:last], add_generation_prompt=True, **kw)
        spans = [(len(prefix), len(full))] if full.startswith(prefix) else [(0, len(full))]
    return full, spans


def render(tokenizer, record: Record) -> tuple[str, list, bool]:
    """(text, answer spans, add special tokens?) for one record."""
    if record.text is not None:
        return record.text, [(0, len(record.text))], True
    if has_chat_template(tokenizer):
        text, spans = _render_chat(tokenizer, record.messages, record.tools)
        return text, spans, False
    text, spans = _render_plain(record.messages)
    return text, spans, True


def tokenize_record(tokenizer, record: Record, train_on: str = "answers") -> TokenizedExample:
    text, spans, special = render(tokenizer, record)
    enc = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    offsets = list(enc["offset_mapping"])
    if special and tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)  # so the model learns to stop
        offsets.append((len(text), len(text) + 1))
        spans = [(s, e + 1 if e == len(text) else e) for s, e in spans]
    if train_on == "all":
        labels = list(ids)
    else:
        labels = []
        for tok, (s, e) in zip(ids, offsets):
            inside = any(s < se and max(e, s + 1) > ss for ss, se in spans)
            labels.append(tok if inside else -100)
    return TokenizedExample(input_ids=ids, labels=labels)


def tokenize(records: list[Record], tokenizer, max_seq_len: int, train_on: str = "answers",
             overlong: str = "truncate", report: Optional[DataReport] = None) -> list[TokenizedExample]:
    out = []
    for rec in records:
        ex = tokenize_record(tokenizer, rec, train_on)
        if report is not None:
            report.lengths.append(len(ex.input_ids))
        if len(ex.input_ids) > max_seq_len:
            if overlong == "drop":
                if report is not None:
                    report.dropped_overlong += 1
                continue
            ex = TokenizedExample(ex.input_ids[:max_seq_len], ex.labels[:max_seq_len])
            if report is not None:
                report.truncated += 1
        if ex.n_loss_tokens == 0:
            if report is not None:
                report.dropped_no_answer += 1
            continue
        out.append(ex)
    return out


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
    return text if len(text) <= limit else text[:limit] + " …"


def quality_warnings(records: list[Record]) -> list:
    warnings = []
    n = len(records)
    if n < 100:
        warnings.append(f"only {n} examples; the seed's guidance is 100-500 high-quality examples at the least.")
    seen, dups, empty = set(), 0, 0
    for r in records:
        key = json.dumps(r.to_json(), sort_keys=True)
        if key in seen:
            dups += 1
        seen.add(key)
        if r.messages is not None:
            answers = [m["content"] for m in r.messages if m["role"] == "assistant"]
            if not answers or all(not a.strip() for a in answers):
                empty += 1
        elif not (r.text or "").strip():
            empty += 1
    if dups:
        warnings.append(f"{dups} exact duplicate examples (they weigh double in training).")
    if empty:
        warnings.append(f"{empty} examples with an empty answer (nothing to learn from them).")
    return warnings


def prepare(src: Any, tokenizer, cfg, namespace: Optional[dict] = None, eval_src: Any = None,
            txt_mode: str = "auto") -> tuple[list, list, DataReport]:
    """Everything between a --data argument and tokenised train/eval examples, plus the report."""
    rows, desc = load_rows(src, namespace, txt_mode)
    records, fmt = normalise(rows, cfg.format, cfg.text_field, cfg.map, where=desc)
    if eval_src is not None:
        erows, edesc = load_rows(eval_src, namespace, txt_mode)
        eval_records, _ = normalise(erows, cfg.format, cfg.text_field, cfg.map, where=edesc)
        train_records = records
    else:
        train_records, eval_records = split(records, cfg.eval_fraction, cfg.seed)
    chat = has_chat_template(tokenizer)
    report = DataReport(
        source=desc, format=fmt, rows=len(records), train_rows=len(train_records), eval_rows=len(eval_records),
        rendering="text" if fmt == "text" else ("chat template" if chat else "plain prompt + answer text"),
        fingerprint=fingerprint(records + eval_records),
    )
    report.warnings = quality_warnings(train_records)
    train = tokenize(train_records, tokenizer, cfg.max_seq_len, cfg.train_on, cfg.overlong, report)
    evals = tokenize(eval_records, tokenizer, cfg.max_seq_len, cfg.train_on, cfg.overlong)
    if not train:
        raise FtUsageError(
            f"{desc}: no training example has a loss-bearing token left (all answers empty or cut away by "
            f"max_seq_len={cfg.max_seq_len}). Raise max_seq_len or check the answer fields."
        )
    report.loss_tokens = sum(e.n_loss_tokens for e in train)
    report.example = show_loss_tokens(tokenizer, train[0])
    return train, evals, report
