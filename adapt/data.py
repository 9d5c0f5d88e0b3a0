"""Training data: TRL's dataset mixture, with Alpaca-style records mapped to chats by the recipe's template."""

from trl import DatasetMixtureConfig, get_dataset

from ladder.checkpoint import first_line
from ladder.gates.alpaca import alpaca_chat

from .recipe import RecipeError

SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
# The columns TRL's SFTTrainer understands, by dataset format.
FORMATS = ({"messages"}, {"prompt", "completion"})
ALPACA_COLUMNS = {"instruction", "input", "output"}


def load_training_data(mixture: DatasetMixtureConfig, template: str):
    """The mixture, every row checked for what the template reads, before any model loads."""
    try:
        dataset = get_dataset(mixture)["train"]
    except Exception as error:  # datasets and pyarrow raise many kinds for a file that is not JSON, or binary
        raise RecipeError(f"datasets: {first_line(error)}") from None
    if len(dataset) == 0:
        raise RecipeError("datasets: the data has no rows")
    columns = set(dataset.column_names)
    if template == "alpaca":
        if not ALPACA_COLUMNS <= columns:
            raise RecipeError(f"dataset_template alpaca needs columns {sorted(ALPACA_COLUMNS)}; the data has {sorted(columns)}")
        check_rows(dataset, {"instruction": is_text, "input": lambda value: value is None or is_text(value), "output": is_text})
        return dataset.map(lambda record: {"messages": alpaca_chat(record)}, remove_columns=dataset.column_names)
    if template == "sharegpt":
        if "conversations" not in columns:
            raise RecipeError(f"dataset_template sharegpt needs a 'conversations' column; the data has {sorted(columns)}")
        check_rows(dataset, {"conversations": is_sharegpt_chat})
        return dataset.map(lambda record: {"messages": sharegpt_chat(record)}, remove_columns=dataset.column_names)
    needed = next((needed for needed in FORMATS if needed <= columns), None)
    if needed is None:
        raise RecipeError(
            f"the data has columns {sorted(columns)}: it needs 'messages', or 'prompt' and 'completion' "
            "(or set dataset_template: alpaca for instruction/input/output records)"
        )
    check_rows(dataset, {column: lambda value: is_text(value) or is_chat(value) for column in needed})
    return dataset


def check_rows(dataset, valid: dict) -> None:
    """Each column's values, row by row: a null, a number or a malformed chat is named with its row."""
    for column, is_valid in valid.items():
        for row, value in enumerate(dataset[column]):
            if not is_valid(value):
                raise RecipeError(f"datasets: row {row} has {column} {str(value)[:60]!r}, which is not text (or a chat)")


def is_text(value: object) -> bool:
    return isinstance(value, str)


def is_chat(value: object) -> bool:
    """Chat messages: [{role, content}], text both."""
    return isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and is_text(m.get("role")) and is_text(m.get("content")) for m in value
    )


def is_sharegpt_chat(value: object) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(turn, dict) and turn.get("from") in SHAREGPT_ROLES and is_text(turn.get("value")) for turn in value
    )


def sharegpt_chat(record: dict) -> list[dict]:
    """`conversations: [{from: human|gpt|system, value}]` (e.g. Infinity-Instruct) as chat messages."""
    return [{"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]} for turn in record["conversations"]]
