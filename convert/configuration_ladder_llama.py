"""Configuration of a Llama model whose upper layers use Ladder Residual wiring.

This file imports only transformers (and packaging, which transformers needs): `save_pretrained` ships it as remote
code beside the weights. It loads under any transformers 5.x, vLLM's pinned one included (the vLLM plugin needs only
the configuration); the modeling file refuses releases it was not written for.
"""

import transformers
from packaging.version import Version
from transformers import LlamaConfig

# The releases the model code is tested with (pyproject.toml's range; a test keeps the two equal). Outside it, the
# Llama internals it reuses may have changed, and a silently wrong model is worse than no model.
SUPPORTED_TRANSFORMERS = ("5.23", "6")


def transformers_supported(installed: str = transformers.__version__) -> bool:
    low, high = SUPPORTED_TRANSFORMERS
    return Version(low) <= Version(installed) < Version(high)


def check_transformers_version(installed: str = transformers.__version__) -> None:
    if not transformers_supported(installed):
        low, high = SUPPORTED_TRANSFORMERS
        raise ImportError(f"ladder_llama needs transformers>={low},<{high}; this environment has {installed}")


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
