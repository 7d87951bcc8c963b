"""The adapter registry: names, where each adapter lives, and switching between them on one base.

Adapters stay in PEFT's own format (adapter_config.json + adapter_model.safetensors) so plain
``peft``, vLLM or LoRAX load them unchanged.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..errors import FtUsageError, did_you_mean, need_text
from .atomic import COMPLETE_MARKER
from .events import counted

log = logging.getLogger(__name__)

BASE = "base"
SLOT_PREFIX = "ft-slot-"  # Session.serve's own adapters (core.routing): the router's slots ft-slot-0, ft-slot-1, ...
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")  # no '.': PEFT's layer dictionaries refuse it


def adapter_name_text(name: Any) -> str:
    """``name`` when it is text: an adapter is named by text (``None`` or ``3`` read as 'no adapter' further down:
    'adapter None is training in the background')."""
    return need_text(name, "an adapter's name", "'support-bot'")


def validate_name(name: str, model: Any = None) -> str:
    """An adapter name is also a folder name: no separators, no '..', no hidden names, not 'base'. With ``model``,
    not a part of its layers' paths either (see :func:`_layer_path_parts`)."""
    if name is not None:
        adapter_name_text(name)
    name = (name or "").strip()
    if not name:
        raise FtUsageError("the adapter name is empty: give one of ASCII letters, digits, '-' or '_', e.g. 'support-bot'.")
    if name == BASE:
        raise FtUsageError("'base' is reserved for the base model without adapters; choose another name.")
    if name.startswith(SLOT_PREFIX):  # an adapter loaded under a slot's name took the slot over
        raise FtUsageError(f"names that start with {SLOT_PREFIX!r} are reserved for the adapters Session.serve "
                           "holds in memory; choose another name.")
    if "/" in name or "\\" in name or ".." in name or name.startswith(".") or not _NAME_RE.match(name):
        dotless = name.replace(".", "_")
        hint = (f" ('.' cannot be part of one: PEFT names the adapter's layers with it; e.g. {dotless!r})"
                if "." in name and _NAME_RE.match(dotless) else "")
        raise FtUsageError(
            f"adapter name {name!r} is not allowed{hint}: use ASCII letters (a-z, A-Z), digits, '-' or '_', start "
            "with a letter or digit, at most 64 characters."
        )
    if model is not None:
        where = _layer_path_parts(model).get(name)
        if where is not None:
            raise FtUsageError(
                f"adapter name {name!r} is also part of the model's layer names ({where}): PEFT tells an adapter's "
                "weights apart by its name between the dots, so saving any other adapter would leave out those "
                f"layers' weights. Choose another name, e.g. {name + '-lora' if not name.isdigit() else 'run-' + name!r}.")
    return name


def _layer_path_parts(model: Any) -> dict:
    """``{part: a module path holding it}`` of every dot-separated part of the model's module paths
    (``model``, ``layers``, ``0``, ``mlp``, ``lora_A``...), the names of the adapters it holds left out."""
    held = set(getattr(model, "peft_config", None) or {})
    parts: dict = {}
    for path, _ in model.named_modules():
        for part in path.split("."):
            if part and part not in held:
                parts.setdefault(part, path)
    return parts


def name_from_folder(path) -> str:
    """The name an adapter folder loads under when none is given: the folder's name, a '.' (which an adapter
    name cannot hold) written '_' (``llama-3.1-lora`` -> ``llama-3_1-lora``), and spaces '-' (``a2 copy``, as a
    file manager names a copy -> ``a2-copy``)."""
    return re.sub(r"\s+", "-", Path(path).name.strip()).replace(".", "_")


@dataclass
class AdapterInfo:
    name: str
    path: Optional[str]
    loaded: bool = True
    origin: str = "trained"  # "trained" | "loaded"
    r: Optional[int] = None
    alpha: Optional[float] = None
    target_modules: Optional[list] = None
    steps: Optional[int] = None
    final_loss: Optional[float] = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        # where the folder is, whatever the working folder becomes: a relative path read after a %cd named
        # another project's folder of the same name (info failed; delete removed that one)
        if self.path:
            self.path = os.path.abspath(self.path)

    def size_on_disk(self) -> int:
        if not self.path or not Path(self.path).exists():
            return 0
        return sum(f.stat().st_size for f in Path(self.path).rglob("*") if f.is_file())


@contextlib.contextmanager
def open_weights(weights: Path):
    """``safe_open`` on an adapter's weights file; a file that cannot be parsed (truncated, not safetensors) is
    an FtUsageError that says so, wherever it is opened (a broken folder in the adapters folder must not take
    ``%lora_adapters list`` down with it)."""
    from safetensors import safe_open

    try:
        fh = safe_open(str(weights), framework="pt")
    except Exception as exc:  # noqa: BLE001 - any parse failure is a corrupt file
        raise FtUsageError(f"{weights} is corrupt or truncated ({type(exc).__name__}: {exc}).") from None
    with fh:
        yield fh


def read_adapter_folder(path: Path, parse_weights: bool = True) -> dict:
    """Check that ``path`` holds a complete PEFT LoRA adapter; return its config. Says what is wrong.
    ``parse_weights=False`` skips opening the safetensors file, for a caller about to read it anyway."""
    path = Path(path)
    if path.is_file():
        raise FtUsageError(f"{path} is a file, not an adapter folder: an adapter is a folder holding "
                           "adapter_config.json and adapter_model.safetensors.")
    if not path.is_dir():
        raise FtUsageError(f"adapter folder {path} does not exist.")
    cfg_file = path / "adapter_config.json"
    if not cfg_file.exists():
        partial = any(path.parent.glob(f".{path.name}.tmp-*"))
        model = ""
        if (path / "config.json").is_file():  # a model, such as export --merged writes: it loads as a base
            names = ", ".join(repr(m.get("name")) for m in merged_into(path) or [] if isinstance(m, dict))
            model = (f": it is a standalone model{f' with adapter {names} merged in (export --merged)' if names else ''}"
                     f", which loads as the base model: %qlora_load {path}")
        raise FtUsageError(
            f"{path} holds no adapter_config.json, so it is not a PEFT adapter folder"
            + (" (an interrupted save left only a temporary folder beside it)" if partial else "") + model + "."
        )
    try:
        config = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FtUsageError(f"{cfg_file} is corrupt ({exc}); the adapter cannot be loaded.") from None
    weights = path / "adapter_model.safetensors"
    if not weights.exists():
        pickles = [p.name for p in path.glob("adapter_model.bin")]
        if pickles:
            raise FtUsageError(
                f"{path} has only pickle weights (adapter_model.bin), which can run code when loaded. "
                "Convert it to safetensors first."
            )
        raise FtUsageError(f"{path} has adapter_config.json but no adapter_model.safetensors.")
    if parse_weights:
        with open_weights(weights) as fh:
            list(fh.keys())
    if config.get("peft_type", "LORA") != "LORA":
        raise FtUsageError(f"{path} is a {config.get('peft_type')} adapter; only LoRA adapters are supported.")
    return config


def check_finite(path: Path) -> None:
    """Refuse an adapter folder whose weights hold NaN or inf (a run that diverged, a broken conversion): loaded,
    it would answer with empty text greedily, crash sampling, and score a loss of nan."""
    import torch

    bad = []
    with open_weights(Path(path) / "adapter_model.safetensors") as fh:
        for key in fh.keys():
            t = fh.get_tensor(key)
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad.append(key)
    if bad:
        raise FtUsageError(
            f"{path} holds weights that are not finite numbers (NaN or inf) in {len(bad)} tensor(s), e.g. {bad[0]}: "
            "the run that wrote it diverged, or the file was written wrongly. Train it again (a lower learning_rate, "
            "max_grad_norm: 1.0), or load one of its checkpoints.")


def check_finite_adapter(model, name: str, active: Optional[str]) -> None:
    """Refuse the in-memory adapter ``name`` (just combined) when its weights, or the logits of a few tokens
    through it, overflow to NaN or inf; ``active`` (the adapter active before, or None) is active again after."""
    import torch

    where = next((key for key, p in model.named_parameters()
                  if f".{name}." in key and p.is_floating_point() and not bool(torch.isfinite(p).all())), None)
    if where is None:
        activate(model, name)
        try:
            ids = torch.arange(1, 9, device=model.device)[None] % model.config.vocab_size
            with torch.no_grad():
                logits = model(input_ids=ids).logits
            where = None if bool(torch.isfinite(logits).all()) else "the logits of a few tokens through it"
        finally:
            activate(model, active)
    if where is not None:
        raise FtUsageError(
            f"the combination {name!r} overflows: its weights are not finite numbers (in {where}). Use weights of "
            "an ordinary size (e.g. a:0.7,b:0.3); weights far from 1 scale the updates past what the dtype holds.")


def run_record(path) -> dict:
    """The ft_run.json record in adapter folder ``path`` ({} when there is none, or it cannot be read)."""
    return read_run_record(path)[0]


def read_run_record(path) -> tuple:
    """``(record, fault)``: adapter folder ``path``'s ft_run.json as :func:`run_record` gives it, and where the
    file is there but reads as no record, why, in a few words (else None)."""
    try:
        record = json.loads((Path(path) / "ft_run.json").read_text())
    except FileNotFoundError:
        return {}, None
    except OSError as exc:
        return {}, exc.strerror or type(exc).__name__
    except ValueError as exc:
        return {}, f"not JSON: {str(exc).split(':')[0]}"
    if isinstance(record, dict) and record:
        return record, None
    return {}, "an empty object" if isinstance(record, dict) else f"a JSON {type(record).__name__}, not an object"


def number_text(value):
    """A number as written (32, not the 32.0 a YAML body's alpha became), anything else as it is."""
    return f"{value:g}" if isinstance(value, float) else value


def folder_stamp(folder: Path) -> tuple:
    """What changes when an adapter folder's files are rewritten (a retrain replaces the folder, a job writes new
    weights, a copy lands over it): each file's inode, size and modification time."""
    out = []
    for f in sorted(Path(folder).glob("adapter_*")):
        st = f.stat()
        out.append((f.name, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


def info_from_folder(name: str, path: Path, origin: str) -> AdapterInfo:
    """The registry's entry for the adapter read from ``path``, with the stamp of the files it was read from
    (``extra["stamp"]``: a session reads the folder again once they change, see Session._reload_if_rewritten)."""
    stamp = folder_stamp(path)
    config = read_adapter_folder(path)
    record = run_record(path)
    tm = config.get("target_modules")
    return AdapterInfo(
        name=name, path=str(path), loaded=True, origin=origin, r=config.get("r"), alpha=config.get("lora_alpha"),
        target_modules=sorted(tm) if isinstance(tm, list) else tm, steps=record.get("steps"),
        final_loss=record.get("final_loss"), extra={"complete_marker": (Path(path) / COMPLETE_MARKER).exists(),
                                                    "best": record.get("best") or None, "stamp": stamp},
    )


# the run record's "dropped" keys (core.data.DataReport's counters), in the card's words
DROP_REASONS = {"dropped_empty": "with no answer (empty or blank)", "dropped_no_answer": "with the answer cut away "
                "by truncation", "dropped_overlong": "too long", "dropped_unweighted": "with every answer at weight 0",
                "eval_dropped": "of the eval data"}


def resumed_spans(resumed: Optional[dict]) -> list:
    """``[(steps "a-b", earlier data or None, {setting: value})]``, oldest first, of a run resumed once or more
    (its record's ``resumed``, each level holding the one before): what the steps before each resume ran on and
    with, where that was not what came after."""
    chain = []
    while isinstance(resumed, dict) and resumed.get("at") is not None:
        chain.append(resumed)
        resumed = resumed.get("before")
    data, later = [], None  # a part whose data was the next part's records none: it is the next one's
    for level in chain:
        later = level.get("earlier_data") or later
        data.append(later)
    spans, start = [], 1
    for level, d in zip(reversed(chain), reversed(data)):
        spans.append((f"{start}-{level['at']}", d, level.get("earlier_settings") or {}))
        start = level["at"] + 1
    return spans


def _joined_spans(spans: list) -> list:
    """``[(steps "a-b", data)]``: adjacent spans of :func:`resumed_spans` that ran on the same data, as one."""
    out: list = []
    for span, d, _ in spans:
        if out and d and out[-1][1] == d:
            out[-1] = (f"{out[-1][0].split('-')[0]}-{span.split('-')[1]}", d)
        else:
            out.append((span, d))
    return out


def adapter_card(name: str, path: Path, state: str = "") -> str:
    """What an adapter folder says about itself: its LoRA shape, the base it was made on, and for one this
    tool trained, the run (steps, losses, data, the settings that differ from the defaults, speed, peak)."""
    import datetime

    from ..config import PAIR_ONLY_SETTINGS, TrainConfig
    from .memory import human_bytes

    path = Path(path)
    config = read_adapter_folder(path, parse_weights=False)
    record, fault = read_run_record(path)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    tm = config.get("target_modules")
    # PEFT writes all-linear as every layer's full path (model.layers.0.self_attn.q_proj, ...): the card names
    # the kinds of layer, as target_modules is usually written
    modules = ", ".join(sorted({str(t).rsplit(".", 1)[-1] for t in tm})) if isinstance(tm, list) else str(tm)
    rows = [("Adapter", f"{name}{f'  ({state})' if state else ''}  {path}  {human_bytes(size)}"),
            ("LoRA", f"r={config.get('r')} alpha={number_text(config.get('lora_alpha'))} "
                     f"dropout={config.get('lora_dropout', 0)}"
                     + (" DoRA" if config.get("use_dora") else "") + (" rsLoRA" if config.get("use_rslora") else "")
                     + f" on {modules}")]
    held = first_weight_rank(path) if isinstance(config.get("r"), int) and not config.get("rank_pattern") else None
    if held is not None and held[0] != config["r"]:  # the config alone would have the card say what loads refuse
        rows.append(("Warning", rank_contradiction(path, config["r"], *held)))
    base = record.get("base_model") or {}
    base_name = base.get("name") or config.get("base_model_name_or_path")
    if base_name:
        rows.append(("Base", f"{base_name}" + (f", {base['bits']}-bit" if base.get("bits") else "")))
    if fault:  # the rows below come from the record: say why they are missing
        rows.append(("Note", f"its run record {path / 'ft_run.json'} cannot be read ({fault}), so how "
                             "it was trained is not shown; the weights and settings above are what loads."))
    if record.get("combined_from"):
        parts = ", ".join(f"{k}:{v:g}" for k, v in record["combined_from"].items())
        rows.append(("Combined", f"{parts} ({record.get('method', 'linear')})"))
    timings = record.get("timings") or {}
    if record.get("steps") is not None:
        when = (datetime.datetime.fromtimestamp(timings["started"]).strftime("%Y-%m-%d %H:%M")
                if timings.get("started") else "")
        speed = f", {timings['loss_tokens_per_s']:,.0f} loss-tok/s" if timings.get("loss_tokens_per_s") else ""
        took = f" in {timings['seconds']:.1f} s" if timings.get("seconds") is not None else ""
        resumed = record.get("resumed") or {}
        if resumed.get("at") is not None:  # the timings are the resumed part's
            took = f" (resumed at step {resumed['at']}; steps {resumed['at'] + 1}-{record['steps']}{took}{speed})"
            speed = ""
        rows.append(("Trained", f"{counted(record['steps'], 'step')}{took}{speed}; {record.get('status', '?')}"
                                + (f"; started {when}" if when else "")))
        losses = [v for _, v in record.get("loss_history") or []] if record.get("loss_history") else []
        first = f"{losses[0]:.4f} -> " if losses else ""
        final = record.get("final_loss")
        loss = f"{first}{final:.4f}" if final is not None else "-"
        if record.get("eval_loss") is not None:
            loss += f"; eval {record['eval_loss']:.4f}"
        best = record.get("best") or {}
        if best.get("restored"):
            loss += f" (the weights of step {best['step']}, its lowest eval loss"
            loss += f"; early stopping at step {best['early_stopped_at']})" if best.get("early_stopped_at") else ")"
        rows.append(("Loss", loss))
    spans = resumed_spans(record.get("resumed"))
    data = record.get("data") or {}
    if data:
        ran_on = "; ".join(f"steps {span} ran on {d}" for span, d in _joined_spans(spans) if d)
        trained, drops = data.get("trained_examples"), data.get("dropped") or {}
        dropped = sum(drops.values())
        why = ", ".join(f"{n:,} {DROP_REASONS.get(k, k)}" for k, n in drops.items() if n)  # as the report said
        rows.append(("Data", f"{data.get('source')}: {data.get('format')}, {counted(data.get('rows') or 0, 'row')} "
                              f"({data.get('train_rows') or 0:,} train / {data.get('eval_rows') or 0:,} eval)"
                              + (f"; {trained:,} trained on, {dropped:,} dropped ({why})"
                                 if trained is not None and dropped else "")
                              + (f"; {ran_on}" if ran_on else "")))
    settings = record.get("settings") or {}
    if settings:
        defaults = dataclasses.asdict(TrainConfig())
        unused = PAIR_ONLY_SETTINGS if settings.get("objective", "sft") == "sft" else ()  # e.g. the old default beta
        changed = [f"{k} {v}" for k, v in settings.items() if k in defaults and defaults[k] != v and k not in unused]
        ran_with = "; ".join(f"steps {span}: {', '.join(f'{k} {v}' for k, v in were.items())}"
                             for span, _, were in spans if were)
        rows.append(("Settings", (", ".join(changed) if changed else "the defaults")
                     + (f" ({ran_with})" if ran_with else "")))
    peak = record.get("peak_memory") or {}
    if peak.get("bytes"):
        rows.append(("Peak", f"{human_bytes(peak['bytes'])} ({peak.get('label', '')})"))
    return "\n".join(f"{k:<10} {v}" for k, v in rows)


def replacing_note(target: Path, name: str) -> Optional[str]:
    """What a fresh run of ``name`` into ``target`` would replace, said before it starts (None: nothing)."""
    try:
        info = info_from_folder(name, Path(target), "trained")
    except (FtUsageError, OSError, ValueError):
        return None
    done = f"{counted(info.steps, 'step')}, loss {info.final_loss:.4f}" if info.steps and info.final_loss is not None else "trained earlier"
    kept = (f" (stopped before it completes, the run keeps this one in {Path(target).parent / REPLACED_DIRNAME / name})"
            if run_record(target).get("status") == "completed" else "")
    return (f"adapter {name!r} already exists ({done}, {target}); this run replaces it when it saves{kept}. "
            "Use another name to keep it, or --resume to continue it.")


REPLACED_DIRNAME = ".replaced"  # in the adapters folder: a completed adapter an unfinished retrain replaced


def keep_replaced(target: Path) -> Optional[Path]:
    """Before a run that did not complete saves over ``target``: move a completed adapter there aside, to
    ``.replaced/NAME`` beside it (an earlier one kept there goes), and return where; None when there is none.
    A stopped retrain keeps what it learned under the name, and the finished adapter it replaced is not lost."""
    import os

    from .atomic import remove_dir

    target = Path(target)
    if run_record(target).get("status") != "completed" or not (target / "adapter_config.json").is_file():
        return None
    keep = target.parent / REPLACED_DIRNAME / target.name
    keep.parent.mkdir(exist_ok=True)
    if os.path.lexists(keep):
        remove_dir(keep)
    os.rename(target, keep)
    return keep


class AdapterRegistry:
    """Which adapters this session knows, in insertion order."""

    def __init__(self) -> None:
        self._items: dict[str, AdapterInfo] = {}
        self.active: Optional[str] = None  # None means the base model

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self):
        return iter(self._items.values())

    def __len__(self) -> int:
        return len(self._items)

    def names(self) -> list:
        return list(self._items)

    def add(self, info: AdapterInfo) -> None:
        self._items[info.name] = info

    def remove(self, name: str) -> AdapterInfo:
        return self._items.pop(self.require(name).name)

    def require(self, name: str, on_disk: list = (), folder: Optional[Path] = None) -> AdapterInfo:
        """The entry for ``name``, or "no adapter named ..." with a did-you-mean; ``on_disk``: the adapters in
        ``folder`` that are not loaded (they load by name), named too (after a restart every adapter is there)."""
        if name not in self._items:
            known = self.names()
            if name == BASE:  # it was "no adapter named 'base' (did you mean 'base'?)"
                raise FtUsageError(f"'{BASE}' is the base model itself, not an adapter: give an adapter's name"
                                   + (f" ({', '.join(known + list(on_disk))})." if known or on_disk else "."))
            if on_disk:
                hint = ((f" Loaded: {', '.join(known)}." if known else "")
                        + f" In {folder} (used by name, they load): {', '.join(on_disk)}.")
            else:
                hint = f" Known adapters: {', '.join(known)}." if known else " No adapters yet: train one with %%lora_train."
            others = [k for k in known + list(on_disk) + [BASE] if k != name]
            raise FtUsageError(f"no adapter named {name!r}{did_you_mean(name, others)}.{hint}")
        return self._items[name]


def lora_layers(model) -> Optional[list]:
    """The LoRA layers of a PEFT model, cached on the model until its set of adapters changes; None
    when it holds any other kind of PEFT layer (then only PEFT's own, slower, switching is safe).

    The cache key holds each adapter's config object itself (not only its id), so a config freed by a
    delete cannot hand its id to a new adapter of the same name and leave a stale layer list."""
    configs = getattr(model, "peft_config", None)
    if not configs:
        return None
    key = tuple((n, id(c)) for n, c in configs.items())
    cached = model.__dict__.get("_ft_lora_layers")
    if cached is not None and cached[0] == key:
        return cached[1]
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer

    named, foreign = {}, False
    for full, mod in model.named_modules():
        if isinstance(mod, LoraLayer):
            named[full] = mod
        elif isinstance(mod, BaseTunerLayer) or type(mod).__name__.endswith(("ModulesToSaveWrapper", "TrainableTokensWrapper")):
            foreign = True
    result = None if foreign else list(named.values())
    model.__dict__["_ft_lora_layers"] = (key, result, list(configs.values()), named)
    return result


def named_lora_layers(model) -> dict:
    """``{module name: LoRA layer}`` of a PEFT model (same cache as :func:`lora_layers`)."""
    lora_layers(model)
    cached = model.__dict__.get("_ft_lora_layers")
    return cached[3] if cached else {}


def activate(model, name: Optional[str]) -> float:
    """Make ``name`` the active adapter (None/'base' = none); return the swap time in milliseconds.

    Fast path: set each LoRA layer's active adapter and enabled flag directly, as PEFT's
    ``set_adapter`` / ``disable_adapter_layers`` do, without walking the module tree and every
    parameter's ``requires_grad`` on each swap (that walk is what costs PEFT tens of ms on a 135M
    model). Gradient flags only matter for training, which sets its own (core.training.attach_adapter).
    """
    t = time.perf_counter()
    if not (hasattr(model, "base_model") and hasattr(model, "peft_config")):
        return (time.perf_counter() - t) * 1000.0
    layers = lora_layers(model)
    if name in (None, BASE):
        if layers is None:
            model.base_model.disable_adapter_layers()
        else:
            for layer in layers:
                layer._disable_adapters = True
    elif layers is None or name not in model.peft_config:
        model.base_model.enable_adapter_layers()
        model.set_adapter(name, inference_mode=True)
    else:
        for layer in layers:
            layer._disable_adapters = False
            layer._active_adapter = [name]
        model.base_model.active_adapter = name  # what PeftModel.set_adapter records, on both objects
        model.active_adapter = name
    return (time.perf_counter() - t) * 1000.0


def drop_adapter(model, name: str):
    """Remove adapter ``name`` from PEFT ``model``; return the model to keep (the plain base model when it
    was the last one). PEFT needs another adapter active while it deletes one, and warns when it picks
    that other one itself; so it is picked here, and the caller re-activates what the user chose."""
    others = [n for n in model.peft_config if n != name]
    if not others:
        return model.unload()  # plain base model again, LoRA layers removed
    model.set_adapter(others[0], inference_mode=True)  # the wrapper's record too: it names the active one
    model.delete_adapter(name)
    return model


# --------------------------------------------------------------------------- fit check
_KEY_RE = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


def _base_of(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def adapter_fingerprint(path: Path) -> str:
    """A short hash of an adapter folder's weights: the same adapter wherever it was copied, renamed or
    re-exported. It hashes each tensor's name, shape and values rounded to bf16, not the file's bytes: a
    re-export of the adapter writes another header, and an older ft_magics exported bf16-rounded values
    (see :func:`load_exact`); both are still this adapter."""
    import hashlib

    import torch

    h = hashlib.sha256()
    with open_weights(Path(path) / "adapter_model.safetensors") as fh:
        for key in sorted(fh.keys()):
            t = fh.get_tensor(key)
            h.update(f"{key}{tuple(t.shape)}".encode())
            if t.is_floating_point():
                t = t.to(torch.bfloat16).view(torch.int16)
            h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def file_fingerprint(path: Path) -> str:
    """What :func:`adapter_fingerprint` was before it hashed values: the weights file's bytes (merged models
    exported then carry this one)."""
    import hashlib

    h = hashlib.sha256()
    with open(Path(path) / "adapter_model.safetensors", "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def unfit_error(path: Path, model_label: str, exc: BaseException) -> FtUsageError:
    """What PEFT's or torch's refusal to load the folder at ``path`` says, in one or two lines (torch lists every
    mismatched tensor: a thousand lines for one edited config)."""
    lines = [line.strip() for line in str(exc).strip().splitlines()] or [type(exc).__name__]
    more = f" (and {len(lines) - 2:,} more lines)" if len(lines) > 2 else ""
    return FtUsageError(f"adapter {path} does not fit the loaded model {model_label}: {' '.join(lines[:2])}{more}")


def load_folder(model, path: Path, name: str):
    """``model`` with the adapter in folder ``path`` loaded as ``name`` (a PeftModel: the same one if it was
    already), its weights exactly the file's. A load that fails or is interrupted part-way leaves ``model`` as
    it was (PEFT's layers are in the base's own modules: left there, the 'base' answered as the adapter)."""
    from peft import PeftModel

    # low_cpu_mem_usage: LoRA layers are created empty and filled from the file (a cold load several times
    # faster than initialising them first)
    wrapped = isinstance(model, PeftModel)
    try:
        if wrapped:
            model.load_adapter(str(path), adapter_name=name, low_cpu_mem_usage=True)
            load_exact(model, path, name)
            return model
        loaded = PeftModel.from_pretrained(model, str(path), adapter_name=name, low_cpu_mem_usage=True)
        load_exact(loaded, path, name)
        return loaded
    except BaseException:
        if not wrapped:
            strip_lora(model)
        elif name in model.peft_config:
            drop_adapter(model, name)
        raise


def _parents(model) -> dict:
    """``{id(module): (its parent, the attribute it is under)}`` for every submodule of ``model``: where to put a
    layer back in place of the LoRA layer that wraps it."""
    return {id(m): (parent, attr) for parent in model.modules() for attr, m in parent.named_children()}


def strip_lora(model):
    """The plain base of ``model`` (a PeftModel, or a base PEFT began to wrap when it was interrupted), every LoRA
    layer replaced by the layer it wraps and PEFT's record of adapters taken off: what is left of a wrap that
    failed part-way, made the bare base again."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    where = _parents(base)
    for mod in [m for m in base.modules() if hasattr(m, "base_layer") and hasattr(m, "lora_A")]:
        if id(mod) in where:
            parent, attr = where[id(mod)]
            setattr(parent, attr, mod.get_base_layer())
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        base.__dict__.pop(attr, None)
    return base


def load_exact(model, path: Path, name: str) -> None:
    """Put the weights file's own values into adapter ``name``'s parameters.

    PEFT 0.21's ``load_adapter(..., low_cpu_mem_usage=True)`` (the fast cold load) on a 4-bit base with bf16
    compute creates the LoRA weights in bf16 and only then upcasts them to fp32: every value comes back rounded
    to bf16 (up to 6e-5 off on the demo model), and an export of the loaded adapter wrote those rounded values.
    Copying the file's tensors over them (the parameters are fp32 by then) keeps the fast load and the exact
    weights."""
    from peft.utils import set_peft_model_state_dict
    from peft.utils.save_and_load import load_peft_weights

    result = set_peft_model_state_dict(model, load_peft_weights(str(path), device="cpu"), adapter_name=name)
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:  # the fast load took these; a second pass that cannot is a PEFT change to look at
        log.warning("exact reload of adapter %s skipped %d tensors (%s...)", name, len(unexpected), unexpected[0])


MERGED_KEY = "ft_magics_merged"  # in an exported merged model's config.json: the adapters merged into it


def merged_into(folder: Path) -> Optional[list]:
    """The adapters an exported merged model in ``folder`` lists (``MERGED_KEY`` of its config.json); None where
    the folder holds no such model (no config.json, an unreadable one, or one without the key)."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config.get(MERGED_KEY) if isinstance(config, dict) and MERGED_KEY in config else None


def check_not_merged_in(model, path: Path, model_label: str) -> None:
    """Refuse an adapter that an exported merged model (``export NAME DIR --merged``) already holds:
    applied again, its update would count twice, and nothing would look wrong."""
    merged = getattr(getattr(_base_of(model), "config", None), MERGED_KEY, None)
    if not merged:
        return
    marks = {adapter_fingerprint(path), file_fingerprint(path)}  # the second: merged by an older ft_magics
    for entry in merged:
        if isinstance(entry, dict) and entry.get("fingerprint") in marks:
            raise FtUsageError(
                f"the adapter in {path} ({entry.get('name', Path(path).name)!r}, by its weights) is already merged "
                f"into the loaded model ({model_label}, exported with %lora_adapters export "
                f"{entry.get('name', Path(path).name)} DIR --merged): applying it again "
                "would add its update twice. Use the model as it is (--adapter base), or load the base model it was "
                f"trained on ({entry.get('base', 'its base')}) to use the adapter."
            )


def rank_contradiction(path: Path, r: int, rank: int, layer: str) -> str:
    """What is wrong with a folder whose config's ``r`` is not its weights' ``rank``, and the fix."""
    return (f"adapter {path}: its adapter_config.json says r={r}, but its weights have rank {rank} (layer {layer}), "
            f"so they cannot be loaded as written. The config was edited or belongs to other weights: put \"r\": "
            f"{rank} back in adapter_config.json, or copy the adapter's folder again whole.")


def first_weight_rank(path: Path) -> Optional[tuple]:
    """``(rank, layer)`` of the first LoRA A matrix in the folder's weights (read from the safetensors header), or
    None where there is none to read."""
    try:
        with open_weights(Path(path) / "adapter_model.safetensors") as fh:
            for key in fh.keys():
                m = _KEY_RE.match(key)
                shape = list(fh.get_slice(key).get_shape()) if m and m.group("ab") == "A" else []
                if len(shape) == 2:
                    return shape[0], m.group("module")
    except (OSError, FtUsageError):
        return None
    return None


def check_fits(model, path: Path, config: dict, model_label: str) -> None:
    """Refuse an adapter whose target modules or layer shapes do not exist in ``model``; name which;
    and one the model already has merged into it (see :func:`check_not_merged_in`).

    Checked from the adapter files alone (shapes are read from the safetensors header), before PEFT
    touches the model, so a refused adapter leaves the session exactly as it was.
    """
    check_not_merged_in(model, path, model_label)
    trained_for = config.get("base_model_name_or_path") or "an unnamed base model"
    modules = dict(_base_of(model).named_modules())
    leaves = {n.rsplit(".", 1)[-1] for n in modules}
    targets = config.get("target_modules")
    if isinstance(targets, list):
        # PEFT matches a target by leaf name or by full-path suffix ("all-linear" is saved as full paths)
        missing = sorted(t for t in targets
                         if t not in leaves and not any(n == t or n.endswith("." + t) for n in modules))
        if missing:
            raise FtUsageError(
                f"adapter {path} targets module(s) {', '.join(missing)} that the loaded model ({model_label}) does "
                f"not have (it was trained on {trained_for}). Load it on the base model it was trained for."
            )
    with open_weights(Path(path) / "adapter_model.safetensors") as fh:
        for key in fh.keys():
            m = _KEY_RE.match(key)
            if not m:
                continue
            mod_name = m.group("module")
            mod = modules.get(mod_name)
            if mod is None:
                raise FtUsageError(
                    f"adapter {path} has weights for layer {mod_name}, which the loaded model ({model_label}) does "
                    f"not have: the adapter was trained on {trained_for}, a different base model."
                )
            shape = list(fh.get_slice(key).get_shape())
            if len(shape) == 2 and isinstance(config.get("r"), int) and not config.get("rank_pattern"):
                rank = shape[0] if m.group("ab") == "A" else shape[1]  # A is r x in, B is out x r
                if rank != config["r"]:  # an edited config, or a folder's files from two adapters
                    raise FtUsageError(rank_contradiction(path, config["r"], rank, mod_name))
            fan_in, fan_out = getattr(mod, "in_features", None), getattr(mod, "out_features", None)
            if fan_in is None or fan_out is None or len(shape) != 2:
                continue
            got = shape[1] if m.group("ab") == "A" else shape[0]
            want = fan_in if m.group("ab") == "A" else fan_out
            if got != want:
                raise FtUsageError(
                    f"adapter {path} does not fit the loaded model ({model_label}): layer {mod_name} is "
                    f"{fan_in}->{fan_out} here but the adapter expects "
                    f"{'input' if m.group('ab') == 'A' else 'output'} size {got}; it was trained on {trained_for}."
                )


def is_quantized(model) -> bool:
    base = _base_of(model)
    return bool(getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False)
                or getattr(getattr(base, "config", None), "quantization_config", None))


# --------------------------------------------------------------------------- merge / unmerge
@dataclass
class MergeState:
    """An adapter folded into the base weights, with the original weights kept for an exact unmerge."""

    name: str
    saved: list  # [(lora layer, original weight tensor, original bias tensor or None)]
    ms: float = 0.0
    unwrapped: list = field(default_factory=list)  # [(parent module, attribute, lora layer)]


def _lora_layers(model, name: str):
    from peft.tuners.lora import LoraLayer

    for mod in model.modules():
        if isinstance(mod, LoraLayer) and (name in mod.lora_A or name in getattr(mod, "lora_embedding_A", {})):
            yield mod


def merge(model, name: str) -> MergeState:
    """Fold adapter ``name`` into the base weights (full-speed inference, no LoRA matmuls).

    PEFT's own unmerge subtracts the update again, which is not exact in floating point; we leave the
    original tensors untouched and merge into copies, so :func:`unmerge` puts the very same tensors
    back, bit for bit. A 4/8-bit base is refused: its weights would be dequantised, changed and
    requantised, and no exact unmerge exists. ``export NAME DIR --merged`` covers that case by merging into a full-precision copy.
    """
    if is_quantized(model):
        raise FtUsageError(
            "merge needs a 16- or 32-bit base: this base is quantised (bitsandbytes), so merging would "
            "dequantise, add and requantise every layer and unmerge could not restore it exactly. "
            "Either load the model with %qlora_load --bits 16, or write a merged full-precision copy with "
            "%lora_adapters export NAME DIR --merged (it rebuilds the base from its source)."
        )
    t = time.perf_counter()
    saved, unwrapped = [], []
    try:  # all or nothing: a merge stopped part-way (an interrupt) puts every layer back as it was
        for mod in _lora_layers(model, name):
            # The merge writes into a fresh copy; the original tensors are kept as they are, untouched. Merging
            # in place instead would turn a weight that is still a view into the mmapped weights file into
            # copy-on-write pages, scattered: generation ran 4% slower than the bare base (interleaved runs).
            base = mod.get_base_layer()
            bias = getattr(base, "bias", None)
            saved.append((mod, base.weight.data, None if bias is None else bias.data))
            base.weight.data = base.weight.data.clone()
            if bias is not None:
                base.bias.data = bias.data.clone()
        model.base_model.enable_adapter_layers()
        model.base_model.merge_adapter([name])
        # A merged LoRA layer still sits between its parent and the base layer and costs a Python call per
        # layer per token (about 10% of generation speed on the demo model): take it out while merged.
        where = _parents(model)
        for mod, _, _ in saved:
            parent, attr = where[id(mod)]
            setattr(parent, attr, mod.get_base_layer())
            unwrapped.append((parent, attr, mod))
    except BaseException:
        unmerge(MergeState(name=name, saved=saved, ms=0.0, unwrapped=unwrapped))
        raise
    return MergeState(name=name, saved=saved, ms=(time.perf_counter() - t) * 1000.0, unwrapped=unwrapped)


def unmerge(state: MergeState) -> float:
    """Put back the exact base weights saved by :func:`merge`; return the time in ms."""
    t = time.perf_counter()
    for parent, attr, mod in state.unwrapped:
        setattr(parent, attr, mod)
    for mod, weight, bias in state.saved:
        base = mod.get_base_layer()
        base.weight.data = weight
        if bias is not None:
            base.bias.data = bias
        mod.merged_adapters = []
    return (time.perf_counter() - t) * 1000.0


# --------------------------------------------------------------------------- combine
COMBINE_METHODS = ("linear", "cat", "svd", "ties")


def parse_weights(spec) -> dict:
    """``"a:0.7,b:0.3"`` (or ``a=0.7,b=0.3``, or the dict ``{"a": 0.7, "b": 0.3}``) -> ``{"a": 0.7, "b": 0.3}``,
    every weight a finite number."""
    pairs = []
    if isinstance(spec, dict):
        pairs = [(str(k), v) for k, v in spec.items()]
    else:
        for part in (spec or "").split(","):
            if part.strip():
                name, sep, w = re.match(r"([^:=]*)([:=]?)(.*)", part.strip()).groups()
                pairs.append((name.strip(), w.strip() if sep else 1.0))
    out: dict = {}
    for name, w in pairs:
        try:
            weight = float(w)
        except (TypeError, ValueError):
            raise FtUsageError(f"weight {w!r} for adapter {name!r} is not a number; write e.g. a:0.7,b:0.3.") from None
        if not math.isfinite(weight):  # nan, inf, 1e400: every combined weight would be nan or inf
            raise FtUsageError(f"weight {w!r} for adapter {name!r} is not a finite number; write e.g. a:0.7,b:0.3.")
        if name in out:
            raise FtUsageError(f"adapter {name!r} is named twice in {spec!r}; give each adapter once, with its weight.")
        out[name] = weight
    if not out:
        raise FtUsageError("combine needs adapters and weights, e.g. %lora_adapters combine a:0.7,b:0.3 --name mix")
    if not any(out.values()):  # the combination would change nothing: an adapter identical to the base
        raise FtUsageError(f"every weight in {spec!r} is 0, so the combined adapter would do nothing; give at least "
                           "one adapter a weight, e.g. a:0.7,b:0.3.")
    return out


def uses_dora(model, name: str) -> bool:
    """Whether PEFT adapter ``name`` of ``model`` is a DoRA adapter (``use_dora``)."""
    return bool(getattr(getattr(model, "peft_config", {}).get(name), "use_dora", False))


def combine(model, weights: dict, new_name: str, method: str = "linear") -> None:
    """Add adapter ``new_name`` = weighted combination of loaded adapters (PEFT add_weighted_adapter)."""
    from ..errors import unknown

    if method not in COMBINE_METHODS:
        raise unknown("combine method", method, COMBINE_METHODS)
    dora = [n for n in weights if uses_dora(model, n)]
    if dora:
        raise FtUsageError(
            f"cannot combine {', '.join(dora)}: DoRA adapters (use_dora) do not combine. PEFT's weighted combination "
            "mixes the LoRA matrices but not DoRA's learned magnitudes, so the result would be neither adapter. "
            "Switch between them per request instead, or train one adapter on both datasets.")
    kw = {"density": 0.5} if method == "ties" else {}
    # PEFT folds each adapter's own scaling (alpha/r, or alpha/sqrt(r) for rsLoRA) into the combined matrices and
    # gives the result lora_alpha = r, meaning a scaling of 1; but it copies the first adapter's config, and with
    # use_rslora from it the result is scaled by sqrt(r) again (measured: cat of an rsLoRA adapter at weight 1
    # scored 5.3753 against its source's 5.3503). The first config is plain LoRA while PEFT copies it.
    first = model.peft_config.get(next(iter(weights)))
    rslora = bool(getattr(first, "use_rslora", False))
    if rslora:
        first.use_rslora = False
    try:
        model.add_weighted_adapter(list(weights), list(weights.values()), new_name, combination_type=method, **kw)
    except (ValueError, TypeError) as exc:
        hint = " Adapters of different rank combine with --method cat or svd." if "same r" in str(exc) else ""
        said = str(exc).rstrip(". ")  # PEFT's own message may end in a period
        raise FtUsageError(f"cannot combine {', '.join(weights)} with --method {method}: {said}.{hint}") from None
    finally:
        if rslora:
            first.use_rslora = True


# --------------------------------------------------------------------------- export
def save_peft_adapter(model, name: str, target: Path, record: Optional[dict] = None,
                      files: Optional[dict] = None) -> Path:
    """Write adapter ``name`` in PEFT's own format (plus an ft_run.json record, and ``files``: ``{name:
    text}``) atomically to ``target``."""
    import os
    import shutil

    from .atomic import atomic_dir

    with atomic_dir(target) as tmp:
        scratch = tmp / "_peft"
        model.save_pretrained(str(scratch), selected_adapters=[name])
        src = scratch / name if (scratch / name).is_dir() else scratch
        for f in src.iterdir():
            os.replace(f, tmp / f.name)
        shutil.rmtree(scratch, ignore_errors=True)
        if record is not None:
            (tmp / "ft_run.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
        for file_name, text in (files or {}).items():
            (tmp / file_name).write_text(text, encoding="utf-8")
    return Path(target)


def export_merged(source: str, adapter_dir: Path, tokenizer, target: Path, dtype=None,
                  name: Optional[str] = None, base_label: Optional[str] = None) -> Path:
    """Write a standalone model (base + adapter merged; safetensors + tokenizer) that plain transformers loads.

    The base is rebuilt from ``source`` in full precision rather than dequantised from the session's
    (possibly 4-bit) copy: this is the documented dequantise-and-merge path for a QLoRA base, and it
    leaves the session's model untouched.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from .atomic import atomic_dir
    from .loading import NO_HUB_KERNELS

    dtype = dtype or torch.float32
    base = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, use_safetensors=True, **NO_HUB_KERNELS)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    # which adapters this model holds (a base that was itself a merged export keeps its own list)
    setattr(merged.config, MERGED_KEY, list(getattr(base.config, MERGED_KEY, None) or []) + [{
        "name": name or Path(adapter_dir).name, "fingerprint": adapter_fingerprint(adapter_dir),
        "base": base_label or str(source)}])
    with atomic_dir(target) as tmp:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
    del merged, base
    return Path(target)
