"""Small pieces around TRL's SFTTrainer: distillation from the original, a token budget, layer freezing.

TRL's DistillationTrainer distills on the student's own generations with a generalized JSD; healing a converted
model wants the plain mixture alpha * KL(teacher || student) + (1 - alpha) * CE on the dataset's tokens, with the
original (same tokenizer) as teacher, so this is a small SFTTrainer subclass rather than a training loop of our own.
"""

import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import TrainerCallback
from trl import SFTTrainer, get_peft_config
from trl.models import prepare_deepspeed


class DistillingSFTTrainer(SFTTrainer):
    """SFT whose loss mixes in KL(teacher || student) at a temperature; alpha = 0 is exactly TRL's SFT.

    With an `aligner`, the first `align_tokens` of training are layer-wise alignment (adapt/alignment.py) instead.
    """

    def __init__(self, *args, teacher=None, alpha: float = 0.0, temperature: float = 1.0, aligner=None,
                 align_tokens: int = 0, **kwargs):  # fmt: skip
        super().__init__(*args, **kwargs)
        self.teacher, self.alpha, self.temperature = teacher, alpha, temperature
        self.aligner, self.align_tokens = aligner, align_tokens
        placed = {}  # the teacher can be the aligner's original: one model, placed once

        def place(model):
            if id(model) not in placed:
                placed[id(model)] = self.place_frozen(model)
            return placed[id(model)]

        if aligner is not None:
            aligner.original = place(aligner.original)
        if isinstance(teacher, SharedTrunkTeacher):
            teacher.teacher = place(teacher.teacher)
        elif teacher is not None:
            self.teacher = place(teacher)

    def create_model_card(self, *args, **kwargs):
        """None: TRL's card (written at every checkpoint) would describe a fine-tune of an unnamed model, in the run
        folder, before any gate. The model's card is ladder-publish's, written from the gate reports."""

    def place_frozen(self, model):
        """A frozen model (teacher, original) ready to run beside the student: a whole copy on every device, except
        under ZeRO-3, where transformers loaded it partitioned (zero.Init) and only a DeepSpeed engine runs it."""
        model.eval().requires_grad_(False)
        return prepare_deepspeed(model, self.accelerator) if self.is_deepspeed_enabled else model.to(self.args.device)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.aligner is not None and self.state.num_input_tokens_seen <= self.align_tokens:
            return self.alignment_loss(model, inputs, return_outputs)
        if self.aligner is not None and self.model.training:
            self.forget_alignment_moments()
        if self.teacher is None or self.alpha == 0:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs["labels"]
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"} | {"use_cache": False}
        student_logits = model(**model_inputs).logits[:, :-1]
        with torch.no_grad():
            teacher_logits = self.teacher(**model_inputs).logits[:, :-1]
        targets = labels[:, 1:]
        scored = targets != -100
        count = num_items_in_batch if num_items_in_batch is not None else scored.sum()
        count = torch.as_tensor(count, device=student_logits.device).clamp(min=1)
        ce, kl = distillation_sums(student_logits, teacher_logits, targets, self.temperature)
        loss = (self.alpha * kl + (1 - self.alpha) * ce) / count
        if self.model.training:
            self._metrics["train"].setdefault("distill_kl", []).append((kl / scored.sum().clamp(min=1)).item())
        return (loss, None) if return_outputs else loss

    def forget_alignment_moments(self):
        """Start AdamW afresh at distillation's first step. Its second moments, averaged over alignment's gradients
        (about a tenth of distillation's), would scale distillation's first tens of updates several times too large:
        on SmolLM2 the held-out KL rose from 0.299 to 0.348 in distillation's first 29k tokens, and a 150k-token run
        ended at 0.273 instead of 0.237. The mark lives in the optimizer's parameter groups, which checkpoints keep,
        so a resumed run does not clear them twice."""
        groups = self.optimizer.param_groups
        if groups[0].get("distilling"):
            return
        optimizer = self.optimizer
        while hasattr(optimizer, "optimizer"):  # accelerate's and DeepSpeed's wrappers: the moments are the innermost's
            optimizer = optimizer.optimizer
        optimizer.state.clear()
        for group in groups:
            group["distilling"] = True

    def alignment_loss(self, model, inputs, return_outputs):
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"} | {"use_cache": False}
        loss, per_layer = self.aligner.loss(model, model_inputs)
        if self.model.training:
            self._metrics["train"].setdefault("align_loss", []).append(loss.item())
        # A mean over this micro-batch: the Trainer leaves the accumulation scaling to losses that count tokens.
        loss = loss / getattr(self, "current_gradient_accumulation_steps", 1)
        return (loss, None) if return_outputs else loss


# Logit values taken at once in fp32: 512 MB per copy. SmolLM2's 2,048-token step (49k words) is one chunk; at 8B
# (128k words, 4 x 4096 tokens) whole fp32 copies of the logits would be 8 GB each, so it goes 1,024 rows at a time.
CHUNK_VALUES = 1 << 27


def distillation_sums(student_logits, teacher_logits, targets, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums over the scored tokens (targets != -100) of CE on the targets and KL(teacher || student) at `temperature`.
    Past one chunk of rows, each chunk's fp32 work is recomputed in the backward pass instead of being kept."""
    vocab = student_logits.shape[-1]
    student, teacher, targets = student_logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab), targets.reshape(-1)
    rows = max(1, CHUNK_VALUES // vocab)
    if rows >= len(targets):
        return chunk_sums(student, teacher, targets, temperature)
    sums = [checkpoint(chunk_sums, student[start : start + rows], teacher[start : start + rows],
                       targets[start : start + rows], temperature, use_reentrant=False)
            for start in range(0, len(targets), rows)]  # fmt: skip
    return sum(ce for ce, _ in sums), sum(kl for _, kl in sums)


def chunk_sums(student_logits, teacher_logits, targets, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    scored = targets != -100
    # Every vocabulary-wide pass costs on CPU: one log_softmax each, shared by CE and KL at T = 1, and no copy of the
    # scored rows (with packing nearly every row is scored; the rest are masked out at the end).
    student_log_probs = student_logits.float().log_softmax(-1)
    target_log_probs = student_log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    ce = -(target_log_probs * scored).sum()
    if temperature != 1:
        student_log_probs = (student_logits.float() / temperature).log_softmax(-1)
        teacher_logits = teacher_logits.float() / temperature
    teacher_log_probs = teacher_logits.float().log_softmax(-1)
    kl_per_token = F.kl_div(student_log_probs, teacher_log_probs, log_target=True, reduction="none").sum(-1)
    return ce, (kl_per_token * scored).sum()


class TokenBudget(TrainerCallback):
    """Stop (and save) once `budget` non-padding tokens have been trained on; the count lives in the trainer state,
    so a resumed run never counts a token twice."""

    def __init__(self, budget: int):
        self.budget = budget

    def on_step_end(self, args, state, control, **kwargs):
        if state.num_input_tokens_seen >= self.budget:
            control.should_training_stop = True
            control.should_save = True


class TrainingClock(TrainerCallback):
    """Logs `train_seconds`, the training time so far (resumed runs included), so methods compare at equal time."""

    def on_train_begin(self, args, state, control, **kwargs):
        logged = [entry["train_seconds"] for entry in state.log_history if "train_seconds" in entry]
        self.before, self.start = max(logged, default=0.0), time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs:  # the Trainer has already put a copy of `logs` into the history
            logs["train_seconds"] = state.log_history[-1]["train_seconds"] = round(
                self.before + time.perf_counter() - self.start, 1
            )


class LadderRamp(TrainerCallback):
    """Progressive conversion: the ladder layers of `layers` (decoder layers, in the order to switch them on) run
    standard wiring until their turn, one more switched on every `tokens / len(layers)` training tokens, the first
    from the start. Set from the token count in the trainer state, so a resumed run is wired as it was; the saved
    config always names every ladder layer, so a checkpoint is the ladder model whatever the step."""

    def __init__(self, layers: list[nn.Module], tokens: float):
        self.layers, self.tokens = layers, tokens

    def switched_on(self, tokens_seen: int) -> int:
        return min(len(self.layers), 1 + int(len(self.layers) * tokens_seen / self.tokens))

    def on_step_begin(self, args, state, control, **kwargs):
        on = self.switched_on(state.num_input_tokens_seen)
        for rank, layer in enumerate(self.layers):
            layer.is_ladder = rank < on

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs:
            logs["ladder_layers_on"] = state.log_history[-1]["ladder_layers_on"] = sum(layer.is_ladder for layer in self.layers)

    def on_train_end(self, args, state, control, **kwargs):
        for layer in self.layers:
            layer.is_ladder = True


class SharedTrunkTeacher(nn.Module):
    """The teacher from layer `first` up, fed the student's hidden state after layer `first - 1`.

    When the student's layers below its first ladder layer (and its embeddings) are the teacher's own weights, frozen,
    the student computes exactly the teacher's hidden state there: the trunk then runs once per step instead of twice.
    A hook on the student's last trunk layer keeps that state; the student must run before the teacher (it does in
    DistillingSFTTrainer.compute_loss).
    """

    def __init__(self, teacher, student_trunk_end: nn.Module, first: int):
        super().__init__()
        teacher.model.layers = teacher.model.layers[first:]
        self.teacher, self.first = teacher, first
        student_trunk_end.register_forward_hook(self.keep_trunk_output)

    def keep_trunk_output(self, module, args, output):
        self.trunk_output = output[0].detach()  # the ladder block returns (H, A); a standard layer's H is Llama's

    def forward(self, input_ids=None, **kwargs):
        return self.teacher(inputs_embeds=self.trunk_output, **kwargs)


def share_trunk(student, teacher):
    """The teacher wrapped as a SharedTrunkTeacher when the student's trunk is the teacher's, frozen; else unchanged."""
    first = min(student.config.ladder_layers, default=0)
    if first == 0:
        return teacher
    trunk = ("model.embed_tokens.", *(f"model.layers.{i}." for i in range(first)))
    teacher_parameters = dict(teacher.named_parameters())
    for name, parameter in student.named_parameters():
        if name.startswith(trunk) and (
            parameter.requires_grad or name not in teacher_parameters or not torch.equal(parameter, teacher_parameters[name])
        ):
            return teacher
    return SharedTrunkTeacher(teacher, student.model.layers[first - 1], first)


def freeze_all_but(model, layer_indices: list[int]) -> int:
    """Train only the given decoder layers; returns the number of trainable parameters."""
    model.requires_grad_(False)
    for index in layer_indices:
        model.model.layers[index].requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_config(recipe, ladder_layers: list[int]):
    """The recipe's LoRA config (None without `use_peft`); with `train_layers: ladder` on the ladder layers only."""
    peft_config = get_peft_config(recipe.model)
    if peft_config is not None and recipe.ladder.train_layers == "ladder":
        peft_config.layers_to_transform = ladder_layers
    return peft_config
