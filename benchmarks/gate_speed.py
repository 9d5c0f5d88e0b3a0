"""Time of the default gate suite on SmolLM2 converted with 15 ladder layers, with the reference's results cached.

    python benchmarks/gate_speed.py

Target: <= 3 minutes on 2 cores (200 held-out chats, 500 ARC-Easy questions, 50 generations).
"""

import tempfile
import time
from pathlib import Path

from ladder.convert.converter import convert
from ladder.convert.smollm2 import fetch_smollm2
from ladder.gates import run_gate


def main() -> None:
    original = fetch_smollm2()
    with tempfile.TemporaryDirectory() as work:
        candidate = convert(str(original), "15", Path(work) / "smollm2-ladder15")
        print("filling the reference cache (skipped when already cached)...", flush=True)
        run_gate(candidate, "after_convert")
        start = time.perf_counter()
        run_gate(candidate, "after_adapt")
        seconds = time.perf_counter() - start
    print(f"\ndefault suite, reference cached: {seconds:.0f} s (target <= 180 s)")


if __name__ == "__main__":
    main()
