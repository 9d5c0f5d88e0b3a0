"""`ladder-convert --fit`: repair the rewired modules before any training, by least squares on calibration chats.

A ladder module reads a stale stream: a ladder attention reads A (without the MLP just before it) where the original
read H, a ladder MLP reads H (without its own attention's output) where the original read the fresh A. For each ladder
module a linear map M is fitted (ridge least squares) from the normalised stream it now reads, u = x / rms(x), to the
normalised stream the original read there, t, and folded into the module's input projections with the norm's weight:
W -> W diag(w) M and w -> 1. The checkpoint stays a plain ladder model (no new parameters, no extra compute), and
under tensor parallelism q/k/v and gate/up stay column-parallel, so the overlap is untouched.

Fits run layer by layer from the bottom, each on the streams of the converted model with the lower fits applied. The
original's streams advance beside the converted model's, so memory holds four streams of the calibration chats (not
one per layer). The ridge pulls M towards the identity, the unfitted model: for N tokens,
M^T = (U^T U + r N I)^-1 (U^T T + r N I), where the rows of U and T are the tokens' u and t.
"""

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ladder import LadderLlamaForCausalLM
from ladder.gates.alpaca import TRAIN, alpaca_chat, alpaca_records
from ladder.gates.fidelity import ChatBatch, batch_chats

from .placement import rewire


@dataclass
class Streams:
    """One batch of calibration chats at the depth the fit has reached: the (H, A) entering the current layer in the
    original and in the converted model, and what every layer is called with (mask, rotary embeddings, positions)."""

    tokens: torch.Tensor  # bool: the real (unpadded) positions, the ones the fit uses
    layer_kwargs: dict
    original: tuple[torch.Tensor, torch.Tensor]
    converted: tuple[torch.Tensor, torch.Tensor]


class LeastSquares:
    """The sums a ridge fit of t = M u needs, accumulated over batches of tokens."""

    def __init__(self, dim: int, device: torch.device):
        self.gram = torch.zeros(dim, dim, device=device)  # U^T U
        self.cross = torch.zeros(dim, dim, device=device)  # U^T T
        self.target_square = 0.0  # sum of |t|^2
        self.count = 0

    def add(self, read: torch.Tensor, wanted: torch.Tensor, eps: float) -> None:
        u, t = rms_normalised(read, eps), rms_normalised(wanted, eps)
        self.gram += u.T @ u
        self.cross += u.T @ t
        self.target_square += float(t.pow(2).sum())
        self.count += len(u)

    def solve(self, ridge: float) -> torch.Tensor:
        """M, in float64 for the solve (the Gram matrix of normalised streams is ill-conditioned)."""
        shrink = ridge * self.count * torch.eye(len(self.gram), dtype=torch.float64, device=self.gram.device)
        return torch.linalg.solve(self.gram.double() + shrink, self.cross.double() + shrink).T

    def relative_error(self, M: torch.Tensor | None = None) -> float:
        """|U M^T - T|^2 / |T|^2 over the accumulated tokens; M None is the identity (the unfitted module)."""
        gram, cross = self.gram.double(), self.cross.double()
        M = torch.eye(len(gram), dtype=torch.float64, device=gram.device) if M is None else M
        error = (M @ gram * M).sum() - 2 * (cross * M.T).sum() + self.target_square
        return round(float(error) / self.target_square, 5)


def rms_normalised(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x), as LlamaRMSNorm computes it before its weight."""
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@torch.no_grad()
def fold(M: torch.Tensor, norm: torch.nn.Module, projections: list[torch.nn.Linear]) -> None:
    """Make `projections(norm(x))` compute W diag(w) M (x / rms(x)): W -> W diag(w) M, and the norm's weight -> 1."""
    scale = norm.weight.double()
    for linear in projections:
        linear.weight.copy_((linear.weight.double() * scale) @ M)
    norm.weight.fill_(1.0)


class StopForward(Exception):
    pass


@torch.no_grad()
def calibration_streams(model: LadderLlamaForCausalLM, batches: list[ChatBatch]) -> list[Streams]:
    """Each batch's streams entering the first layer, and the layers' arguments, caught by a hook on that layer."""
    caught = {}

    def catch(layer, args, kwargs):
        caught.update(args=args, kwargs=kwargs)
        raise StopForward  # nothing past the first layer is needed

    streams = []
    hook = model.model.layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for batch in batches:
            try:
                model(input_ids=batch.input_ids.to(model.device), attention_mask=batch.attention_mask.to(model.device),
                      use_cache=False)  # fmt: skip
            except StopForward:
                pass
            H, A = caught["args"][:2]
            streams.append(Streams(batch.attention_mask.bool().to(model.device), caught["kwargs"], (H, A), (H, A)))
    finally:
        hook.remove()
    return streams


@torch.no_grad()
def fit_ladder_layers(model: LadderLlamaForCausalLM, batches: list[ChatBatch], ladder_layers: list[int],
                      ridge: float) -> dict[int, dict]:  # fmt: skip
    """Rewire `model` (the original's weights, no ladder layer yet) as `ladder_layers` with every ladder module's fit
    folded in. Returns, per ladder layer, each module's relative input error on the calibration tokens before and
    after its fit."""
    layers, eps = model.model.layers, model.config.rms_norm_eps
    rewire(model, [])
    streams = calibration_streams(model, batches)
    errors = {}
    for index, layer in enumerate(tqdm(layers[: max(ladder_layers) + 1], desc="fit: layers")):  # none above to fit
        if index < min(ladder_layers):  # below the first ladder layer both models compute the same
            for batch in streams:
                batch.original = batch.converted = layer(*batch.original, **batch.layer_kwargs)
            continue
        attention = LeastSquares(model.config.hidden_size, model.device)
        mlp = LeastSquares(model.config.hidden_size, model.device)
        for batch in streams:
            (H, A), (H_read, A_read), tokens = batch.original, batch.converted, batch.tokens
            batch.original = layer(H, A, **batch.layer_kwargs)  # the original layer, on the original's streams
            if index in ladder_layers:
                # The original's attention read H and its MLP the fresh A; the ladder ones read A and H.
                attention.add(A_read[tokens], H[tokens], eps)
                mlp.add(H_read[tokens], batch.original[1][tokens], eps)
        if index in ladder_layers:
            errors[index] = {
                "attention": fit_module(attention, ridge, layer.input_layernorm, attention_inputs(layer)),
                "mlp": fit_module(mlp, ridge, layer.post_attention_layernorm, mlp_inputs(layer)),
            }
            layer.is_ladder = True
        for batch in streams:
            batch.converted = layer(*batch.converted, **batch.layer_kwargs)
    return errors


def fit_module(fit: LeastSquares, ridge: float, norm: torch.nn.Module, projections: list[torch.nn.Linear]) -> list[float]:
    M = fit.solve(ridge)
    fold(M, norm, projections)
    return [fit.relative_error(), fit.relative_error(M)]


def attention_inputs(layer) -> list[torch.nn.Linear]:
    return [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]


def mlp_inputs(layer) -> list[torch.nn.Linear]:
    return [layer.mlp.gate_proj, layer.mlp.up_proj]


def folded_tensors(model: LadderLlamaForCausalLM, ladder_layers: list[int]) -> dict[str, torch.Tensor]:
    """The checkpoint tensors the fit changed, by name: the ladder layers' norms and input projections."""
    names = ("input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
             "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")  # fmt: skip
    state = model.state_dict()
    return {
        name: state[name].detach().cpu().contiguous()
        for index in ladder_layers
        for name in (f"model.layers.{index}.{module}.weight" for module in names)
    }


@dataclass
class FitSettings:
    chats: int = 256  # Alpaca training rows the fit is measured on (every token of each chat counts)
    ridge: float = 1e-2  # the pull towards the unfitted module, as a share of the calibration tokens


def fit_checkpoint(model: LadderLlamaForCausalLM, tokenizer, ladder_layers: list[int],
                   settings: FitSettings) -> tuple[dict[str, torch.Tensor], dict]:  # fmt: skip
    """Fit `model` (`load_original`'s) as `ladder_layers`: the changed tensors by name, and the record of the fit for
    the provenance file."""
    chats = [alpaca_chat(record) for record in alpaca_records(TRAIN)[: settings.chats]]
    batches = batch_chats(tokenizer, chats, max_length=512, batch_size=8)
    errors = fit_ladder_layers(model, batches, ladder_layers, settings.ridge)
    record = {
        "method": "ridge least squares from each ladder module's normalised input to the original's there, folded "
        "into its input projections, layer by layer from the bottom",
        "calibration_chats": f"Alpaca-5000 training rows 0-{settings.chats - 1}, every token",
        "calibration_tokens": sum(int(batch.attention_mask.sum()) for batch in batches),
        "ridge": settings.ridge,
        "relative_input_error_before_after": errors,
    }
    return folded_tensors(model, ladder_layers), record
