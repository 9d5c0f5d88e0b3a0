"""The Alpaca-5000 split shared by the gates and by training: the gates' held-out slice is never trained on."""

import json
from pathlib import Path

DATA_DIR = Path(__file__).with_name("data")
ALPACA_FILE = DATA_DIR / "alpaca_5000.json"
# The last 500 rows are held out for evaluation; everything before them may be used for training.
HELDOUT = slice(4500, 5000)
TRAIN = slice(0, 4500)


def alpaca_records(split: slice) -> list[dict]:
    return json.loads(ALPACA_FILE.read_text())[split]


def alpaca_chat(record: dict) -> list[dict]:
    """An Alpaca record as a two-turn chat: the instruction (and its input, if any), then the reference answer."""
    prompt = record["instruction"] + (f"\n\n{record['input']}" if record["input"] else "")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]


def heldout_chats(count: int) -> list[list[dict]]:
    records = alpaca_records(HELDOUT)
    if count > len(records):
        raise ValueError(f"the held-out set has {len(records)} chats, {count} were asked for")
    return [alpaca_chat(r) for r in records[:count]]
