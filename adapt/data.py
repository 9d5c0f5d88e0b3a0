"""Training data: TRL's dataset mixture, with Alpaca-style records mapped to chats by the recipe's template."""

from trl import DatasetMixtureConfig, get_dataset

from ladder.gates.alpaca import alpaca_chat

from .recipe import RecipeError

SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
# The columns TRL's SFTTrainer understands, by dataset format.
FORMATS = ({"messages"}, {"prompt", "completion"})
ALPACA_COLUMNS = {"instruction", "input", "output"}


def load_training_data(mixture: DatasetMixtureConfig, template: str):
    try:
        dataset = get_dataset(mixture)["train"]
    except (FileNotFoundError, ValueError) as error:
        raise RecipeError(f"datasets: {str(error).splitlines()[0]}") from None
    columns = set(dataset.column_names)
    if template == "alpaca":
        if not ALPACA_COLUMNS <= columns:
            raise RecipeError(f"dataset_template alpaca needs columns {sorted(ALPACA_COLUMNS)}; the data has {sorted(columns)}")
        return dataset.map(lambda record: {"messages": alpaca_chat(record)}, remove_columns=dataset.column_names)
    if template == "sharegpt":
        if "conversations" not in columns:
            raise RecipeError(f"dataset_template sharegpt needs a 'conversations' column; the data has {sorted(columns)}")
        return dataset.map(lambda record: {"messages": sharegpt_chat(record)}, remove_columns=dataset.column_names)
    if not any(needed <= columns for needed in FORMATS):
        raise RecipeError(
            f"the data has columns {sorted(columns)}: it needs 'messages', or 'prompt' and 'completion' "
            "(or set dataset_template: alpaca for instruction/input/output records)"
        )
    return dataset


def sharegpt_chat(record: dict) -> list[dict]:
    """`conversations: [{from: human|gpt|system, value}]` (e.g. Infinity-Instruct) as chat messages."""
    return [{"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]} for turn in record["conversations"]]
