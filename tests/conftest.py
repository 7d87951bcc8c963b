"""Shared fixtures: a tiny random Llama with a real chat-template tokenizer, built in the test run,
and (for tests marked slow) the embedded demo model."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "How do I reset my password? Click forgot password on the sign-in page.",
    "Category: account\nAnswer: Use the reset link we email you.",
    "The quick brown fox jumps over the lazy dog. Billing, shipping, technical support.",
    "user assistant system tool: hello world, thanks! 0123456789",
] * 20


def build_tiny_tokenizer(chat_template: bool = True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    if chat_template:
        fast.chat_template = CHATML
    return fast


def build_tiny_model_dir(path: Path, chat_template: bool = True, seed: int = 0, hidden: int = 64) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tiny_tokenizer(chat_template)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(cfg)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama (2 layers, hidden 64) with a ChatML tokenizer, saved as safetensors."""
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_plain_model_dir(tmp_path_factory) -> Path:
    """The same tiny Llama, but its tokenizer has no chat template (plain prompt+answer rendering)."""
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-plain") / "tiny-plain", chat_template=False)


@pytest.fixture
def tiny_session(tiny_model_dir, tmp_path):
    """A Session with the tiny model loaded in 32-bit, adapters saved under tmp_path."""
    from ft_magics import Session

    s = Session(adapters_dir=tmp_path / "adapters")
    s.load(str(tiny_model_dir), bits=32)
    return s


@pytest.fixture(scope="session", autouse=True)
def _isolated_home(tmp_path_factory):
    """Keep the demo-model cache shared across runs (conversion is slow) but everything else in tmp."""
    os.environ.setdefault("FT_MAGICS_HOME", str(Path.home() / ".cache" / "ft_magics"))
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    yield


@pytest.fixture
def shell(tmp_path, monkeypatch):
    """A real IPython InteractiveShell with the extension loaded, working in tmp_path."""
    from IPython.core.interactiveshell import InteractiveShell

    monkeypatch.chdir(tmp_path)
    sh = InteractiveShell.instance()
    sh.run_line_magic("load_ext", "ft_magics")
    yield sh
    sh.run_line_magic("unload_ext", "ft_magics")
    sh.user_ns.pop("_ft_test", None)


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none visible to torch)")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


def pause_at_first_step():
    """A listener that holds a (background) run at its first step boundary until ``listener.release`` is set;
    ``listener.in_step`` is set once it is held there."""
    import threading

    from ft_magics.core.events import Listener

    class PauseAtFirstStep(Listener):
        def __init__(self):
            self.in_step, self.release = threading.Event(), threading.Event()

        def on_step(self, event):
            if not self.in_step.is_set():
                self.in_step.set()
                self.release.wait(30)

    return PauseAtFirstStep()
