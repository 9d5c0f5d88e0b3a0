"""ladder: turn a pretrained Llama checkpoint into a Ladder Residual model and heal it back to the original.

`import ladder` registers the model with transformers' Auto classes, so ladder checkpoints load without
`trust_remote_code`. The stages are subpackages, each in its own top-level folder of the repository:
`ladder.convert` (the model and `ladder-convert`), `ladder.gates` (`ladder-eval`), `ladder.adapt` (`ladder-heal`),
`ladder.publish` (`ladder-publish`) and `ladder.serve`; `ladder.checkpoint` is the checkpoint I/O they share.
"""

import os
from importlib.metadata import version
from pathlib import Path

from transformers import AutoConfig, AutoModelForCausalLM

from .convert.configuration_ladder_llama import LadderLlamaConfig, transformers_supported

__version__ = version("ladder")  # pyproject.toml is the one place it is written

AutoConfig.register(LadderLlamaConfig.model_type, LadderLlamaConfig, exist_ok=True)
LadderLlamaConfig.register_for_auto_class()
# The serving environment pins vLLM's older transformers: there only the configuration is needed (ladder.serve.vllm).
if transformers_supported():
    from .convert.modeling_ladder_llama import LadderLlamaForCausalLM, LadderLlamaModel

    AutoModelForCausalLM.register(LadderLlamaConfig, LadderLlamaForCausalLM, exist_ok=True)
    # `save_pretrained` then writes `auto_map` and ships the two modeling files with the weights.
    LadderLlamaForCausalLM.register_for_auto_class("AutoModelForCausalLM")


def cache_root() -> Path:
    """Where ladder keeps what it builds once (the SmolLM2 checkpoint, cached reference results)."""
    return Path(os.environ.get("LADDER_CACHE", "~/.cache/ladder")).expanduser()


__all__ = ["cache_root", "LadderLlamaConfig", "LadderLlamaForCausalLM", "LadderLlamaModel", "__version__"]
