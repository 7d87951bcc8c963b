"""The adapter registry: names, where each adapter lives, and switching between them on one base.

Adapters stay in PEFT's own format (adapter_config.json + adapter_model.safetensors) so plain
``peft``, vLLM or LoRAX load them unchanged.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..errors import FtUsageError, did_you_mean
from .atomic import COMPLETE_MARKER

BASE = "base"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def validate_name(name: str) -> str:
    """An adapter name is also a folder name: no separators, no '..', no hidden names, not 'base'."""
    name = (name or "").strip()
    if not name:
        raise FtUsageError("an adapter name is required, e.g. %%lora_train support-bot --data ...")
    if name == BASE:
        raise FtUsageError("'base' is reserved for the base model without adapters; choose another name.")
    if "/" in name or "\\" in name or ".." in name or name.startswith(".") or not _NAME_RE.match(name):
        raise FtUsageError(
            f"adapter name {name!r} is not allowed: use letters, digits, '-', '_' or '.', start with a letter "
            "or digit, at most 64 characters, no path separators or '..'."
        )
    return name


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

    def size_on_disk(self) -> int:
        if not self.path or not Path(self.path).exists():
            return 0
        return sum(f.stat().st_size for f in Path(self.path).rglob("*") if f.is_file())


def read_adapter_folder(path: Path) -> dict:
    """Check that ``path`` holds a complete PEFT LoRA adapter; return its config. Says what is wrong."""
    path = Path(path)
    if not path.is_dir():
        raise FtUsageError(f"adapter folder {path} does not exist.")
    cfg_file = path / "adapter_config.json"
    if not cfg_file.exists():
        partial = any(path.parent.glob(f".{path.name}.tmp-*"))
        raise FtUsageError(
            f"{path} holds no adapter_config.json, so it is not a PEFT adapter folder"
            + (" (an interrupted save left only a temporary folder beside it)" if partial else "") + "."
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
    try:
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as fh:
            list(fh.keys())
    except Exception as exc:  # noqa: BLE001 - any parse failure is a corrupt file
        raise FtUsageError(f"{weights} is corrupt or truncated ({type(exc).__name__}: {exc}).") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise FtUsageError(f"{path} is a {config.get('peft_type')} adapter; only LoRA adapters are supported.")
    return config


def info_from_folder(name: str, path: Path, origin: str) -> AdapterInfo:
    config = read_adapter_folder(path)
    record = {}
    rec_file = Path(path) / "ft_run.json"
    if rec_file.exists():
        try:
            record = json.loads(rec_file.read_text())
        except json.JSONDecodeError:
            record = {}
    tm = config.get("target_modules")
    return AdapterInfo(
        name=name, path=str(path), loaded=True, origin=origin, r=config.get("r"), alpha=config.get("lora_alpha"),
        target_modules=sorted(tm) if isinstance(tm, list) else tm, steps=record.get("steps"),
        final_loss=record.get("final_loss"), extra={"complete_marker": (Path(path) / COMPLETE_MARKER).exists()},
    )


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

    def require(self, name: str) -> AdapterInfo:
        if name not in self._items:
            known = self.names()
            hint = f" Known adapters: {', '.join(known)}." if known else " No adapters yet: train one with %%lora_train."
            raise FtUsageError(f"no adapter named {name!r}{did_you_mean(name, known + [BASE])}.{hint}")
        return self._items[name]


def activate(model, name: Optional[str]) -> float:
    """Make ``name`` the active adapter (None/'base' = none); return the swap time in milliseconds."""
    t = time.perf_counter()
    if name in (None, BASE):
        if hasattr(model, "base_model") and hasattr(model, "peft_config"):
            model.base_model.disable_adapter_layers()
    else:
        model.base_model.enable_adapter_layers()
        model.set_adapter(name, inference_mode=True)
    return (time.perf_counter() - t) * 1000.0
