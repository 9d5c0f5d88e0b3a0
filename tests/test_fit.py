"""`ladder-convert --fit`: the least-squares fit of the ladder modules' inputs, folded into plain ladder weights."""

import json
import os
import subprocess
import sys

import torch
from conftest import ladder_twin, read_json, save_tiny_checkpoint, tiny_llama
from transformers import AutoTokenizer

from ladder.checkpoint import read_json_object, shard_hashes
from ladder.convert import converter
from ladder.convert.fit import OUTPUT_RIDGE, FitSettings, fit_checkpoint, fit_ladder_layers, fold, rms_normalised
from ladder.convert.placement import Calibration, load_original, mean_kl
from ladder.gates.alpaca import TRAIN, alpaca_chat, alpaca_records
from ladder.gates.fidelity import ChatBatch, batch_chats


def random_batches(count: int, seed: int, vocab: int = 96) -> list[ChatBatch]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        ids = torch.randint(3, vocab, (4, 48), generator=generator)
        mask = torch.ones_like(ids)
        mask[1, 30:] = 0  # padding, which the fit must leave out
        batches.append(ChatBatch(ids, mask, mask.bool()))
    return batches


@torch.no_grad()
def test_the_fit_cuts_each_modules_input_and_output_error_and_the_kl_on_held_out_tokens():
    stock, ladder_layers = tiny_llama(), [2, 3, 4]
    model = ladder_twin(stock, [])
    held_out = [Calibration(model, batch) for batch in random_batches(2, seed=1)]  # the original's streams and log-probs
    unfitted = mean_kl(model, held_out, ladder_layers)

    errors = fit_ladder_layers(model, random_batches(16, seed=0), ladder_layers, ridge=1e-3, output_ridge=1e-3)
    assert sorted(errors) == ladder_layers and [layer.is_ladder for layer in model.model.layers] == [
        index in ladder_layers for index in range(6)]  # fmt: skip
    for module_errors in errors.values():
        for fitted, (before, after) in module_errors.items():  # random weights: attention's error is small already
            assert after < (0.8 if fitted.endswith("input") else 1) * before, (fitted, before, after)
    assert mean_kl(model, held_out, ladder_layers) < 0.75 * unfitted


@torch.no_grad()
def test_folding_computes_what_the_explicit_map_after_the_norm_computes():
    """W diag(w) M folded into q/k/v and gate/up (norm weight 1) against the unfolded model, where a hook applies M
    to the normalised stream before the norm's weight: equal to float precision."""
    stock = tiny_llama()
    unfolded, folded = ladder_twin(stock, [1, 3, 4]), ladder_twin(stock, [1, 3, 4])
    generator = torch.Generator().manual_seed(0)
    for index in (1, 4):
        for norm_name, projections in (("input_layernorm", ("q_proj", "k_proj", "v_proj")),
                                       ("post_attention_layernorm", ("gate_proj", "up_proj"))):  # fmt: skip
            M = torch.eye(64, dtype=torch.float64) + 0.2 * torch.randn(64, 64, generator=generator, dtype=torch.float64)
            norm = getattr(unfolded.model.layers[index], norm_name)
            norm.register_forward_hook(
                lambda module, args, output, M=M: module.weight * (rms_normalised(args[0], module.variance_epsilon) @ M.T.float())
            )  # fmt: skip
            layer = folded.model.layers[index]
            block = layer.self_attn if norm_name == "input_layernorm" else layer.mlp
            fold(M, getattr(layer, norm_name), [getattr(block, name) for name in projections])
    ids = torch.randint(3, 96, (2, 20))
    expected, actual = unfolded(input_ids=ids).logits, folded(input_ids=ids).logits
    assert (expected - stock(input_ids=ids).logits).abs().max() > 0.1  # the maps do change the output
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in folded.parameters()) == sum(p.numel() for p in stock.parameters())


CLEAN_LOAD = """
import json, sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32)
ids = torch.tensor(json.loads(sys.argv[2]))
print(type(model).__module__, json.dumps(model(input_ids=ids).logits.tolist()))
"""


def test_convert_with_placement_and_fit_writes_a_plain_ladder_checkpoint(smollm2_dir, tmp_path):
    """`--placement measured --fit`: the chosen layers fitted, the fit recorded, only the shards holding fitted
    tensors rewritten, and the checkpoint loads in a clean process (remote code) computing what the fit computed."""
    source = save_tiny_checkpoint(tmp_path / "tiny", tiny_llama(vocab_size=49152, pad_token_id=2, eos_token_id=2),
                                  max_shard_size="2MB")  # fmt: skip
    AutoTokenizer.from_pretrained(smollm2_dir).save_pretrained(source)
    output = tmp_path / "out"
    args = [str(source), "--layers", "2", "--placement", "measured", "--calibration-chats", "2", "--fit",
            "--fit-chats", "6", "--fit-ridge", "1e-3", "--fit-outputs", "--no-eval", "--output", str(output)]  # fmt: skip
    assert converter.main(args) == 0

    provenance, config = read_json(output / "ladder_provenance.json"), read_json(output / "config.json")
    layers = config["ladder_layers"]
    assert layers == sorted(provenance["placement"]["added_in_order"]) and len(layers) == 2
    fit = provenance["fit"]
    assert fit["ridge"] == 1e-3 and fit["calibration_chats"] == "Alpaca-5000 training rows 0-5, every token"
    assert sorted(map(int, fit["relative_error_before_after"])) == layers
    assert all(after < before for modules in fit["relative_error_before_after"].values()
               for before, after in modules.values())  # fmt: skip
    assert provenance["shards_sha256"] == shard_hashes(output, sorted(provenance["shards_sha256"]))
    index = read_json(source / "model.safetensors.index.json")["weight_map"]
    fitted_shards = {index[f"model.layers.{layer}.mlp.up_proj.weight"] for layer in layers}
    for shard in provenance["shards_sha256"]:  # shards without a fitted tensor stay hardlinked
        assert os.path.samefile(source / shard, output / shard) == (shard not in fitted_shards)

    model, tokenizer = load_original(source, read_json_object(source / "config.json", ""))
    fit_checkpoint(model, tokenizer, layers, FitSettings(chats=6, ridge=1e-3, output_ridge=OUTPUT_RIDGE))
    ids = [[5, 900, 77, 4000, 12, 49000]]
    with torch.no_grad():
        expected = model(input_ids=torch.tensor(ids)).logits
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", CLEAN_LOAD, str(output), json.dumps(ids)], capture_output=True,
                          text=True, cwd=tmp_path, env=env, check=True)  # fmt: skip
    module, logits = done.stdout.split(" ", 1)
    assert module.startswith("transformers_modules")  # the shipped code, not the installed package
    torch.testing.assert_close(torch.tensor(json.loads(logits)), expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_on_smollm2_the_fit_cuts_the_kl_on_training_chats_it_was_not_fitted_on(smollm2_dir):
    layers = [4, 5, 6, 7, 8, 14, *range(20, 29)]  # the demo's
    model, tokenizer = load_original(smollm2_dir, read_json_object(smollm2_dir / "config.json", ""))
    chats = [alpaca_chat(record) for record in alpaca_records(TRAIN)[4490:4498]]
    held_out = [Calibration(model, batch) for batch in batch_chats(tokenizer, chats, max_length=512, batch_size=4)]
    unfitted = mean_kl(model, held_out, layers)
    fit_checkpoint(model, tokenizer, layers, FitSettings(chats=32))
    fitted = mean_kl(model, held_out, layers)
    assert fitted < 0.8 * unfitted, (fitted, unfitted)
