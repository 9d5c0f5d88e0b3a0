"""Decode speed of ladder vs standard wiring at tensor-parallel size 2, on loopback and on a throttled link, and of
ladder vs the no-communication bound; random weights with Llama-3.1-8B's layer shapes.

    python benchmarks/tp_speed.py                       # CPU-sized defaults (2 cores)
    python benchmarks/tp_speed.py --layers 32 --batch 1,4,16 --prompt-len 1024 --new-tokens 128   # on 2 GPUs
    python benchmarks/tp_speed.py --batch 1 --profile --profile-dir runs/tp-profile   # and where the time goes

Targets on the slow link: ladder >= 1.3x standard's decode tokens/s, and >= 0.9x of the bound. `--slow-link` needs
root and iproute2 (network namespaces, a veth pair, `tc`).
"""

import argparse
import subprocess
import sys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama-3.1-8b")
    parser.add_argument("--layers", default="8")
    parser.add_argument("--batch", default="1,4")
    parser.add_argument("--prompt-len", default="8")
    parser.add_argument("--new-tokens", default="16")
    parser.add_argument("--repeats", default="3")
    parser.add_argument("--link-rate", default="6mbit", help="slow link bandwidth, each way")
    parser.add_argument("--profile", action="store_true", help="also profile decode steps (`serve bench --profile`)")
    parser.add_argument("--profile-dir", help="with --profile: Chrome traces in DIR/loopback, DIR/slow-link")
    args = parser.parse_args()
    bench = [
        sys.executable, "-m", "ladder.serve", "bench", "--tp", "2", "--model", args.model, "--layers", args.layers,
        "--batch", args.batch, "--prompt-len", args.prompt_len, "--new-tokens", args.new_tokens,
        "--repeats", args.repeats,
    ]  # fmt: skip
    profile = ["--profile"] if args.profile else []
    for link, extra in (("loopback", []), ("slow-link", ["--slow-link", "--link-rate", args.link_rate])):
        traces = ["--profile-dir", f"{args.profile_dir}/{link}"] if args.profile_dir else []
        command = [*bench, *extra, *profile, *traces]
        print("$ python " + " ".join(command[1:]), flush=True)
        subprocess.run(command, check=True)
        print(flush=True)


if __name__ == "__main__":
    main()
