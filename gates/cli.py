"""`ladder-eval CANDIDATE --gate NAME [--reference ORIGINAL]`: exit 0 when the gate passes, 1 when it fails, 2 on bad
usage, 130 when interrupted, 3 on an unexpected error. The report is written as JSON and Markdown into the
candidate's directory."""

import argparse
import sys

from ladder.checkpoint import CheckpointError, crashed

from .config import DEFAULT_GATES_FILE, GateUsageError
from .evaluate import run_gate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ladder-eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("candidate", help="checkpoint directory to judge")
    parser.add_argument("--gate", required=True, help="gate name in the gates file (after_convert, after_adapt, ...)")
    parser.add_argument("--reference", help="the original (Hub id or directory); default: the candidate's provenance")
    parser.add_argument("--gates-file", default=DEFAULT_GATES_FILE, help="suite and thresholds (YAML)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                        help="auto: bfloat16 on CUDA, float32 on CPU")  # fmt: skip
    parser.add_argument("--no-cache", action="store_true", help="recompute the reference's results")
    args = parser.parse_args(argv)
    try:
        verdict = run_gate(args.candidate, args.gate, args.reference, args.gates_file, args.device, args.dtype,
                           use_cache=not args.no_cache)  # fmt: skip
    except (GateUsageError, CheckpointError, OSError) as error:
        print(f"ladder-eval: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ladder-eval: interrupted; no report was written", file=sys.stderr)
        return 130
    except Exception as error:  # a bug of ours, or an environment we did not foresee
        return crashed("ladder-eval", error)
    if not verdict.passed:
        print(f"ladder-eval: gate {args.gate} failed on: {', '.join(verdict.failing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
