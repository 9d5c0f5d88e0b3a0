"""`ladder-convert --fit`: repair the rewired modules before any training, by least squares on calibration chats.

A ladder module reads a stale stream: a ladder attention reads A (without the MLP just before it) where the original
read H, a ladder MLP reads H (without its own attention's output) where the original read the fresh A. For each ladder
module a linear map M is fitted (ridge least squares) from the normalised stream it now reads, u = x / rms(x), to the
normalised stream the original read there, t, and folded into the module's input projections with the norm's weight:
W -> W diag(w) M and w -> 1. Then its output projection (o_proj, down_proj) is refitted so that the layer's streams
land where the original's did. The checkpoint stays a plain ladder model (no new parameters, no extra compute), and
under tensor parallelism q/k/v and gate/up stay column-parallel and o_proj and down_proj row-parallel, so the overlap
is untouched.

Fits run layer by layer from the bottom, each on the streams of the converted model with the lower fits applied. The
original's streams advance beside the converted model's, so memory holds four streams of the calibration chats (not
one per layer). Each ridge pulls towards what the module computes unfitted: for inputs X, wanted outputs Y and the
unfitted map P (the identity for the inputs, the weight for an output projection), B = (X^T X + r s I)^-1 (X^T Y +
r s P) with s = trace(X^T X) / inputs.
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
    """The sums a ridge fit of y = x B needs (rows are tokens), accumulated over batches."""

    def __init__(self, inputs: int, outputs: int, device: torch.device):
        self.gram = torch.zeros(inputs, inputs, device=device)  # X^T X
        self.cross = torch.zeros(inputs, outputs, device=device)  # X^T Y
        self.target_square = 0.0  # sum of |y|^2

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.float(), y.float()
        self.gram += x.T @ x
        self.cross += x.T @ y
        self.target_square += float(y.pow(2).sum())

    def solve(self, prior: torch.Tensor, ridge: float) -> torch.Tensor:
        """B pulled towards `prior` (what the module computes now) with strength `ridge` relative to the inputs' mean
        square: B = (X^T X + r s I)^-1 (X^T Y + r s prior), s = trace(X^T X) / inputs, in float64 for the solve (the
        Gram matrix of the streams is ill-conditioned)."""
        gram, prior = self.gram.double(), prior.double()
        shrink = ridge * gram.trace() / len(gram)
        eye = torch.eye(len(gram), dtype=torch.float64, device=gram.device)
        return torch.linalg.solve(gram + shrink * eye, self.cross.double() + shrink * prior)

    def relative_error(self, B: torch.Tensor) -> float:
        """|X B - Y|^2 / |Y|^2 over the accumulated tokens."""
        B = B.double()
        error = (B * (self.gram.double() @ B)).sum() - 2 * (self.cross.double() * B).sum() + self.target_square
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
                      ridge: float, output_ridge: float | None) -> dict[int, dict]:  # fmt: skip
    """Rewire `model` (the original's weights, no ladder layer yet) as `ladder_layers` with every ladder module's fit
    folded in: its inputs at `ridge`, then (unless `output_ridge` is None) its output projection. Returns, per ladder
    layer, each fit's relative error on the calibration tokens before and after it."""
    layers, eps = model.model.layers, model.config.rms_norm_eps
    rewire(model, [])
    streams = calibration_streams(model, batches)
    errors = {}
    for index, layer in enumerate(tqdm(layers[: max(ladder_layers) + 1], desc="fit: layers")):  # none above to fit
        if index < min(ladder_layers):  # below the first ladder layer both models compute the same
            for batch in streams:
                batch.original = batch.converted = layer(*batch.original, **batch.layer_kwargs)
            continue
        hidden = model.config.hidden_size
        attention, mlp = LeastSquares(hidden, hidden, model.device), LeastSquares(hidden, hidden, model.device)
        for batch in streams:
            (H, A), (H_read, A_read), tokens = batch.original, batch.converted, batch.tokens
            batch.original = layer(H, A, **batch.layer_kwargs)  # the original layer, on the original's streams
            if index in ladder_layers:
                # The original's attention read H and its MLP the fresh A; the ladder ones read A and H.
                attention.add(rms_normalised(A_read[tokens], eps), rms_normalised(H[tokens], eps))
                mlp.add(rms_normalised(H_read[tokens], eps), rms_normalised(batch.original[1][tokens], eps))
        if index in ladder_layers:
            errors[index] = {
                "attention_input": fit_input(attention, ridge, layer.input_layernorm, attention_inputs(layer)),
                "mlp_input": fit_input(mlp, ridge, layer.post_attention_layernorm, mlp_inputs(layer)),
            }
            layer.is_ladder = True
            if output_ridge is not None:
                errors[index] |= fit_outputs(layer, streams, output_ridge)
        for batch in streams:
            batch.converted = layer(*batch.converted, **batch.layer_kwargs)
    return errors


def fit_input(fit: LeastSquares, ridge: float, norm: torch.nn.Module,
              projections: list[torch.nn.Linear]) -> list[float]:  # fmt: skip
    identity = torch.eye(len(fit.gram), device=fit.gram.device)  # the unfitted module reads u itself
    B = fit.solve(identity, ridge)
    fold(B.T, norm, projections)
    return [fit.relative_error(identity), fit.relative_error(B)]


@torch.no_grad()
def fit_outputs(layer, streams: list[Streams], ridge: float) -> dict[str, list[float]]:
    """Refit the ladder layer's o_proj and down_proj (inputs already fitted) so that its streams land where the
    original's did: A = H + a towards the original's A (a also makes up for the drift of H below), and the MLP's
    output towards the original MLP's output."""
    o_proj, down_proj = layer.self_attn.o_proj, layer.mlp.down_proj
    attention = LeastSquares(o_proj.in_features, o_proj.out_features, o_proj.weight.device)
    mlp = LeastSquares(down_proj.in_features, down_proj.out_features, down_proj.weight.device)
    read = {}
    hooks = [module.register_forward_pre_hook(lambda module, args: read.__setitem__(module, args[0]))
             for module in (o_proj, down_proj)]  # fmt: skip
    try:
        for batch in streams:
            layer(*batch.converted, **batch.layer_kwargs)
            (H, A), H_read, tokens = batch.original, batch.converted[0], batch.tokens
            attention.add(read[o_proj][tokens], (A - H_read)[tokens])
            mlp.add(read[down_proj][tokens], (H - A)[tokens])
    finally:
        for hook in hooks:
            hook.remove()
    return {"attention_output": refit(attention, ridge, o_proj), "mlp_output": refit(mlp, ridge, down_proj)}


def refit(fit: LeastSquares, ridge: float, linear: torch.nn.Linear) -> list[float]:
    before = linear.weight.T
    B = fit.solve(before, ridge)
    errors = [fit.relative_error(before), fit.relative_error(B)]
    linear.weight.copy_(B.T)
    return errors


def attention_inputs(layer) -> list[torch.nn.Linear]:
    return [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]


def mlp_inputs(layer) -> list[torch.nn.Linear]:
    return [layer.mlp.gate_proj, layer.mlp.up_proj]


def fitted_tensors(model: LadderLlamaForCausalLM, ladder_layers: list[int], outputs: bool) -> dict[str, torch.Tensor]:
    """The checkpoint tensors the fit changed, by name: the ladder layers' norms and input projections, and with
    `outputs` their output projections."""
    names = ("input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
             "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")  # fmt: skip
    names += ("self_attn.o_proj", "mlp.down_proj") if outputs else ()
    state = model.state_dict()
    return {
        name: state[name].detach().cpu().contiguous()
        for index in ladder_layers
        for name in (f"model.layers.{index}.{module}.weight" for module in names)
    }


@dataclass
class FitSettings:
    chats: int = 256  # Alpaca training rows the fit is measured on (every token of each chat counts)
    ridge: float = 1e-2  # the input fits' pull towards the unfitted module, relative to the inputs' mean square
    output_ridge: float | None = None  # the same for refitting o_proj and down_proj; None leaves them as they are


OUTPUT_RIDGE = 1.0  # `--fit-outputs`' default: the best of 0.03-3 in benchmarks/fit_gain.py


def fit_checkpoint(model: LadderLlamaForCausalLM, tokenizer, ladder_layers: list[int],
                   settings: FitSettings) -> tuple[dict[str, torch.Tensor], dict]:  # fmt: skip
    """Fit `model` (`load_original`'s) as `ladder_layers`: the changed tensors by name, and the record of the fit for
    the provenance file."""
    chats = [alpaca_chat(record) for record in alpaca_records(TRAIN)[: settings.chats]]
    batches = batch_chats(tokenizer, chats, max_length=512, batch_size=8)
    errors = fit_ladder_layers(model, batches, ladder_layers, settings.ridge, settings.output_ridge)
    record = {
        "method": "ridge least squares from each ladder module's normalised input to the original's there, folded "
        "into its input projections, layer by layer from the bottom"
        + ("; then its output projection towards the original's streams" if settings.output_ridge is not None else ""),
        "calibration_chats": f"Alpaca-5000 training rows 0-{settings.chats - 1}, every token",
        "calibration_tokens": sum(int(batch.attention_mask.sum()) for batch in batches),
        "ridge": settings.ridge,
        "output_ridge": settings.output_ridge,
        "relative_error_before_after": errors,
    }
    return fitted_tensors(model, ladder_layers, settings.output_ridge is not None), record
