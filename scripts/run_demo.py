"""Execute a demo notebook headless in a real kernel (nbclient), save the executed copy, print its summary.

Usage: python scripts/run_demo.py demo_notebooks/01_quickstart.ipynb [--timeout 1200]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError


def outputs_text(nb) -> str:
    chunks = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                chunks.append(out.get("text", ""))
            elif "text/plain" in out.get("data", {}):
                chunks.append(out["data"]["text/plain"] + "\n")
    return "".join(chunks)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("notebook")
    ap.add_argument("--timeout", type=int, default=1200, help="seconds per cell")
    args = ap.parse_args()
    src = Path(args.notebook)
    nb = nbformat.read(src, as_version=4)
    out_path = src.with_name(src.stem + ".executed.ipynb")
    t = time.time()
    client = NotebookClient(nb, timeout=args.timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(src.parent.resolve())}})
    print(f"running {src} in a fresh kernel ...", flush=True)
    try:
        client.execute()
    except (CellExecutionError, TimeoutError, RuntimeError) as exc:  # CellTimeoutError is a TimeoutError
        nbformat.write(nb, out_path)
        print(f"FAILED: {type(exc).__name__}; executed copy (with the error) at {out_path}\n{exc}", file=sys.stderr)
        return 1
    nbformat.write(nb, out_path)
    text = outputs_text(nb)
    if "=== ft_magics demo summary ===" in text:
        summary = text.split("=== ft_magics demo summary ===", 1)[1].split("=== end ===", 1)[0]
        print("ft_magics demo summary" + summary.rstrip())
    print(f"executed notebook saved to {out_path} ({time.time() - t:.0f} s wall)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
