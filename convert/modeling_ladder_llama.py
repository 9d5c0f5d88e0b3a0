"""Llama with Ladder Residual wiring (Zhang, Mishra et al., arXiv 2501.06589) on a chosen set of layers.

The weights, their names and every module are Llama's; only the layer loop differs. Two residual streams run
through the model, A (the residual after the last attention) and H (after the last MLP):

    A = H = embed(ids)
    standard layer:  A = H + attn(ln1(H));  H = A + mlp(ln2(A))
    ladder layer:    a = attn(ln1(A));  m = mlp(ln2(H));  A = H + a;  H = A + m
    logits = lm_head(norm(H))

A ladder layer's attention never waits for the MLP just before it, and its MLP never waits for its own attention,
so under tensor parallelism each module's all-reduce can overlap the next module's compute.

This file imports only torch and transformers: `save_pretrained` ships it as remote code beside the weights, and it
then runs under whatever transformers release the user has, so it refuses, in one line, the releases it was not
written for.
"""

import inspect

import torch
from torch import nn
from transformers import GenerationMixin, LlamaForCausalLM, LlamaPreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_ladder_llama import LadderLlamaConfig, check_transformers_version

check_transformers_version()

# transformers 5.24 renamed the KV cache argument and output field from `past_key_values` to `cache` (the old name is
# still accepted, with a FutureWarning, until 5.40). Mixing the names drops the cache silently, so this model takes and
# passes it under the name the installed release's own Llama uses.
CACHE = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


class LadderLlamaDecoderLayer(LlamaDecoderLayer):
    """Llama's decoder layer (same modules, same weight names) that carries both residual streams.

    Takes and returns `(H, A)`: H first, so hooks that record a layer's first output see H, the stream a standard
    Llama layer returns.
    """

    def __init__(self, config: LadderLlamaConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.is_ladder = layer_idx in config.ladder_layers

    def forward(self, H, A, **attention_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        attn_output, _ = self.self_attn(self.input_layernorm(A if self.is_ladder else H), **attention_kwargs)
        new_A = H + attn_output
        # A ladder MLP reads H from before this layer's attention; a standard one reads the fresh A.
        new_H = new_A + self.mlp(self.post_attention_layernorm(H if self.is_ladder else new_A))
        return new_H, new_A


class LadderLlamaPreTrainedModel(LlamaPreTrainedModel):
    config_class = LadderLlamaConfig
    config: LadderLlamaConfig
    _no_split_modules = ["LadderLlamaDecoderLayer"]
    _can_record_outputs = {"hidden_states": LadderLlamaDecoderLayer, "attentions": LlamaAttention}


class LadderLlamaModel(LadderLlamaPreTrainedModel):
    def __init__(self, config: LadderLlamaConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(LadderLlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """Llama's signature; the KV cache comes in `kwargs` under the installed release's name (`CACHE`)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        cache: Cache | None = kwargs.pop(CACHE, None)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **{CACHE: cache},
        )
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids=position_ids)

        H = A = inputs_embeds
        for decoder_layer in self.layers[: self.config.num_hidden_layers]:
            H, A = decoder_layer(
                H,
                A,
                attention_mask=causal_mask,
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                use_cache=use_cache,
                **{CACHE: cache},
                **kwargs,
            )
        return BaseModelOutputWithPast(last_hidden_state=self.norm(H), **{CACHE: cache})


class LadderLlamaForCausalLM(LadderLlamaPreTrainedModel, GenerationMixin):
    _tied_weights_keys = LlamaForCausalLM._tied_weights_keys
    _tp_plan = LlamaForCausalLM._tp_plan
    _pp_plan = LlamaForCausalLM._pp_plan

    def __init__(self, config: LadderLlamaConfig):
        super().__init__(config)
        self.model = LadderLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    # The head, the loss and `logits_to_keep` are Llama's own; only the decoder differs.
    forward = LlamaForCausalLM.forward


__all__ = ["LadderLlamaForCausalLM", "LadderLlamaModel", "LadderLlamaPreTrainedModel"]
