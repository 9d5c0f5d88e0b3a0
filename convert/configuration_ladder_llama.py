"""Configuration of a Llama model whose upper layers use Ladder Residual wiring.

This file imports only transformers: `save_pretrained` ships it as remote code beside the weights.
"""

from transformers import LlamaConfig


class LadderLlamaConfig(LlamaConfig):
    """A `LlamaConfig` plus `ladder_layers`: the indices of the decoder layers wired as ladder blocks.

    With no ladder layers the model is exactly Llama.
    """

    model_type = "ladder_llama"

    ladder_layers: list[int] | None = None

    def __post_init__(self, **kwargs):
        self.ladder_layers = sorted(set(self.ladder_layers or []))
        super().__post_init__(**kwargs)
        outside = [i for i in self.ladder_layers if not 0 <= i < self.num_hidden_layers]
        if outside:
            raise ValueError(f"ladder_layers {outside} are outside 0..{self.num_hidden_layers - 1}")


__all__ = ["LadderLlamaConfig"]
