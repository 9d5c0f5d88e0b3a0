"""Greedy answers to held-out prompts: does the candidate say what the reference says?

Log-likelihood metrics can look fine while free generation collapses (the paper's GSM8K fell from 85 to 11 after
conversion), so the gate also compares the first tokens the two models actually generate.
"""

import torch
from tqdm.auto import tqdm

from .config import GenerationConfig
from .alpaca import heldout_chats
from .stats import pooled_mean


def greedy_answers(model, tokenizer, config: GenerationConfig) -> list[list[int]]:
    """Each held-out prompt's new tokens up to and including the first end-of-sequence token."""
    prompts = [chat[:-1] for chat in heldout_chats(config.prompts)]
    return generate_greedy(model, tokenizer, prompts, config.max_new_tokens, config.batch_size)


@torch.no_grad()
def generate_greedy(model, tokenizer, chats: list[list[dict]], max_new_tokens: int, batch_size: int) -> list[list[int]]:
    """Greedy answers to chat prompts, in the order given: new tokens up to and including the first end token.

    Batched with left padding, prompts of similar length together (sorted), so short prompts wait on little padding.
    """
    prompts = [tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) for chat in chats]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    stop_ids = set(_as_list(model.generation_config.eos_token_id) or [tokenizer.eos_token_id])
    tokenizer.padding_side = "left"
    answers = {}
    for start in tqdm(range(0, len(order), batch_size), desc="generation"):
        indices = order[start : start + batch_size]
        batch = tokenizer([prompts[i] for i in indices], return_tensors="pt", padding=True,
                          add_special_tokens=False).to(model.device)  # fmt: skip
        output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        for index, row in zip(indices, output[:, batch["input_ids"].shape[1] :].tolist()):
            end = next((i + 1 for i, token in enumerate(row) if token in stop_ids), len(row))
            answers[index] = row[:end]
    return [answers[i] for i in range(len(prompts))]


def compare(reference: list[list[int]], candidate: list[list[int]]) -> dict[str, tuple[float, ...]]:
    """(reference, candidate, their standard errors over the prompts): exact-match rate of the answers, and mean
    length of the common prefix in tokens."""
    pairs = list(zip(reference, candidate))
    exact, exact_stderr = prompt_mean([float(ref == cand) for ref, cand in pairs])
    prefix, prefix_stderr = prompt_mean([float(_common_prefix(ref, cand)) for ref, cand in pairs])
    own_length, own_stderr = prompt_mean([float(len(ref)) for ref in reference])
    return {"generation_exact_match": (1.0, exact, 0.0, exact_stderr),
            "generation_common_prefix": (own_length, prefix, own_stderr, prefix_stderr)}  # fmt: skip


def prompt_mean(values: list[float]) -> tuple[float, float]:
    return pooled_mean(torch.tensor(values), torch.ones(len(values)))


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _as_list(value) -> list[int]:
    return [value] if isinstance(value, int) else list(value or [])
