"""Write the README's reference block (every magic and every YAML key with its default) from the code.

Run: .venv/bin/python scripts/gen_reference.py          (rewrites the block in README.md)
     .venv/bin/python scripts/gen_reference.py --check  (exit 1 if README.md is out of date)
tests/test_docs.py runs the check.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ft_magics.reference import current_block, readme_block, replace_block  # noqa: E402


def main() -> int:
    readme = ROOT / "README.md"
    text = readme.read_text()
    block = readme_block()
    if "--check" in sys.argv:
        if current_block(text) != block:
            print("README.md's reference block is out of date: run .venv/bin/python scripts/gen_reference.py")
            return 1
        print("README.md reference block is up to date.")
        return 0
    new = replace_block(text, block)
    if new != text:
        readme.write_text(new)
        print(f"updated the reference block in {readme}")
    else:
        print("README.md reference block already up to date.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
