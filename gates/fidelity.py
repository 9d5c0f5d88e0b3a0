"""Fidelity to the reference on held-out chats: KL(reference || candidate), top-1 agreement, response perplexity.

Only response tokens count (the chat template is applied; the prompt is context). The reference's side is computed
once and cached: per response token its top-k log-probs and the log-prob of the true token. KL is then taken over
those k tokens plus one bucket holding the rest of the mass: a lower bound of the exact KL, within 1% of it at k=512
on SmolLM2 (measured from 0.3 to 1.5 nats; checked in the tests).
"""

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .config import FidelityConfig
from .alpaca import heldout_chats
from .stats import pooled_mean


@dataclass
class ChatBatch:
    input_ids: torch.Tensor  # right-padded
    attention_mask: torch.Tensor
    scored: torch.Tensor  # bool: position t's prediction (of token t+1) is a response token


def tokenize_chat(tokenizer, chat: list[dict], max_length: int) -> tuple[list[int], int]:
    """Token ids of the whole chat and how many of them are the prompt."""
    prompt = tokenizer.apply_chat_template(chat[:-1], add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(chat, tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("the chat template renders the prompt differently inside the full chat")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"]
    return (prompt_ids + response_ids)[:max_length], len(prompt_ids)


def chat_batches(tokenizer, config: FidelityConfig) -> list[ChatBatch]:
    return batch_chats(tokenizer, heldout_chats(config.chats), config.max_length, config.batch_size)


def batch_chats(tokenizer, chats: list[list[dict]], max_length: int, batch_size: int) -> list[ChatBatch]:
    """Right-padded batches of similar lengths, each chat's response tokens marked as scored."""
    chats = [tokenize_chat(tokenizer, chat, max_length) for chat in chats]
    chats = [c for c in chats if c[1] < len(c[0])]  # a prompt that fills max_length leaves nothing to score
    chats.sort(key=lambda c: len(c[0]))  # similar lengths together: less padding
    batches = []
    for start in range(0, len(chats), batch_size):
        group = chats[start : start + batch_size]
        width = max(len(ids) for ids, _ in group)
        input_ids = torch.full((len(group), width), tokenizer.pad_token_id)
        attention_mask = torch.zeros((len(group), width), dtype=torch.long)
        scored = torch.zeros((len(group), width), dtype=torch.bool)
        for row, (ids, prompt_length) in enumerate(group):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
            scored[row, prompt_length - 1 : len(ids) - 1] = True
        batches.append(ChatBatch(input_ids, attention_mask, scored))
    return batches


@torch.no_grad()
def response_log_probs(model, batch: ChatBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs over the vocabulary at scored positions [N, V], and of the true next token [N]."""
    device = model.device
    logits = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device)).logits
    log_probs = logits.float().log_softmax(-1)[batch.scored.to(device)]
    targets = batch.input_ids.roll(-1, dims=1)[batch.scored].to(device)
    return log_probs, log_probs.gather(1, targets[:, None])[:, 0]


def reference_targets(model, batches: list[ChatBatch], top_k: int) -> dict:
    """What the candidate is compared with; small enough to cache (tokens x top_k)."""
    top_logp, top_ids, true_logp = [], [], []
    for batch in tqdm(batches, desc="fidelity: reference"):
        log_probs, true = response_log_probs(model, batch)
        values, indices = log_probs.topk(top_k, dim=-1)
        top_logp.append(values.cpu())
        top_ids.append(indices.int().cpu())
        true_logp.append(true.cpu())
    return {"top_logp": torch.cat(top_logp), "top_ids": torch.cat(top_ids), "true_logp": torch.cat(true_logp)}


def bucketed_kl(reference_top_logp: torch.Tensor, candidate_top_logp: torch.Tensor) -> torch.Tensor:
    """KL over the reference's top-k tokens plus one bucket for all the others, per token."""
    tiny = torch.finfo(torch.float32).tiny
    ref_rest = (1 - reference_top_logp.exp().sum(-1)).clamp_min(tiny)
    cand_rest = (1 - candidate_top_logp.exp().sum(-1)).clamp_min(tiny)
    top = (reference_top_logp.exp() * (reference_top_logp - candidate_top_logp)).sum(-1)
    return top + ref_rest * (ref_rest.log() - cand_rest.log())


def compare(model, batches: list[ChatBatch], reference: dict) -> dict[str, tuple[float, ...]]:
    """(reference, candidate, reference stderr, candidate stderr) of each fidelity metric. Each is a mean over all
    response tokens; its standard error takes the chats as the independent samples."""
    kl, agree, true_logp = [], [], []
    offset = 0
    for batch in tqdm(batches, desc="fidelity: candidate"):
        log_probs, true = response_log_probs(model, batch)
        count = len(true)
        ref_ids = reference["top_ids"][offset : offset + count].to(log_probs.device, torch.long)
        ref_top = reference["top_logp"][offset : offset + count].to(log_probs.device)
        kl.append(bucketed_kl(ref_top, log_probs.gather(1, ref_ids)).cpu())
        agree.append((log_probs.argmax(-1) == ref_ids[:, 0]).cpu())
        true_logp.append(true.cpu())
        offset += count
    if offset != len(reference["true_logp"]):
        raise ValueError("the cached reference does not match these chats")
    tokens = torch.cat([batch.scored.sum(1) for batch in batches])  # per chat, in the order of the values
    kl, kl_stderr = chat_mean(torch.cat(kl).clamp_min(0), tokens)
    agreement, agreement_stderr = chat_mean(torch.cat(agree).float(), tokens)
    reference_perplexity, reference_stderr = perplexity(chat_mean(reference["true_logp"], tokens))
    candidate_perplexity, candidate_stderr = perplexity(chat_mean(torch.cat(true_logp), tokens))
    return {
        "kl": (0.0, kl, 0.0, kl_stderr),
        "top1_agreement": (1.0, agreement, 0.0, agreement_stderr),
        "response_perplexity": (reference_perplexity, candidate_perplexity, reference_stderr, candidate_stderr),
    }


def chat_mean(values: torch.Tensor, tokens: torch.Tensor) -> tuple[float, float]:
    """The mean of per-token `values` over every chat's `tokens`, and its standard error over the chats."""
    return pooled_mean(torch.stack([chat.sum() for chat in values.split(tokens.tolist())]), tokens)


def perplexity(mean_log_prob: tuple[float, float]) -> tuple[float, float]:
    """exp(-mean log-prob) and its standard error by the delta method (d exp(x) = exp(x) dx)."""
    value, stderr = mean_log_prob
    return math.exp(-value), math.exp(-value) * stderr
