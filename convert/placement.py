"""Which layers to rewire: the N whose ladder wiring moves the model's output least, found by measuring.

Rewiring one layer alone costs from almost nothing to a broken model depending on the layer (on SmolLM2 the KL over
held-out chats ranged from 0.012 to 2.59), and the damage of a set is not the sum of its layers'. A greedy search
measures sets: starting from none, it adds, N times, the layer whose addition gives the lowest KL(original || model)
on calibration chats from the training data (Alpaca's training rows, never the gates' held-out ones). That is
sum over k < N of (L - k) forward passes of the calibration chats, each from the set's lowest ladder layer up (345 for
SmolLM2's 15 of 30: 46 minutes on 2 shared cores; on a GPU, in bf16, minutes for 8B), and it loads the model, which
`ladder-convert` otherwise never does. The speed-up depends only on how many layers are ladder layers.
"""

import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from ladder import LadderLlamaConfig, LadderLlamaForCausalLM
from ladder.checkpoint import CheckpointError, first_line
from ladder.gates.alpaca import TRAIN, alpaca_chat, alpaca_records
from ladder.gates.fidelity import ChatBatch, batch_chats


@torch.no_grad()
def measured_placement(model: LadderLlamaForCausalLM, tokenizer, count: int, chats: int = 8) -> tuple[list[int], dict]:
    """The `count` layers greedy search picks on `model` (`load_original`'s), and what it measured (for the
    provenance file). Leaves the model wired as its last trial."""
    calibration = [alpaca_chat(record) for record in alpaca_records(TRAIN)[:chats]]
    batches = [Calibration(model, batch) for batch in batch_chats(tokenizer, calibration, max_length=256, batch_size=8)]

    def damage(layers: list[int]) -> float:
        return mean_kl(model, batches, layers)

    chosen, greedy_kl, single_layer_kl = [], [], {}
    candidates = range(model.config.num_hidden_layers)
    with tqdm(total=sum(len(candidates) - k for k in range(count)), desc="placement: layer sets measured") as progress:
        for _ in range(count):
            trials = {}
            for layer in (c for c in candidates if c not in chosen):
                trials[layer] = damage(chosen + [layer])
                progress.update()
            if not chosen:
                single_layer_kl = {layer: round(kl, 5) for layer, kl in trials.items()}
            best = min(trials, key=trials.get)
            chosen.append(best)
            greedy_kl.append(round(trials[best], 5))
    measured = {
        "method": "greedy: the layer whose addition keeps KL(original || model) lowest, one at a time",
        "calibration_chats": f"Alpaca-5000 training rows 0-{chats - 1}, response tokens",
        "single_layer_kl": single_layer_kl,
        "added_in_order": chosen,
        "kl_after_each_addition": greedy_kl,
    }
    return sorted(chosen), measured


def rewire(model: LadderLlamaForCausalLM, ladder_layers: list[int]) -> None:
    """Make exactly `ladder_layers` ladder layers, in place."""
    for index, layer in enumerate(model.model.layers):
        layer.is_ladder = index in ladder_layers


def mean_kl(model: LadderLlamaForCausalLM, batches: list["Calibration"], ladder_layers: list[int]) -> float:
    """KL(original || model) per scored token over `batches`, with `ladder_layers` rewired."""
    rewire(model, ladder_layers)
    scored_tokens = sum(int(batch.scored.sum()) for batch in batches)
    return sum(batch.kl(model, min(ladder_layers)) for batch in batches) / scored_tokens


def load_original(source, config: dict) -> tuple[LadderLlamaForCausalLM, object]:
    """The original's weights in the ladder model with no ladder layer (exactly the original, rewirable in place),
    and its tokenizer."""
    try:  # first: the chats are tokenized with it, and a checkpoint without one is bad input, not a crash
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{source} has no tokenizer that loads, and the chats to measure on need one ({first_line(error)})") from None
    fields = {key: value for key, value in config.items() if key not in ("model_type", "architectures", "auto_map")}
    ladder_config = LadderLlamaConfig(**fields, ladder_layers=[])
    cuda = torch.cuda.is_available()  # 8B: minutes on a GPU in bf16, hours on CPU
    model = LadderLlamaForCausalLM.from_pretrained(source, config=ladder_config, dtype=torch.bfloat16 if cuda else torch.float32)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to("cuda" if cuda else "cpu").eval(), tokenizer


class Calibration:
    """One batch of calibration chats, with what the original computes on it: the streams entering every layer and
    the arguments layers are called with (so a rewired model runs only from its lowest ladder layer up: the layers
    below compute what they always did), and the log-probs of the response tokens."""

    def __init__(self, model: LadderLlamaForCausalLM, batch: ChatBatch):
        self.scored, self.streams, self.layer_kwargs = batch.scored.to(model.device), [], {}
        hooks = [layer.register_forward_pre_hook(self.keep_inputs, with_kwargs=True) for layer in model.model.layers]
        inputs = {"input_ids": batch.input_ids.to(model.device), "attention_mask": batch.attention_mask.to(model.device)}
        try:
            logits = model(**inputs, use_cache=False).logits
        finally:
            for hook in hooks:
                hook.remove()
        self.reference = logits[self.scored].float().log_softmax(-1)

    def keep_inputs(self, layer, args, kwargs):
        self.streams.append(args)  # (H, A) entering the layer
        self.layer_kwargs = kwargs  # the same for every layer: mask, rotary embeddings, positions

    def kl(self, model: LadderLlamaForCausalLM, first: int) -> float:
        """Sum over the scored tokens of KL(original || model), running the model from layer `first` up."""
        H, A = self.streams[first]
        for layer in model.model.layers[first:]:
            H, A = layer(H, A, **self.layer_kwargs)
        log_probs = model.lm_head(model.model.norm(H))[self.scored].float().log_softmax(-1)
        return float((self.reference.exp() * (self.reference - log_probs)).sum())
