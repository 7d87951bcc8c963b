"""ft_magics vs the standard QLoRA recipe, side by side, on the demo model.

    .venv/bin/python benchmarks/bench_training.py          # short default run (~10 min on 2 cores)
    BENCH_STEPS=60 .venv/bin/python benchmarks/bench_training.py   # longer, steadier figures

Reference: the recipe a user writes from the transformers / PEFT docs - BitsAndBytesConfig(4-bit NF4,
double quantisation, bf16 compute), prepare_model_for_kbit_training (its defaults: fp32 upcast of the
non-quantised weights, gradient checkpointing on), LoraConfig(r=16, lora_alpha=32,
target_modules="all-linear", PEFT's other defaults: no dropout), transformers.Trainer (TRL is not installed here) with batch 8, bf16 where supported,
random batches, DataCollatorForSeq2Seq padding to the longest row.
ft_magics: `%qlora_load` + `%%lora_train` in a real IPython InteractiveShell, dashboard view on.

Both sides train on the very same token sequences and loss masks (tokenised once by ft_magics' data
pipeline, so only the training recipe differs), the same number of optimizer steps, the same optimizer
settings (AdamW 2e-4, cosine, 3% warm-up). Each side runs in its own subprocess so its peak RSS is its own.

Measured in each subprocess: loss-bearing tokens/s over the training loop, peak RSS (ru_maxrss, whole
process), wall time of the "training cell" (tokenise + attach + train + eval + save), final train loss
(mean of the last 3 logged steps) and eval loss, and the bf16 matmul peak measured in the same process
(before and after the job; the higher of the two is the limit);
the achieved rate counts useful FLOPs only (non-pad tokens; see ``useful_flops``), and beside it the rate
counting the layers' forward pass again where gradient checkpointing recomputes it (``recomputed_flops``):
the first is the model's FLOP utilisation, the second the hardware's.
Results: benchmarks/results/bench_training.{json,md,png}.

CUDA mode (``BENCH_DEVICE=cuda``, or ``auto``, the default, on a machine where torch sees a GPU): both sides
train on the GPU (the reference with ``device_map={"": 0}``, ft_magics through ``%qlora_load --device cuda``),
peak memory is the peak allocated VRAM (``torch.cuda.max_memory_allocated``), the matmul peak is an
8192-cube bf16 product, and results go to benchmarks/results/bench_training_cuda.{json,md,png}.
``BENCH_MODEL=FOLDER`` trains another model folder instead of the embedded demo model (both sides).
``BENCH_ASSEMBLE=1`` runs nothing and reports the raw-*.json files there (a run cut short; results fetched back).
"""
from __future__ import annotations

import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
STEPS = int(os.environ.get("BENCH_STEPS", "20"))  # 20 steps of 8: two thirds of an epoch of the bundled set
BATCH = 8
MAX_LEN = 512
LR = 2e-4
SEED = 42


def bench_device() -> str:
    """``cpu`` or ``cuda``: BENCH_DEVICE (cpu / cuda / auto, the default: cuda where torch sees a GPU)."""
    want = os.environ.get("BENCH_DEVICE", "auto").strip().lower()
    if want not in ("auto", "cpu", "cuda"):
        raise SystemExit(f"BENCH_DEVICE={want!r}: use cpu, cuda or auto")
    if want == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return want


def results_suffix(device: str) -> str:
    return "" if device == "cpu" else f"_{device}"  # CPU and GPU results side by side


# --------------------------------------------------------------------------- data
def varlen_dataset(folder: Path, n_train: int = 160, n_eval: int = 0, seed: int = 0) -> tuple[Path, Path]:
    """Chat rows whose lengths vary widely (about 20 to 500 tokens): where padding waste shows."""
    rng = random.Random(seed)
    words = ("order account refund shipping password invoice blender warranty battery screen update app "
             "delivery address payment card subscription cancel device charger manual setting reset email "
             "support ticket store return exchange discount coupon tracking package").split()
    cats = ["billing", "shipping", "technical", "account"]

    def sentence(n):
        return " ".join(rng.choice(words) for _ in range(n)).capitalize() + "."

    def row():
        q_words = int(rng.choice([rng.uniform(3, 12), rng.uniform(20, 80), rng.uniform(120, 300)]))
        a_words = int(rng.choice([rng.uniform(3, 10), rng.uniform(15, 50), rng.uniform(60, 120)]))
        q = " ".join(sentence(min(12, q_words)) for _ in range(max(1, q_words // 12)))
        a = f"Category: {rng.choice(cats)}\nAnswer: " + " ".join(sentence(min(10, a_words)) for _ in range(max(1, a_words // 10)))
        return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, n in (("varlen.jsonl", n_train), ("varlen-eval.jsonl", n_eval or EVAL_ROWS)):
        p = folder / name
        p.write_text("".join(json.dumps(row()) + "\n" for _ in range(n)))
        paths.append(p)
    return paths[0], paths[1]


EVAL_ROWS = int(os.environ.get("BENCH_EVAL_ROWS", "32"))
# the ft_magics variants: (side name, extra YAML for the %%lora_train body)
FT_SIDES = [("ft_magics", ""), ("ft_magics+ckpt", "gradient_checkpointing: true")]


def datasets() -> dict:
    data_dir = ROOT / "ft_magics" / "data"
    vl_train, vl_eval = varlen_dataset(RESULTS / "data")
    support_eval = RESULTS / "data" / "support-eval.jsonl"  # the first EVAL_ROWS rows: a shorter eval
    support_eval.write_text("".join((data_dir / "support-eval.jsonl").read_text().splitlines(True)[:EVAL_ROWS]))
    return {
        "support": (str(data_dir / "support.jsonl"), str(support_eval)),
        "varlen": (str(vl_train), str(vl_eval)),
    }


# --------------------------------------------------------------------------- measurement helpers
def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def matmul_peak_gflops(dtype_name: str, n: int = 1024, reps: int = 6, device: str = "cpu") -> float:
    """Best of three timings of an n x n matmul in ``dtype_name`` on ``device``: the limit for this run.

    On CUDA the timings wait for the GPU (synchronize) before and after each batch of products."""
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
    sync = synchronizer(device)
    a @ b
    sync()
    best = 0.0
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync()
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t) / 1e9)
    return best


def device_matmul_peak(device: str) -> float:
    """The bf16 matmul peak of ``device``: an 8192-cube product on CUDA, a 1024-cube one on the CPU."""
    if device.startswith("cuda"):
        return matmul_peak_gflops("bfloat16", n=8192, reps=10, device=device)
    return matmul_peak_gflops("bfloat16")


def peak_memory(device: str, rss_libraries: int) -> dict:
    """The peak memory figures of this process: on the CPU, RSS (whole process) and job = RSS less what the
    libraries alone take; on CUDA, the issue's figure is the peak allocated VRAM, which holds no libraries."""
    out = dict(peak_rss_bytes=peak_rss_bytes(), memory_kind="process RSS")
    out["job_peak_bytes"] = out["peak_rss_bytes"] - rss_libraries
    out["peak_memory_bytes"] = out["peak_rss_bytes"]
    if device.startswith("cuda"):
        import torch

        out.update(memory_kind="peak allocated VRAM", peak_memory_bytes=torch.cuda.max_memory_allocated(),
                   peak_reserved_bytes=torch.cuda.max_memory_reserved())
        out["job_peak_bytes"] = out["peak_memory_bytes"]
    return out


def peak_bytes(run: dict) -> int:
    return run.get("peak_memory_bytes", run.get("peak_rss_bytes"))  # raw files of earlier runs: RSS only


def peak_label(run: dict) -> str:
    return "peak VRAM GB" if run.get("device", "cpu") != "cpu" else "peak RSS GB"


def synchronizer(device):
    """What waits for ``device`` to finish its queued work before a clock is read (nothing on the CPU)."""
    import torch

    return torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)


def useful_flops(dims: dict, stats: dict, lora_params: int) -> float:
    """FLOPs a QLoRA step needs, counting real (non-pad) tokens only.

    Frozen linear layers: 2N forward + 2N backward (gradient w.r.t. the input; none for the frozen weight).
    LoRA: 6 per parameter per token. Attention scores and values: 6 * L^2 * hidden per layer per row (causal
    half of 4 L^2 h forward, times 3 for the backward). Output head: 4 * vocab * hidden per loss-bearing token.
    """
    n_body = dims["body_linear_params"]
    h, layers, vocab = dims["hidden"], dims["layers"], dims["vocab"]
    return (stats["tokens"] * (4 * n_body + 6 * lora_params)
            + 6 * h * layers * stats["sq_len_sum"] + 4 * vocab * h * stats["loss_tokens"])


def recomputed_flops(dims: dict, stats: dict, lora_params: int) -> float:
    """FLOPs that gradient checkpointing adds: the decoder layers' forward pass once more in the backward
    (frozen linear layers 2N, LoRA 2 per parameter per token, attention the causal half of 4 L^2 h per layer);
    not useful work, but work the hardware did."""
    h, layers = dims["hidden"], dims["layers"]
    return (stats["tokens"] * (2 * dims["body_linear_params"] + 2 * lora_params)
            + 2 * h * layers * stats["sq_len_sum"])


def instrument_trainer(stats: dict) -> None:
    """Count tokens seen by training steps and time the training loop - the same on both sides."""
    import torch
    from transformers import Trainer

    orig_step, orig_train = Trainer.training_step, Trainer.train

    def training_step(self, model, inputs, *a, **kw):
        labels, mask, pos = inputs["labels"], inputs.get("attention_mask"), inputs.get("position_ids")
        stats["loss_tokens"] += int((labels[:, 1:] != -100).sum())
        if pos is not None:  # examples joined in a row (padding-free, packing): each example's own length
            starts = (pos.reshape(-1) == 0).nonzero()[:, 0]
            lens = torch.diff(starts, append=starts.new_tensor([pos.numel()]))
        else:
            lens = mask.sum(1) if mask is not None else labels.new_full((labels.shape[0],), labels.shape[1])
        stats["tokens"] += int(lens.sum())
        stats["sq_len_sum"] += int((lens.double() ** 2).sum())
        stats["padded_tokens"] += int(labels.numel())
        out = orig_step(self, model, inputs, *a, **kw)
        stats["step_seconds"].append(time.perf_counter() - stats["train_started"])  # for the loss-vs-time plot
        return out

    def train(self, *a, **kw):
        stats["rss_before_train"] = peak_rss_bytes()
        sampler = None
        if os.environ.get("BENCH_SAMPLE") == "1":  # where the slow steps spend their time (stack_sampler.py)
            sys.path.insert(0, str(ROOT / "benchmarks"))
            from stack_sampler import StackSampler

            sampler = StackSampler().start()
        t = stats["train_started"] = time.perf_counter()
        try:
            return orig_train(self, *a, **kw)
        finally:
            stats["train_seconds"] += time.perf_counter() - t
            if sampler is not None:
                sampler.stop()
                try:
                    stats["sampled"] = sampler.report([t + s for s in stats["step_seconds"]])
                except Exception as exc:  # noqa: BLE001 - a diagnostic must not fail the side it watches
                    stats["sampled"] = {"error": repr(exc)}

    Trainer.training_step, Trainer.train = training_step, train


def _tokenised(train_path: str, eval_path: str, tokenizer):
    from ft_magics.config import TrainConfig
    from ft_magics.core.data import prepare

    cfg = TrainConfig.from_dict({"max_seq_len": MAX_LEN})
    tr, ev, _ = prepare(train_path, tokenizer, cfg, eval_src=eval_path)
    return [e.features() for e in tr], [e.features() for e in ev]


def token_weighted_eval_loss(trainer) -> float:
    """The eval set's loss over all its loss-bearing tokens / their number, each batch scored by the Trainer's
    own evaluation step: the eval loss ft_magics reports (a run's and ``%lora_eval``'s). ``Trainer.evaluate``
    averages the batches' means instead, which on the varying-length set weighs a batch of short answers as
    much as one of long ones."""
    trainer.model.eval()
    total, count = 0.0, 0
    for batch in trainer.get_eval_dataloader():
        n = int((batch["labels"][:, 1:] != -100).sum())
        loss, _, _ = trainer.prediction_step(trainer.model, batch, prediction_loss_only=True)
        if n:
            total, count = total + float(loss) * n, count + n
    return total / count


def model_arg() -> str:
    return os.environ.get("BENCH_MODEL") or "demo"


def demo_model_path() -> str:
    from ft_magics.core.loading import resolve_source

    return resolve_source(model_arg())[1]


# --------------------------------------------------------------------------- the two sides
def run_reference(train_path: str, eval_path: str, steps: int, stats: dict, device: str = "cpu") -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, DataCollatorForSeq2Seq,
                              Trainer, TrainingArguments)

    path = demo_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    on_gpu = device.startswith("cuda")
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb,
                                                 device_map={"": 0 if on_gpu else "cpu"})
    t_cell = time.perf_counter()
    train, evals = _tokenised(train_path, eval_path, tokenizer)
    model = prepare_model_for_kbit_training(model)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=BATCH, per_device_eval_batch_size=BATCH, max_steps=steps,
            learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=0.03, logging_steps=1, bf16=True,
            use_cpu=not on_gpu, report_to="none", save_strategy="no", seed=SEED, disable_tqdm=True,
        )
        trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(train),
                          eval_dataset=Dataset.from_list(evals),
                          data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
        trainer.train()
        eval_loss = token_weighted_eval_loss(trainer)  # measured as ft_magics' side measures it
        model.save_pretrained(out + "/adapter")
    cell = time.perf_counter() - t_cell
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return dict(losses=losses, eval_loss=float(eval_loss), cell_seconds=cell, lora_params=lora,
                view="n/a", gradient_checkpointing=bool(args.gradient_checkpointing
                                                        or model.base_model.model.is_gradient_checkpointing))


def run_ftmagics(train_path: str, eval_path: str, steps: int, stats: dict, device: str = "cpu") -> dict:
    from IPython.core.interactiveshell import InteractiveShell

    sh = InteractiveShell.instance()
    sh.run_line_magic("load_ext", "ft_magics")
    view = "text (default view: no widget frontend in a plain InteractiveShell)"
    if (ROOT / "ft_magics" / "widgets" / "dashboard.py").exists():
        sh.kernel = object()  # make the extension build its widget dashboard, as in Jupyter
        view = "dashboard (ft_magics.widgets.dashboard, no frontend attached)"
    with tempfile.TemporaryDirectory() as work:
        os.chdir(work)
        sh.run_line_magic("qlora_load", f"{model_arg()} --device {device}")
        body = (f"r: 16\nalpha: 32\ndropout: 0.0\ntarget_modules: all-linear\nlearning_rate: {LR}\n"
                f"batch_size: {BATCH}\nmax_seq_len: {MAX_LEN}\nlr_scheduler: cosine\nwarmup: 0.03\nseed: {SEED}\n"
                + os.environ.get("BENCH_FT_BODY", "").replace("\\n", "\n"))
        t_cell = time.perf_counter()
        sh.run_cell_magic("lora_train", f"bench --data {train_path} --eval {eval_path} --max-steps {steps}", body)
        cell = time.perf_counter() - t_cell
        rec = json.loads((Path(work) / "adapters" / "bench" / "ft_run.json").read_text())
        os.chdir(ROOT)
    if rec["status"] != "completed":
        raise RuntimeError(f"ft_magics run ended {rec['status']}: {rec.get('error')}")
    return dict(losses=[l for _, l in rec["loss_history"]], eval_loss=rec["eval_loss"], cell_seconds=cell,
                lora_params=rec["trainable_params"], view=view, settings=rec["settings"],
                gradient_checkpointing=bool(rec["settings"].get("gradient_checkpointing")))


def worker(side: str, dataset: str, train_path: str, eval_path: str, steps: int, out: str,
           device: str = "cpu") -> None:
    t0 = time.perf_counter()
    if side == "reference":  # a user of the standard recipe, without ft_magics: bitsandbytes and datasets
        import bitsandbytes, datasets as hf_datasets  # noqa: F401, E401 - imported as they come (ft_magics makes
    from ft_magics.core.planner import dims_from_config  # these imports lean: _lean_imports)

    import bitsandbytes, peft, torch, transformers  # noqa: F401 - the libraries both sides load
    from transformers import Trainer  # noqa: F401 - (ft_magics' Trainer runs without datasets)

    from ft_magics.core.memory import rss_bytes

    rss_libraries = rss_bytes()  # what the libraries alone take (ft_magics: without torch's compiler stack)
    stats = dict(loss_tokens=0, tokens=0, sq_len_sum=0, padded_tokens=0, train_seconds=0.0, step_seconds=[])
    instrument_trainer(stats)
    peak_bf16 = device_matmul_peak(device)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()  # the matmul peak's operands are not the job's
    res = (run_reference if side == "reference" else run_ftmagics)(train_path, eval_path, steps, stats, device)
    memory = peak_memory(device, rss_libraries)  # before the second matmul measurement, whose operands are not the job's
    # the limit is measured again after the job and the higher of the two taken: one measurement of ~0.1 s
    # that fell in a slow moment (other work on the machine) read 340-380 against 420-440 GFLOP/s here, which
    # made the job's share of the peak look higher than it was
    peak_samples = [peak_bf16, device_matmul_peak(device)]
    peak_bf16 = max(peak_samples)
    threads = __import__("torch").get_num_threads()
    from transformers import AutoConfig

    dims = dims_from_config(AutoConfig.from_pretrained(demo_model_path()).to_dict()).as_dict()
    flops = useful_flops(dims, stats, res["lora_params"])
    hardware = flops + (recomputed_flops(dims, stats, res["lora_params"]) if res["gradient_checkpointing"] else 0)
    t = stats["train_seconds"]
    tail = res["losses"][-3:]
    result = dict(
        side=side, dataset=dataset, device=device, model=model_arg(), steps=steps, batch=BATCH, view=res["view"],
        torch_threads=threads,
        load_average=os.getloadavg(),
        loss_tokens=stats["loss_tokens"], tokens=stats["tokens"], padded_tokens=stats["padded_tokens"],
        padding_waste=1 - stats["tokens"] / max(stats["padded_tokens"], 1),
        train_seconds=t, loss_tokens_per_s=stats["loss_tokens"] / t if t else None,
        cell_seconds=res["cell_seconds"], process_seconds=time.perf_counter() - t0,
        rss_libraries=rss_libraries, rss_before_train=stats.get("rss_before_train"),
        **memory,
        final_train_loss=sum(tail) / len(tail) if tail else None, losses=res["losses"], eval_loss=res["eval_loss"],
        step_seconds=stats["step_seconds"],
        useful_gflop=flops / 1e9, achieved_gflops=flops / t / 1e9 if t else None,
        hardware_gflops=hardware / t / 1e9 if t else None, gradient_checkpointing=res["gradient_checkpointing"],
        matmul_peak_bf16_gflops=peak_bf16, matmul_peak_samples=peak_samples, lora_params=res["lora_params"],
        extra={k: v for k, v in res.items() if k == "settings"},
        **({"sampled": stats["sampled"]} if stats.get("sampled") else {}),
    )
    result["fraction_of_peak"] = result["achieved_gflops"] / peak_bf16 if result["achieved_gflops"] else None
    result["hardware_fraction_of_peak"] = result["hardware_gflops"] / peak_bf16 if result["hardware_gflops"] else None
    Path(out).write_text(json.dumps(result, indent=1))


def worker_extras(out: str, device: str = "cpu") -> None:
    """`%load_ext ft_magics` time (fresh subprocess) and merged-adapter generation speed vs the base.

    Generation speed: a fixed number of new tokens (end-of-sequence suppressed), so that an answer that
    stops earlier does not count its prompt's cost over fewer tokens; the merged model and a second, bare
    copy of the base are timed in turns (best of 5 each), so that drift in the machine's speed over the
    run falls on both.
    """
    code = ("import time; from IPython.core.interactiveshell import InteractiveShell; sh = InteractiveShell.instance();"
            "t = time.perf_counter(); sh.run_line_magic('load_ext', 'ft_magics'); print(time.perf_counter() - t)")
    load_ext = min(float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                        cwd=tempfile.gettempdir()).stdout.split()[-1]) for _ in range(3))
    res = {"load_ext_seconds": load_ext, "device": device}
    import torch

    from ft_magics import Session
    from ft_magics.core.loading import load_model

    prompt = "How do I reset my password? Please explain step by step."
    new_tokens = 48

    def tokens_per_s(model, tokenizer) -> float:
        enc = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True).to(model.device)
        sync = synchronizer(model.device.type)
        sync()
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        sync()
        return (out.shape[1] - enc["input_ids"].shape[1]) / (time.perf_counter() - t)

    with tempfile.TemporaryDirectory() as work:
        s = Session(adapters_dir=Path(work) / "adapters")
        s.load(model_arg(), bits=16, device=device)  # merging is refused on a 4-bit base (core.adapters.merge): bf16 base
        s.train("extras", str(ROOT / "ft_magics" / "data" / "support.jsonl"), {"max_steps": 2, "batch_size": 4})
        answers = [s.generate(prompt, adapter="extras", max_new_tokens=new_tokens) for _ in range(3)]
        # LoRA layers in the way, as trained; over the whole call, as the base and the merged model are timed below
        # (Generation.tokens_per_s times the decoding only)
        res["adapter_tokens_per_s"] = max(g.new_tokens / g.seconds for g in answers)
        s.merge_adapter("extras")
        merged = s.model.get_base_model()  # what Session.generate runs while an adapter is merged
        base = load_model(model_arg(), bits=16, device=device)  # a bare copy of the base, timed in turns with the merged model
        base.model.eval()
        speeds = {"base": [], "merged": []}
        for _ in range(5):
            speeds["base"].append(tokens_per_s(base.model, base.tokenizer))
            speeds["merged"].append(tokens_per_s(merged, s.tokenizer))
        res["base_tokens_per_s"] = max(speeds["base"])
        res["merged_tokens_per_s"] = max(speeds["merged"])
        res["merged_vs_base"] = res["merged_tokens_per_s"] / res["base_tokens_per_s"]
        res["rounds"] = speeds
    Path(out).write_text(json.dumps(res, indent=1))


# --------------------------------------------------------------------------- driver
REUSE = os.environ.get("BENCH_REUSE") == "1"  # assemble from raw-*.json files already there (same steps)
# report only what raw-*.json files are there, running nothing (a run cut short, results fetched from a GPU machine)
ASSEMBLE = os.environ.get("BENCH_ASSEMBLE") == "1"


TORCH_KERNEL_CACHE_DEFAULT = "1024"


def worker_env(**extra) -> dict:
    """The environment of every benchmark worker process (this file's, bench_levers' and bench_planner's):
    offline, with the checkout first on PYTHONPATH and whatever the caller had there after it (packages it
    brings, as on a GPU machine), plus ``extra``."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=path, **extra)


def start_side(side: str, dataset: str, paths: tuple, steps: int, device: str = "cpu"):
    out = RESULTS / f"raw{results_suffix(device)}-{dataset}-{side}.json"
    if REUSE and out.exists() and json.loads(out.read_text()).get("steps") == steps:
        return out, None, time.perf_counter()
    out.unlink(missing_ok=True)
    body = dict(FT_SIDES).get(side, "")
    env = worker_env(BENCH_FT_BODY=body)
    from ft_magics import CPU_KERNEL_CACHE_VARS  # the caches that `import ft_magics` bounds

    for var in CPU_KERNEL_CACHE_VARS:  # the worker imports ft_magics (its data pipeline) on every side, which
        env.pop(var, None)  # bounds these caches; the reference keeps torch's own default, as a user has it
        if side == "reference":
            env[var] = TORCH_KERNEL_CACHE_DEFAULT
    cmd = [sys.executable, __file__, "--worker", side, dataset, paths[0], paths[1], str(steps), str(out), device]
    log = open(out.with_suffix(".log"), "w")
    return out, subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), time.perf_counter()


def finish_side(side: str, dataset: str, started) -> dict:
    out, proc, t = started
    rc = proc.wait() if proc is not None else 0
    print(f"  {dataset:8s} {side:15s} {'done' if rc == 0 else 'FAILED'} after {time.perf_counter() - t:.0f} s",
          flush=True)
    if rc != 0:
        sys.stderr.write(out.with_suffix(".log").read_text()[-5000:])
        raise SystemExit(1)
    return json.loads(out.read_text())


def run_all(steps: int, device: str = "cpu") -> list:
    """Every (dataset, side) in its own subprocess: one after another, or all at once with BENCH_PARALLEL=1
    (the sides of each dataset together: on a machine others are loading, that gives them the same conditions)."""
    sides = ["reference"] + [name for name, _ in FT_SIDES]
    rows = []
    only = [x for x in os.environ.get("BENCH_DATASETS", "").split(",") if x]  # e.g. BENCH_DATASETS=support
    for d, paths in datasets().items():
        if only and d not in only:
            continue
        if ASSEMBLE:
            found = [RESULTS / f"raw{results_suffix(device)}-{d}-{side}.json" for side in sides]
            rows += [json.loads(f.read_text()) for f in found if f.exists()]
            print("".join(f"  {d:8s} {f.stem.rsplit('-', 1)[-1]:15s} not run (no {f.name})\n"
                          for f in found if not f.exists()), end="")
            continue
        if os.environ.get("BENCH_PARALLEL") == "1":  # the sides of one dataset at once
            started = [(side, start_side(side, d, paths, steps, device)) for side in sides]
            rows += [finish_side(side, d, st) for side, st in started]
        else:
            rows += [finish_side(side, d, start_side(side, d, paths, steps, device)) for side in sides]
    return rows


def gb(n):
    """Decimal GB (1e9 bytes), as ft_magics' own readouts and %ft_plan give them."""
    return n / 1e9


def table(rows: list) -> str:
    lines = [f"| dataset | side | loss tok/s | {peak_label(rows[0]) if rows else 'peak RSS GB'} | job GB | train s | cell s | train loss | eval loss | "
             "padding | GFLOP/s of bf16 matmul peak | % of peak | % incl. recompute |", "|" + "---|" * 13]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['side']} | {r['loss_tokens_per_s']:.3g} | {gb(peak_bytes(r)):.2f} | {gb(r['job_peak_bytes']):.2f} | "
            f"{r['train_seconds']:.1f} | {r['cell_seconds']:.1f} | {r['final_train_loss']:.4f} | {r['eval_loss']:.4f} | "
            f"{100 * r['padding_waste']:.0f}% | {r['achieved_gflops']:.3g} of {r['matmul_peak_bf16_gflops']:.3g} | {100 * r['fraction_of_peak']:.1f}% | "
            f"{100 * r.get('hardware_fraction_of_peak', r['fraction_of_peak']):.1f}% |")
    return "\n".join(lines)


def plot(rows: list, path: Path) -> Optional[Path]:
    """Training loss against training time for every side (one panel per dataset), and the peak memory and
    loss tokens/s of each side as bars: where the tables give end points, this shows the whole run."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # matplotlib comes with the package's dependencies; without it, tables only
        return None
    datasets_ = list(dict.fromkeys(r["dataset"] for r in rows))
    fig, axes = plt.subplots(len(datasets_), 2, figsize=(11, 3.6 * len(datasets_)), squeeze=False)
    for row_axes, d in zip(axes, datasets_):
        runs = [r for r in rows if r["dataset"] == d]
        ax = row_axes[0]
        for r in runs:
            xs = r.get("step_seconds") or [r["train_seconds"] * (i + 1) / len(r["losses"]) for i in range(len(r["losses"]))]
            n = min(len(xs), len(r["losses"]))
            ax.plot(xs[:n], r["losses"][:n], marker=".", label=f"{r['side']} ({r['train_seconds']:.0f} s)")
        ax.set_title(f"{d}: training loss over training time")
        ax.set_xlabel("seconds")
        ax.set_ylabel("loss")
        ax.legend(fontsize=8)
        ax = row_axes[1]
        names = [r["side"] for r in runs]
        xs = range(len(runs))
        ax.bar([x - 0.2 for x in xs], [r["loss_tokens_per_s"] for r in runs], width=0.4, label="loss tokens/s")
        ax.set_ylabel("loss tokens/s")
        ax2 = ax.twinx()
        mem = peak_label(runs[0])
        ax2.bar([x + 0.2 for x in xs], [gb(peak_bytes(r)) for r in runs], width=0.4, color="tab:orange", label=mem)
        ax2.set_ylabel(mem)
        ax.set_xticks(list(xs))
        ax.set_xticklabels(names, fontsize=8)
        ax.set_title(f"{d}: speed (blue) and peak memory (orange)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def ratios(ref: dict, ft: dict) -> dict:
    return dict(
        loss_tokens_per_s=ft["loss_tokens_per_s"] / ref["loss_tokens_per_s"],
        peak_rss=peak_bytes(ft) / peak_bytes(ref),  # the peak memory figure: RSS on the CPU, VRAM on CUDA
        job_memory=ft["job_peak_bytes"] / ref["job_peak_bytes"],
        train_seconds=ft["train_seconds"] / ref["train_seconds"],
        cell_seconds=ft["cell_seconds"] / ref["cell_seconds"],
        eval_loss=ft["eval_loss"] / ref["eval_loss"],
        final_train_loss=ft["final_train_loss"] / ref["final_train_loss"],
    )


def main() -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    device = bench_device()
    suffix = results_suffix(device)
    print(f"ft_magics vs standard QLoRA recipe: {model_arg()} model on {device}, batch {BATCH}, {STEPS} steps "
          "(BENCH_STEPS)")
    extras_out = RESULTS / f"raw{suffix}-extras.json"
    if not ((REUSE or ASSEMBLE) and extras_out.exists()):
        extras_out.unlink(missing_ok=True)
    extras_proc = None if extras_out.exists() or ASSEMBLE else subprocess.Popen(  # `%load_ext` time and merged-adapter generation speed
        [sys.executable, __file__, "--extras", str(extras_out), device], stdout=subprocess.DEVNULL,
        stderr=open(extras_out.with_suffix(".log"), "w"), env=worker_env())
    if os.environ.get("BENCH_PARALLEL") != "1" and extras_proc is not None:
        extras_proc.wait()
    rows = run_all(STEPS, device)
    summary = {}
    for r in rows:
        ref = next((x for x in rows if x["dataset"] == r["dataset"] and x["side"] == "reference"), None)
        if r["side"] != "reference" and ref is not None:
            summary[f"{r['dataset']} / {r['side']}"] = ratios(ref, r)
    if extras_proc is not None:
        extras_proc.wait()
    extras = (json.loads(extras_out.read_text()) if extras_out.exists()
              else {"error": extras_out.with_suffix(".log").read_text()[-2000:]})
    goals = {}
    for key, r in summary.items():
        dataset, side = key.split(" / ")
        ft = next(x for x in rows if x["dataset"] == dataset and x["side"] == side)
        goals[key] = {
            "tokens_per_s >= 1.5x": r["loss_tokens_per_s"] >= 1.5,
            "eval loss within 2%": abs(r["eval_loss"] - 1) <= 0.02,
            "peak memory <= 0.5x": r["peak_rss"] <= 0.5,
            "job memory <= 0.5x": r["job_memory"] <= 0.5,
            ">= 50% of matmul peak": ft["fraction_of_peak"] >= 0.5,
            "(hardware, recompute counted) >= 50%": ft.get("hardware_fraction_of_peak", 0) >= 0.5,
        }
    job_note = ("job GB: peak RSS less the RSS of the libraries alone (torch, transformers with its Trainer, peft, "
                "bitsandbytes, imported in that side's process; the reference's Trainer brings datasets, ft_magics' does "
                "not, and ft_magics defers bitsandbytes' torch.compile wrappers, so its process holds no torch compiler "
                "stack), the CPU counterpart of CUDA's peak allocated memory." if device == "cpu" else
                "peak VRAM: torch.cuda.max_memory_allocated() over the whole side (load, train, eval, save); job GB "
                "is the same figure (no libraries live in VRAM).")
    md = [f"Device: {device}; model: {model_arg()}.", "", table(rows), "", job_note, "",
          "| dataset / side | tok/s ratio | peak memory ratio | job memory ratio | train time ratio | eval loss ratio |",
          "|---|---|---|---|---|---|"]
    for name, r in summary.items():
        md.append(f"| {name} | {r['loss_tokens_per_s']:.2f}x | {r['peak_rss']:.2f}x | {r['job_memory']:.2f}x | {r['train_seconds']:.2f}x | "
                  f"{r['eval_loss']:.3f} |")
    md += ["", "Goals vs the reference:"]
    md += [f"- {n}: " + ", ".join(f"{k} {'MET' if v else 'not met'}" for k, v in g.items()) for n, g in goals.items()]
    md += [f"ft_magics view: {rows[1]['view']}; torch threads {rows[0]['torch_threads']}; "
           f"load average at the end {rows[-1]['load_average'][0]:.1f} (other work on the machine slows every side)"]
    if "load_ext_seconds" in extras:
        md.append(f"`%load_ext ft_magics`: {extras['load_ext_seconds']:.3f} s (goal < 0.3 s: "
                  f"{'MET' if extras['load_ext_seconds'] < 0.3 else 'not met'})")
    if extras.get("merged_tokens_per_s"):
        md.append(f"generation tokens/s: base {extras['base_tokens_per_s']:.1f}, adapter (unmerged) "
                  f"{extras['adapter_tokens_per_s']:.1f}, merged {extras['merged_tokens_per_s']:.1f} = "
                  f"{extras['merged_vs_base']:.2f}x base (goal >= 0.95x: "
                  f"{'MET' if extras['merged_vs_base'] >= 0.95 else 'not met'})")
    else:
        md.append(f"merged-adapter generation: not measured ({extras.get('note') or extras.get('error', '')[-300:]})")
    text = "\n".join(md)
    (RESULTS / f"bench_training{suffix}.json").write_text(json.dumps(
        {"device": device, "steps": STEPS, "batch": BATCH, "runs": rows, "ratios": summary, "goals": goals, "extras": extras}, indent=1))
    picture = plot(rows, RESULTS / f"bench_training{suffix}.png")
    if picture is not None:
        text += f"\n\n![loss over time, speed and memory]({picture.name})"
    (RESULTS / f"bench_training{suffix}.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--extras":
        worker_extras(*sys.argv[2:4])
    elif len(sys.argv) > 1 and sys.argv[1] == "--worker":
        side, dataset, tr, ev, steps, out = sys.argv[2:8]
        worker(side, dataset, tr, ev, int(steps), out, sys.argv[8] if len(sys.argv) > 8 else "cpu")
    else:
        main()
