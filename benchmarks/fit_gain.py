"""What `ladder-convert --fit` buys before any training: KL(original || converted) on chats the fit never saw,
without the fit and with it at each calibration size and ridge strength, inputs only or inputs and outputs, in one run.

    python benchmarks/fit_gain.py                                   # SmolLM2, the demo's 15 layers
    python benchmarks/fit_gain.py --settings 48:0.01:inputs,128:0.1:0.3 --layers 15-29

The chats measured on are Alpaca training rows 4476-4499 (the fit takes rows from 0 up; the gates' held-out rows are
never used), every response token, the exact KL over the whole vocabulary.
"""

import argparse
import copy
import time
from pathlib import Path

import torch

from ladder.checkpoint import read_json_object
from ladder.convert.converter import parse_layers
from ladder.convert.fit import FitSettings, fit_checkpoint
from ladder.convert.placement import Calibration, load_original, mean_kl
from ladder.convert.smollm2 import fetch_smollm2
from ladder.gates.alpaca import TRAIN, alpaca_chat, alpaca_records
from ladder.gates.fidelity import batch_chats

MEASURED_ROWS = slice(4476, TRAIN.stop)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="original checkpoint (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--layers", default="4-8,14,20-28", help="ladder layers (default: the demo's)")
    parser.add_argument("--settings", help="chats:ridge:output ridge (or inputs, for the input fits only), ...",
                        default="256:0.01:inputs,256:0.01:0.03,256:0.01:0.1,256:0.01:0.3,256:0.01:1,256:0.01:3")
    args = parser.parse_args()
    source = Path(args.model) if args.model else fetch_smollm2()
    model, tokenizer = load_original(source, read_json_object(source / "config.json", ""))
    layers = parse_layers(args.layers, model.config.num_hidden_layers)
    chats = [alpaca_chat(record) for record in alpaca_records(MEASURED_ROWS)]
    measured = [Calibration(model, batch) for batch in batch_chats(tokenizer, chats, max_length=512, batch_size=4)]
    for batch in measured:  # only the streams entering the first ladder layer are needed: memory
        batch.streams = batch.streams[: min(layers) + 1]
    tokens = sum(int(batch.scored.sum()) for batch in measured)
    original = copy.deepcopy(model.state_dict())

    @torch.no_grad()
    def kl() -> float:
        return mean_kl(model, measured, layers)

    print(f"{len(layers)} ladder layers {args.layers}; KL over {tokens} response tokens of {len(chats)} chats")
    print("| calibration chats | ridge | output ridge | KL | fit seconds |\n| ---: | ---: | ---: | ---: | ---: |")
    print(f"| no fit | | | {kl():.4f} | |", flush=True)
    for setting in args.settings.split(","):
        chats_count, ridge, output_ridge = setting.split(":")
        output_ridge = None if output_ridge == "inputs" else float(output_ridge)
        settings = FitSettings(int(chats_count), float(ridge), output_ridge)
        model.load_state_dict(original)
        start = time.perf_counter()
        fit_checkpoint(model, tokenizer, layers, settings)
        seconds, refits = time.perf_counter() - start, output_ridge or "inputs only"
        print(f"| {chats_count} | {ridge} | {refits} | {kl():.4f} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
