"""Layer-wise alignment: before end-to-end distillation, each ladder layer learns to reproduce the original's residual
streams after that layer (as LoLCATs, MOHAWK and RADLADS do first when they convert a model).

The original runs once per batch, without gradients or its head, and hooks record at every decoder layer the stream
entering it (h_i) and its post-attention residual (A_i): after layer i the original's H is h_(i+1) and its A is A_i.
The student then runs with its ladder layers teacher-forced: ladder layer i is fed the original's streams at its input
(H = h_i, A = A_(i-1)) instead of its own earlier layers' output, so every ladder layer gets a direct signal and no
error compounds through the others. `inputs: student` skips the forcing (each layer sees what the student's own
earlier layers computed), which is what the model meets at inference.

Per layer the loss is the squared error of both streams divided by the original's mean square there, so deep layers,
whose streams are larger, do not dominate; the layers' losses are averaged.
"""

from functools import partial

import torch
from torch import nn

INPUTS = ("teacher", "student")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a (ladder) Llama, a PEFT wrapper of one or a SharedTrunkTeacher's."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model.layers


class OriginalStreams:
    """Hooks that record, while the original runs, its streams around the given layers (only those: at 8B a stream
    of a 4 x 4096-token batch is 134 MB)."""

    def __init__(self, original: nn.Module, layers: list[int]):
        self.entering: dict[int, torch.Tensor] = {}  # h_i: the stream entering layer i (i = L: the final norm's input)
        self.after_attention: dict[int, torch.Tensor] = {}  # A_i: layer i's post-attention residual
        original_layers = decoder_layers(original)
        entry_points = [*(layer.input_layernorm for layer in original_layers), original.model.norm]
        for index in sorted({i for layer in layers for i in (layer, layer + 1)}):
            entry_points[index].register_forward_pre_hook(partial(self.keep, self.entering, index))
        for index in sorted({i for layer in layers for i in (layer - 1, layer) if i >= 0}):
            attention_residual = original_layers[index].post_attention_layernorm
            attention_residual.register_forward_pre_hook(partial(self.keep, self.after_attention, index))

    @staticmethod
    def keep(store: dict, index: int, module, args):
        store[index] = args[0].detach()

    def streams_before(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(H, A) entering layer `index`; before the first layer both are the embeddings."""
        return self.entering[index], self.after_attention[index - 1] if index else self.entering[0]

    def streams_after(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.entering[index + 1], self.after_attention[index]


class LayerAligner:
    """The alignment loss of a student's `layers` against the original, with the forcing hooks on the student."""

    def __init__(self, student: nn.Module, original: nn.Module, layers: list[int], inputs: str = "teacher"):
        if inputs not in INPUTS:
            raise ValueError(f"alignment inputs must be one of {INPUTS}, not {inputs!r}")
        self.original, self.layers, self.teacher_forced = original, list(layers), inputs == "teacher"
        self.streams = OriginalStreams(original, self.layers)
        self.outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.active = False  # the hooks act only inside `loss`: generation, evaluation and saving see the plain model
        student_layers = decoder_layers(student)
        for index in self.layers:
            student_layers[index].register_forward_pre_hook(partial(self.force_inputs, index))
            student_layers[index].register_forward_hook(partial(self.keep_outputs, index))

    def force_inputs(self, index: int, module, args):
        if self.active and self.teacher_forced:
            return (*self.streams.streams_before(index), *args[2:])
        return None

    def keep_outputs(self, index: int, module, args, output):
        if self.active:
            self.outputs[index] = output

    def loss(self, student: nn.Module, model_inputs: dict) -> tuple[torch.Tensor, dict[int, float]]:
        """Mean over the aligned layers of their normalised stream errors, and each layer's value."""
        with torch.no_grad():
            self.original.model(**model_inputs)  # the decoder only: no head
        self.active = True
        try:
            student(**model_inputs, logits_to_keep=1)  # the head on one position only: its output is not used
        finally:
            self.active = False
        per_layer = {}
        for index in self.layers:
            (H, A), (target_H, target_A) = self.outputs.pop(index), self.streams.streams_after(index)
            per_layer[index] = relative_error(H, target_H) + relative_error(A, target_A)
        loss = torch.stack(list(per_layer.values())).mean()
        return loss, {index: value.item() for index, value in per_layer.items()}


def relative_error(value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the mean square of the target (its scale at that depth)."""
    return (value.float() - target.float()).pow(2).mean() / target.float().pow(2).mean().clamp(min=1e-12)
