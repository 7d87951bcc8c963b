"""Generation: chat-templated prompts, streamed text, timing."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

from ..errors import FtUsageError


@dataclass
class Generation:
    text: str
    adapter: str  # adapter name or "base"
    new_tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


def build_prompt(tokenizer, prompt: str, system: Optional[str] = None) -> str:
    """The text the model sees: the chat template where the tokenizer has one, else the plain prompt."""
    if getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return (system + "\n\n" if system else "") + prompt + "\n"


def _streamer(tokenizer, on_text: Callable[[str], None]):
    from transformers import TextStreamer

    class CallbackStreamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False):
            if text:
                on_text(text)

    return CallbackStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def generate(model, tokenizer, prompt: str, *, system: Optional[str] = None, max_new_tokens: int = 128,
             temperature: float = 0.0, top_p: float = 1.0, on_text: Optional[Callable[[str], None]] = None,
             adapter_label: str = "base", seed: Optional[int] = None) -> Generation:
    import torch

    if not prompt or not prompt.strip():
        raise FtUsageError("the prompt is empty: put the user message in the cell body.")
    if max_new_tokens < 1:
        raise FtUsageError(f"--max-new-tokens must be at least 1 (got {max_new_tokens}).")
    if temperature < 0:
        raise FtUsageError(f"--temperature must be >= 0 (got {temperature}); 0 means greedy.")
    if not 0 < top_p <= 1:
        raise FtUsageError(f"--top-p must be in (0, 1] (got {top_p}).")
    text = build_prompt(tokenizer, prompt, system)
    device = next(model.parameters()).device
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=not getattr(tokenizer, "chat_template", None))
    enc = {k: v.to(device) for k, v in enc.items()}
    kw = dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    if temperature > 0:
        kw.update(do_sample=True, temperature=temperature, top_p=top_p)
        if seed is not None:
            torch.manual_seed(seed)
    else:
        kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if on_text is not None:
        kw["streamer"] = _streamer(tokenizer, on_text)
    was_training = model.training
    model.eval()
    t = time.perf_counter()
    with torch.no_grad():  # not inference_mode: bnb repacks weights in here, and they must stay trainable
        out = model.generate(**enc, **kw)
    seconds = time.perf_counter() - t
    if was_training:
        model.train()
    new = out[0][enc["input_ids"].shape[1]:]
    return Generation(
        text=tokenizer.decode(new, skip_special_tokens=True).strip(), adapter=adapter_label,
        new_tokens=int(new.numel()), seconds=seconds,
    )
