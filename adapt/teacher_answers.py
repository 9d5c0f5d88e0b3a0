"""Self-distillation data: the original model's own greedy answers to a dataset's prompts, as training targets.

    python -m ladder.adapt.teacher_answers ORIGINAL DATA.json OUTPUT.json [--rows 0:4500] [--max-new-tokens 256]

DATA holds Alpaca-layout records (instruction, input, output), as the SmolLM2 recipe's files do. OUTPUT gets the same
records with every `output` replaced by ORIGINAL's greedy answer to the same chat prompt, so a recipe trains on the
teacher's answers by pointing its `data_files` at OUTPUT. Answers cut off at --max-new-tokens are kept as they are.
Given a converted checkpoint instead of the original, it writes that model's own answers: data on which distillation
is on-policy for the model it starts from.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ladder.checkpoint import staged
from ladder.gates.alpaca import alpaca_chat
from ladder.gates.generation import generate_greedy


def teacher_answers(model, tokenizer, records: list[dict], max_new_tokens: int, batch_size: int) -> list[dict]:
    """The records with each `output` replaced by the model's greedy answer to the record's prompt."""
    prompts = [alpaca_chat(record)[:-1] for record in records]
    answers = generate_greedy(model, tokenizer, prompts, max_new_tokens, batch_size)
    return [record | {"output": tokenizer.decode(answer, skip_special_tokens=True).strip()}
            for record, answer in zip(records, answers)]  # fmt: skip


def read_records(path: Path, rows: str) -> list[dict]:
    if not path.is_file():
        raise ValueError(f"{path} does not exist")
    try:
        records = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read {path}: {error}") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) and {"instruction", "input", "output"} <= r.keys() for r in records):
        raise ValueError(f"{path} is not a JSON list of Alpaca records (instruction, input, output)")
    start, _, end = rows.partition(":")
    if not (start or "0").isdigit() or not (end or "0").isdigit():
        raise ValueError(f"--rows must look like START:END (e.g. 0:4500), not {rows!r}")
    return records[int(start or 0) : int(end) if end else None]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("original", help="the model that answers: the original checkpoint (directory or Hub id), or a converted one")
    parser.add_argument("data", type=Path, help="Alpaca-layout JSON records")
    parser.add_argument("output", type=Path, help="where the records with the model's answers go")
    parser.add_argument("--rows", default=":", help="START:END slice of the records (default: all)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    try:
        records = read_records(args.data, args.rows)
        tokenizer = AutoTokenizer.from_pretrained(args.original)
        model = AutoModelForCausalLM.from_pretrained(args.original, dtype="auto")
    except (ValueError, OSError) as error:
        print(f"teacher_answers: error: {str(error).splitlines()[0]}", file=sys.stderr)
        return 2
    model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    answered = teacher_answers(model, tokenizer, records, args.max_new_tokens, args.batch_size)
    with staged(args.output, directory=False) as partial:
        partial.write_text(json.dumps(answered, indent=1, ensure_ascii=False))
    print(f"{len(records)} answers: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
