"""DoRA adapters on the demo model in 4-bit: ft_magics' paths against PEFT's own forward.

    .venv/bin/python benchmarks/bench_dora.py [--steps 20] [--tokens 32]

A DoRA adapter (use_dora: true) is trained for a few steps on the bundled set, then the base model answers
once (on the CPU that repacks the 4-bit weights for bitsandbytes' inference kernel, as any notebook does
after its first generate). Then, greedy, the same prompts:
  reference - the adapter in the standard 4-bit layout (what training computes): the right answers
  ft_magics - Session.generate (the weight norm of each layer kept; read from the true weights)
  peft      - PEFT's own DoRA forward in the same state (recomputes the norm for every token; it read the
              repacked weights as garbage until ft_magics gave PEFT's reader the true weights, see
              core.fused_lora.read_packed_weights_in_peft)
Reported: tokens/s of the two paths, and how often each picks the reference's next token along the
reference answers (teacher-forced argmax agreement: exact text is too strict, since the repacked kernel's
rounding differs a little from the standard layout's and greedy answers drift apart after a while).
Training: the same DoRA run (same seed and data) with ft_magics' fused DoRA node and with PEFT's forward
(``fused_lora: false``): loss tokens/s of each and the largest difference between their loss curves.
Results: printed, and benchmarks/results/bench_dora.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
PROMPTS = ["How do I reset my password?", "My order has not arrived yet.", "Can I get a refund for a broken item?"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    import torch

    from ft_magics import Session
    from ft_magics.core import fused_lora
    from ft_magics.core.inference import generate
    from ft_magics.core.training import training_layout

    with tempfile.TemporaryDirectory() as work:
        s = Session(adapters_dir=Path(work) / "adapters")
        s.load("demo")
        settings = {"max_steps": args.steps, "batch_size": 8, "use_dora": True, "learning_rate": 1e-3, "seed": 1}
        runs = {fused: s.train(f"dora-{fused}", "demo:support", {**settings, "fused_lora": fused}, listeners=[])
                for fused in (False, True)}
        curves = {k: [loss for _, loss in r.record["loss_history"]] for k, r in runs.items()}
        training = {"ft_magics_loss_tokens_per_s": runs[True].loss_tokens_per_s,
                    "peft_loss_tokens_per_s": runs[False].loss_tokens_per_s,
                    "largest_loss_difference": max(abs(a - b) for a, b in zip(curves[True], curves[False])),
                    "final_loss": curves[True][-1]}
        s.train("dora", "demo:support", settings, listeners=[])
        s.generate("Hello", adapter="base", max_new_tokens=2)  # the notebook's base-model try: weights repacked
        model, tok = s.model, s.tokenizer
        model.set_adapter("dora")
        with training_layout(model):
            reference = [generate(model, tok, p, max_new_tokens=args.tokens).text for p in PROMPTS]

        def timed(run) -> tuple:
            texts, tokens, seconds = [], 0, 0.0
            for p in PROMPTS:
                t = time.perf_counter()
                g = run(p)
                seconds += time.perf_counter() - t
                texts.append(g.text)
                tokens += g.new_tokens
            return texts, tokens / seconds

        from ft_magics.core.inference import build_prompt

        rows = [tok(build_prompt(tok, p) + a, return_tensors="pt")["input_ids"] for p, a in zip(PROMPTS, reference)]
        starts = [len(tok(build_prompt(tok, p))["input_ids"]) for p in PROMPTS]

        def next_tokens(fused: bool) -> list:
            with torch.no_grad(), fused_lora.fused_lora(model, fused):
                return [model(input_ids=ids).logits[0, st - 1:-1].argmax(-1) for ids, st in zip(rows, starts)]

        with torch.no_grad(), training_layout(model):
            want = next_tokens(False)
        s.generate("Hello", adapter="dora", max_new_tokens=1)  # back in the repacked layout

        def agreement(fused: bool) -> float:
            got = next_tokens(fused)
            return sum(int((a == b).sum()) for a, b in zip(got, want)) / sum(len(a) for a in want)

        ours, ours_speed = timed(lambda p: s.generate(p, adapter="dora", max_new_tokens=args.tokens))
        ours_agree = agreement(True)
        original = fused_lora.fused_lora
        fused_lora.fused_lora = lambda m, enabled=True: original(m, False)  # PEFT's forward throughout
        try:
            peft_texts, peft_speed = timed(lambda p: generate(model, tok, p, max_new_tokens=args.tokens))
        finally:
            fused_lora.fused_lora = original
        peft_agree = agreement(False)
        res = {
            "steps": args.steps, "new_tokens": args.tokens, "ft_magics_tokens_per_s": ours_speed,
            "peft_tokens_per_s": peft_speed, "speedup": ours_speed / peft_speed,
            "ft_magics_next_token_agreement": ours_agree, "peft_next_token_agreement": peft_agree,
            "answers": len(PROMPTS), "torch_threads": torch.get_num_threads(), "training": training,
            "examples": {"reference": reference[0], "ft_magics": ours[0], "peft": peft_texts[0]},
        }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_dora.json").write_text(json.dumps(res, indent=1))
    print(f"DoRA generation, demo model 4-bit, after a base-model generate ({args.tokens} new tokens, greedy):")
    print(f"  ft_magics          {ours_speed:5.1f} tok/s; picks the standard layout's next token {100 * ours_agree:.0f}% "
          "of the time along its answers")
    print(f"  PEFT's own forward {peft_speed:5.1f} tok/s; {100 * peft_agree:.0f}% "
          f"(ft_magics {res['speedup']:.1f}x as fast)")
    t = res["training"]
    print(f"DoRA training, {args.steps} steps of 8: ft_magics {t['ft_magics_loss_tokens_per_s']:.0f} loss tokens/s, PEFT's "
          f"forward {t['peft_loss_tokens_per_s']:.0f} ({t['ft_magics_loss_tokens_per_s'] / t['peft_loss_tokens_per_s']:.2f}x); "
          f"loss curves at most {t['largest_loss_difference']:.3f} apart (final {t['final_loss']:.3f})")
    for k, v in res["examples"].items():
        print(f"  {k:>9}: {v[:70]!r}")


if __name__ == "__main__":
    main()
