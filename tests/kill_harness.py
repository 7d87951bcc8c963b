"""Kill training at random moments and check that nothing it leaves behind lies.

One parent process imports torch/transformers once, then forks a child per training run (a fork
starts in milliseconds; a fresh interpreter needs seconds). For each trial the parent starts a
fresh run of the tiny model and, at a random moment, sends it

* SIGKILL at a random step, or at a random ``fsync`` (i.e. in the middle of writing a checkpoint or
  the adapter: the child reports every fsync and pauses briefly there), or
* SIGINT (what the kernel's interrupt button sends) at a random step; the child must stop at the
  next step boundary, save a valid adapter, stay usable, and resume to the end in-process.

After every SIGKILL a second child checks what was left: every visible adapter folder passes
``read_adapter_folder`` and loads with ``PeftModel.from_pretrained``; every checkpoint that looks
complete is complete; then it resumes from the latest complete checkpoint to the last step. Each
completed run's loss curve must equal the uninterrupted reference run's (same seed).

Prints one JSON summary line: ``RESULT {...}``. Used by tests/test_kills.py and ``make soak``.

    python tests/kill_harness.py --model DIR --workdir DIR --sigkill 20 --sigint 4 --seed 0
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # fork-safe: no OpenMP pool exists in the parent
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import select  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

warnings.filterwarnings("ignore")

MAX_STEPS = 8
CFG = dict(max_steps=MAX_STEPS, batch_size=2, save_every=2, log_every=1, learning_rate=1e-2, max_seq_len=64,
           r=4, alpha=8, save_every_minutes=0)
DATA = [{"prompt": f"How do I reset password {i}?", "completion": f"Click forgot password, step {i}."}
        for i in range(24)]
NAME = "run"
EVENT_TIMEOUT_S = 120.0


# ------------------------------------------------------------------------------------------ child side
def _child_main(fd: int, model_dir: str, adapters: str, mode: str, slow_fsync: bool) -> None:
    """Runs in a forked child. Reports events on ``fd``: STEP n, FSYNC, RESULT {...}."""
    from ft_magics import Session
    from ft_magics.core.events import Listener

    def say(line: str) -> None:
        os.write(fd, (line + "\n").encode())

    if slow_fsync:
        real_fsync = os.fsync

        def fsync(f):
            say("FSYNC")
            time.sleep(0.004)
            return real_fsync(f)

        os.fsync = fsync

    class Report(Listener):
        def on_step(self, e):
            say(f"STEP {e.step}")

    out: dict = {"mode": mode}
    s = Session(adapters_dir=adapters)
    s.load(model_dir, bits=32)
    if mode == "verify":
        out["verify"] = verify_folders(s, Path(adapters))
        from ft_magics.core.checkpoints import checkpoint_root, latest_valid

        ckpt = latest_valid(checkpoint_root(Path(adapters), NAME))
        out["resumed_from"] = ckpt.name if ckpt else None
        r = s.train(NAME, DATA, CFG, resume=ckpt is not None)
        out.update(status=r.status, steps=r.steps, losses=r.record["loss_history"])
    else:  # "train": a fresh run that the parent interrupts or kills
        r = s.train(NAME, DATA, CFG, listeners=[Report()])
        out.update(status=r.status, steps=r.steps, losses=r.record["loss_history"], adapter=r.adapter_path)
        if r.status == "interrupted":
            # the model stays usable after an interrupt: generate, check the folder, resume in-process
            gen = s.generate("How do I reset my password?", max_new_tokens=4)
            out["generated_tokens"] = gen.new_tokens
            out["verify"] = verify_folders(s, Path(adapters))
            r2 = s.train(NAME, DATA, CFG, resume=True)
            out.update(resume_status=r2.status, resume_steps=r2.steps, losses=r2.record["loss_history"])
    say("RESULT " + json.dumps(out))


def verify_folders(session, adapters: Path) -> dict:
    """Every visible adapter folder must be complete and load into PEFT; every checkpoint that
    passes the integrity check must hold what resuming needs."""
    from peft import PeftModel

    from ft_magics.core.adapters import read_adapter_folder
    from ft_magics.core.atomic import COMPLETE_MARKER
    from ft_magics.core.checkpoints import _checkpoints, checkpoint_problem, checkpoint_root

    report = {"adapters_ok": 0, "adapter_errors": [], "ckpt_valid": 0, "ckpt_invalid": 0, "ckpt_errors": []}
    for p in sorted(adapters.iterdir()) if adapters.is_dir() else []:
        if p.name.startswith("."):
            continue
        try:
            read_adapter_folder(p)
            if not (p / COMPLETE_MARKER).exists():
                raise AssertionError("no completion marker")
            base = session.handle.model
            base = base.get_base_model() if hasattr(base, "get_base_model") else base
            PeftModel.from_pretrained(base, str(p), adapter_name="verify_probe").unload()
            report["adapters_ok"] += 1
        except Exception as exc:  # noqa: BLE001 - recorded and asserted on by the caller
            report["adapter_errors"].append(f"{p.name}: {type(exc).__name__}: {exc}")
    for _step, path in _checkpoints(checkpoint_root(adapters, NAME)):
        problem = checkpoint_problem(path)
        if problem is None:
            report["ckpt_valid"] += 1
            try:
                state = json.loads((path / "trainer_state.json").read_text())
                assert state["global_step"] == _step
                import torch

                torch.load(path / "optimizer.pt", weights_only=True)
                torch.load(path / "scheduler.pt", weights_only=True)
            except Exception as exc:  # noqa: BLE001
                report["ckpt_errors"].append(f"{path.name}: {type(exc).__name__}: {exc}")
        else:
            report["ckpt_invalid"] += 1
    return report


# ------------------------------------------------------------------------------------------ parent side
class Child:
    def __init__(self, model_dir, adapters, mode, slow_fsync=False):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            os.close(r)
            code = 0
            try:
                signal.signal(signal.SIGINT, signal.default_int_handler)
                _child_main(w, model_dir, adapters, mode, slow_fsync)
            except BaseException as exc:  # noqa: BLE001 - reported to the parent
                try:
                    import traceback

                    where = " | ".join(l.strip() for l in traceback.format_exc().strip().splitlines()[-14:])  # the failing frames
                    os.write(w, ("RESULT " + json.dumps({"mode": mode, "crash": f"{type(exc).__name__}: {exc} ({where})"})
                                 + "\n").encode())
                except OSError:
                    pass
                code = 1
            finally:
                os._exit(code)
        os.close(w)
        self.pid, self.fd, self.buf = pid, r, b""
        self.result = None
        self.fsyncs = 0

    def events(self):
        """Yield event lines until the child closes its end; raise TimeoutError on silence."""
        while True:
            while b"\n" in self.buf:
                line, self.buf = self.buf.split(b"\n", 1)
                text = line.decode()
                if text.startswith("RESULT "):
                    self.result = json.loads(text[7:])
                if text == "FSYNC":
                    self.fsyncs += 1
                yield text
            ready, _, _ = select.select([self.fd], [], [], EVENT_TIMEOUT_S)
            if not ready:
                raise TimeoutError("child silent for %.0f s" % EVENT_TIMEOUT_S)
            chunk = os.read(self.fd, 65536)
            if not chunk:
                return
            self.buf += chunk

    def drain(self):
        for _ in self.events():
            pass
        return self.finish()

    def finish(self):
        _, status = os.waitpid(self.pid, 0)
        os.close(self.fd)
        return status


def same_curve(a, b, tol=1e-4) -> bool:
    return len(a) == len(b) and all(sa == sb and abs(la - lb) <= tol for (sa, la), (sb, lb) in zip(a, b))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--sigkill", type=int, default=20)
    ap.add_argument("--sigint", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    rng = random.Random(a.seed)
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)

    # import everything heavy once, before forking (children inherit it)
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from peft import PeftModel  # noqa: F401
    from transformers import Trainer  # noqa: F401

    import ft_magics.core.checkpoints  # noqa: F401
    import ft_magics.core.data  # noqa: F401
    import ft_magics.core.training  # noqa: F401
    from ft_magics import Session  # noqa: F401

    summary = {"sigkill": 0, "sigkill_mid_save": 0, "sigkill_at_step": 0, "sigint": 0, "resumes_completed": 0,
               "resumed_from_scratch": 0, "adapters_verified": 0, "incomplete_checkpoints_seen": 0,
               "curve_mismatches": [], "failures": [], "trials": []}
    t0 = time.time()

    # the uninterrupted reference: loss curve and how many fsyncs one run makes
    ref_dir = work / "reference"
    ref = Child(a.model, str(ref_dir), "train", slow_fsync=True)
    ref.drain()
    if not ref.result or ref.result.get("status") != "completed":
        summary["failures"].append(f"reference run failed: {ref.result}")
        print("RESULT " + json.dumps(summary), flush=True)
        return summary
    reference = ref.result["losses"]
    total_fsyncs = ref.fsyncs
    summary["reference_losses"] = reference
    summary["fsyncs_per_run"] = total_fsyncs

    plan = ["sigkill"] * a.sigkill + ["sigint"] * a.sigint
    rng.shuffle(plan)
    for i, kind in enumerate(plan):
        adapters = work / f"trial-{i:03d}" / "adapters"
        trial = {"i": i, "kind": kind}
        if kind == "sigkill":
            mid_save = rng.random() < 0.5
            at = rng.randint(1, max(1, total_fsyncs - 1)) if mid_save else rng.randint(1, MAX_STEPS - 1)
            trial.update(mid_save=mid_save, at=at)
            # an earlier adapter of the same name: a kill while the new one is saved must leave it intact
            shutil.copytree(ref_dir / NAME, adapters / NAME)
            victim = Child(a.model, str(adapters), "train", slow_fsync=mid_save)
            seen = 0
            last_step = 0
            try:
                for ev in victim.events():
                    if ev.startswith("STEP "):
                        last_step = int(ev.split()[1])
                    if (mid_save and ev == "FSYNC") or (not mid_save and ev.startswith("STEP ")):
                        seen += 1
                        if seen >= at:
                            os.kill(victim.pid, signal.SIGKILL)
                            break
            except TimeoutError as exc:
                os.kill(victim.pid, signal.SIGKILL)
                summary["failures"].append(f"trial {i}: victim hung: {exc}")
            victim.finish()
            summary["sigkill"] += 1
            summary["sigkill_mid_save" if mid_save else "sigkill_at_step"] += 1
            trial["killed_before_end"] = victim.result is None
            # a second child inspects what was left and resumes to the end
            checker = Child(a.model, str(adapters), "verify")
            try:
                checker.drain()
            except TimeoutError as exc:
                os.kill(checker.pid, signal.SIGKILL)
                checker.finish()
                summary["failures"].append(f"trial {i}: resume hung: {exc}")
                continue
            res = checker.result or {"crash": "no result"}
            # at most the steps since the last complete checkpoint are lost: the checkpoint of the last
            # even step reported may still have been in writing, the one before it was complete
            every = CFG["save_every"]
            floor = max(0, (last_step // every) * every - every)
            got = int(str(res.get("resumed_from") or "checkpoint-0").split("-")[-1])
            trial["last_step_seen"], trial["resumed_step"] = last_step, got
            if "crash" not in res and got < floor:
                summary["failures"].append(f"trial {i}: killed after step {last_step} but resumed from step {got}")
        else:
            at = rng.randint(1, MAX_STEPS - 2)
            trial.update(at=at)
            victim = Child(a.model, str(adapters), "train")
            try:
                for ev in victim.events():
                    if ev == f"STEP {at}":
                        os.kill(victim.pid, signal.SIGINT)
            except TimeoutError as exc:
                os.kill(victim.pid, signal.SIGKILL)
                summary["failures"].append(f"trial {i}: interrupted child hung: {exc}")
            victim.finish()
            summary["sigint"] += 1
            res = victim.result or {"crash": "no result"}
            if "crash" not in res:
                if res.get("status") != "interrupted":
                    summary["failures"].append(f"trial {i}: SIGINT at step {at} gave status {res.get('status')}")
                elif not res.get("adapter") or res.get("generated_tokens", 0) < 1:
                    summary["failures"].append(f"trial {i}: interrupted run saved no adapter or model unusable")
                res = dict(res, status=res.get("resume_status"), steps=res.get("resume_steps"),
                           resumed_from=f"step {res.get('steps')}")
        trial["result"] = {k: v for k, v in res.items() if k != "losses"}
        summary["trials"].append(trial)
        if "crash" in res:
            summary["failures"].append(f"trial {i} ({kind}): {res['crash']}")
            continue
        v = res.get("verify") or {}
        summary["adapters_verified"] += v.get("adapters_ok", 0)
        summary["incomplete_checkpoints_seen"] += v.get("ckpt_invalid", 0)
        for err in v.get("adapter_errors", []) + v.get("ckpt_errors", []):
            summary["failures"].append(f"trial {i}: {err}")
        if res.get("status") == "completed" and res.get("steps") == MAX_STEPS:
            summary["resumes_completed"] += 1
            if res.get("resumed_from") is None:
                summary["resumed_from_scratch"] += 1
        else:
            summary["failures"].append(f"trial {i}: resume ended {res.get('status')} at step {res.get('steps')}")
        if not same_curve(res.get("losses") or [], reference):
            summary["curve_mismatches"].append(i)
        shutil.rmtree(adapters.parent, ignore_errors=True)
    summary["seconds"] = round(time.time() - t0, 1)
    print("RESULT " + json.dumps(summary), flush=True)
    print("SUMMARY " + json.dumps({k: v for k, v in summary.items() if k not in ("trials", "reference_losses")}),
          flush=True)
    return summary


if __name__ == "__main__":
    s = main()
    sys.exit(0 if not s["failures"] and not s["curve_mismatches"] else 1)
