"""Datasets for the local ARC tasks: JSONL copies shipped in gates/data, so the tasks run without the Hub."""

from pathlib import Path

import datasets

DATA_DIR = Path(__file__).resolve().parent.parent / "data"


def arc_easy(**kwargs) -> datasets.DatasetDict:
    return datasets.load_dataset("json", data_files={"test": str(DATA_DIR / "ARC-Easy-test.jsonl")})


def arc_challenge(**kwargs) -> datasets.DatasetDict:
    return datasets.load_dataset("json", data_files={"validation": str(DATA_DIR / "ARC-Challenge-validation.jsonl")})
