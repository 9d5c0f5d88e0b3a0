"""The ladder model: exact wiring, and everything transformers users rely on (cache, padding, attention kernels,
gradient checkpointing, rope scaling, tied embeddings, dtypes)."""

import pytest
import torch
from conftest import explicit_ladder_logits, ladder_twin, tiny_llama

from ladder import LadderLlamaConfig

CHAT = [{"role": "user", "content": "Name three primary colors."}]


@pytest.fixture(scope="module")
def smollm2_ids(smollm2_tokenizer):
    return smollm2_tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt")["input_ids"]


def test_no_ladder_layers_is_bit_identical_to_llama_on_smollm2(smollm2, smollm2_ids):
    with torch.no_grad():
        assert torch.equal(ladder_twin(smollm2, [])(smollm2_ids).logits, smollm2(smollm2_ids).logits)


@pytest.mark.parametrize("layers", [range(15, 30), range(30), [0, 7, 8, 21, 29]], ids=["top15", "all", "arbitrary"])
def test_smollm2_matches_explicit_wiring(smollm2, smollm2_ids, layers):
    ladder = ladder_twin(smollm2, layers)
    with torch.no_grad():
        logits = ladder(smollm2_ids).logits
    expected = explicit_ladder_logits(smollm2, smollm2_ids, set(layers))
    assert (logits - expected).abs().max() <= 1e-5
    # The wiring changes the function: the test would fail on a model that ignores ladder_layers.
    assert (logits - smollm2(smollm2_ids).logits).abs().max() > 1e-2


@pytest.mark.parametrize("layers", [[3, 4, 5], range(6), [1, 4]], ids=["top3", "all", "arbitrary"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_tiny_matches_explicit_wiring(layers, tied):
    stock = tiny_llama(tie_word_embeddings=tied)
    ids = torch.randint(3, 96, (2, 17))
    with torch.no_grad():
        logits = ladder_twin(stock, layers)(ids).logits
    assert (logits - explicit_ladder_logits(stock, ids, set(layers))).abs().max() <= 1e-5


def test_llama31_rope_scaling_matches_explicit_wiring():
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32}  # fmt: skip
    stock = tiny_llama(rope_parameters=rope)
    ladder = ladder_twin(stock, [4, 5])
    assert ladder.config.rope_parameters["rope_type"] == "llama3"
    ids = torch.randint(3, 96, (1, 100))  # longer than original_max_position_embeddings
    with torch.no_grad():
        assert (ladder(ids).logits - explicit_ladder_logits(stock, ids, {4, 5})).abs().max() <= 1e-5


def test_config_rejects_layers_outside_the_model():
    with pytest.raises(ValueError, match="outside"):
        LadderLlamaConfig(num_hidden_layers=4, ladder_layers=[2, 4])


@pytest.fixture(scope="module")
def smollm2_ladder(smollm2):
    return ladder_twin(smollm2, range(15, 30))


def greedy(model, **inputs):
    return model.generate(**inputs, max_new_tokens=24, do_sample=False, pad_token_id=2)


def test_cached_generation_equals_uncached(smollm2_ladder, smollm2_ids):
    cached = greedy(smollm2_ladder, input_ids=smollm2_ids, use_cache=True)
    uncached = greedy(smollm2_ladder, input_ids=smollm2_ids, use_cache=False)
    assert torch.equal(cached, uncached)


def test_batched_left_padded_generation_equals_one_by_one(smollm2_ladder, smollm2_tokenizer):
    prompts = [
        [{"role": "user", "content": "Name three primary colors."}],
        [{"role": "user", "content": "What is 2 + 2? Explain your answer in one sentence, please."}],
    ]
    smollm2_tokenizer.padding_side = "left"
    texts = [smollm2_tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]
    batch = smollm2_tokenizer(texts, return_tensors="pt", padding=True)
    assert (batch["attention_mask"] == 0).any(), "the prompts must differ in length to test padding"
    batched = greedy(smollm2_ladder, **batch)[:, batch["input_ids"].shape[1] :]
    for row, text in enumerate(texts):
        single = smollm2_tokenizer(text, return_tensors="pt")
        alone = greedy(smollm2_ladder, **single)[0, single["input_ids"].shape[1] :]
        assert torch.equal(batched[row, : len(alone)], alone)


def test_sdpa_equals_eager(smollm2, smollm2_ids):
    eager = ladder_twin(smollm2, range(15, 30), attn_implementation="eager")
    sdpa = ladder_twin(smollm2, range(15, 30), attn_implementation="sdpa")
    assert eager.config._attn_implementation == "eager" and sdpa.config._attn_implementation == "sdpa"
    with torch.no_grad():
        torch.testing.assert_close(eager(smollm2_ids).logits, sdpa(smollm2_ids).logits, rtol=1e-4, atol=1e-3)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    stock = tiny_llama()
    ids = torch.randint(3, 96, (2, 12))
    results = []
    for checkpointing in (False, True):
        model = ladder_twin(stock, [2, 3, 4, 5]).train()
        if checkpointing:
            model.activation_checkpointing_enable()
        loss = model(ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), model.model.layers[2].mlp.down_proj.weight.grad.clone()))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.allclose(results[0][1], results[1][1], atol=1e-6)
    assert results[0][1].abs().sum() > 0


def test_bf16_runs_and_stays_close_to_fp32(smollm2, smollm2_ids):
    fp32 = ladder_twin(smollm2, range(15, 30))
    stock_bf16 = tiny_llama().to(torch.bfloat16)
    with torch.no_grad():
        ids = torch.randint(3, 96, (2, 9))
        assert torch.equal(ladder_twin(stock_bf16, [])(ids).logits, stock_bf16(ids).logits)
        bf16 = ladder_twin(smollm2, range(15, 30)).to(torch.bfloat16)
        low, high = bf16(smollm2_ids).logits, fp32(smollm2_ids).logits
    assert low.dtype == torch.bfloat16
    assert (low.argmax(-1) == high.argmax(-1)).float().mean() >= 0.9


def test_hidden_states_output_reports_the_mlp_stream_like_llama(smollm2, smollm2_ids):
    with torch.no_grad():
        stock = smollm2(smollm2_ids, output_hidden_states=True).hidden_states
        ladder = ladder_twin(smollm2, [])(smollm2_ids, output_hidden_states=True).hidden_states
    assert len(ladder) == len(stock) == 31
    assert all(torch.equal(a, b) for a, b in zip(ladder, stock))
