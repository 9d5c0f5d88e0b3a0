"""Shared fixtures: the real SmolLM2 checkpoint (fetched once into the cache), tiny random Llamas, and a slow explicit
implementation of the ladder wiring written straight from the pseudo-code, to check the model against."""

import json
import time
from pathlib import Path

import pytest
import torch
import yaml
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ladder import LadderLlamaConfig, LadderLlamaForCausalLM
from ladder.checkpoint import PROVENANCE_FILE
from ladder.convert.converter import convert
from ladder.convert.smollm2 import fetch_smollm2
from ladder.gates import load_gates_file, report

REPO = Path(__file__).resolve().parents[1]
SFT = REPO / "adapt" / "sft.py"

TINY = dict(
    vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=6, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)  # fmt: skip


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    return fetch_smollm2()


@pytest.fixture(scope="session")
def smollm2(smollm2_dir) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**TINY, **overrides})).eval()


def ladder_twin(stock: LlamaForCausalLM, ladder_layers, **config_overrides) -> LadderLlamaForCausalLM:
    """The same weights as `stock`, rewired."""
    fields = {k: v for k, v in stock.config.to_dict().items() if k not in ("model_type", "architectures")}
    config = LadderLlamaConfig(**{**fields, **config_overrides}, ladder_layers=list(ladder_layers))
    model = LadderLlamaForCausalLM(config).to(stock.dtype).eval()
    model.load_state_dict(stock.state_dict())
    return model


@torch.no_grad()
def explicit_ladder_logits(stock: LlamaForCausalLM, input_ids: torch.Tensor, ladder_layers) -> torch.Tensor:
    """The wiring, exactly as written in the design card, over a stock Llama's own modules."""
    inner = stock.model
    seq_len = input_ids.shape[1]
    x = inner.embed_tokens(input_ids)
    cos_sin = inner.rotary_emb(x, torch.arange(seq_len)[None])
    causal = torch.full((seq_len, seq_len), float("-inf")).triu(1)[None, None]

    def attn(layer, h):
        return layer.self_attn(layer.input_layernorm(h), position_embeddings=cos_sin, attention_mask=causal)[0]

    def mlp(layer, h):
        return layer.mlp(layer.post_attention_layernorm(h))

    A = H = x
    for i, layer in enumerate(inner.layers):
        if i not in ladder_layers:
            A = H + attn(layer, H)
            H = A + mlp(layer, A)
        else:
            a = attn(layer, A)
            m = mlp(layer, H)
            A = H + a
            H = A + m
    return stock.lm_head(inner.norm(H))


def save_tiny_checkpoint(directory: Path, model: LlamaForCausalLM | None = None, max_shard_size="40KB") -> Path:
    """A small sharded Llama checkpoint on disk, for converter tests."""
    (model or tiny_llama()).save_pretrained(directory, max_shard_size=max_shard_size)
    return directory


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny Llama's 96 ids, with a chat template."""
    words = ["<unk>", "<s>", "</s>", *(f"w{i}" for i in range(93))]
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>",
        chat_template="{% for m in messages %}{{ m['content'] }} {% endfor %}",
    )  # fmt: skip


def write_gate_report(directory: Path, gate: str, kl: float) -> None:
    """A well-formed report of the model in `directory`, as gates/report.py writes it, on the metrics of the default
    gates: after_adapt passes with kl <= 0.05."""
    metrics = {"kl": (0.0, kl), "top1_agreement": (1.0, 0.96), "response_perplexity": (2.0, 2.02),
               "arc_easy_local/acc": (0.5, 0.5)}  # fmt: skip
    thresholds = load_gates_file().gates[gate]
    rows = report.judge(metrics, thresholds)
    facts = {"candidate": str(directory), "reference": "tiny-original", "thresholds": thresholds,
             "shards_sha256": read_json(directory / PROVENANCE_FILE)["shards_sha256"]}  # fmt: skip
    report.write(directory, gate, rows, facts)


def leftovers(parent: Path) -> list[str]:
    """What a ladder command may leave beside its output only while it runs: staging and retired directories."""
    return [p.name for p in parent.iterdir() if p.name.endswith((".partial", ".old"))]


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


@pytest.fixture(scope="module")
def tiny_pair(smollm2_dir, tmp_path_factory):
    """A tiny Llama with SmolLM2's tokenizer (the reference), and its conversion with 3 of 6 ladder layers."""
    work = tmp_path_factory.mktemp("adapt")
    original = work / "tiny-original"
    tiny_llama(vocab_size=49152, pad_token_id=2, eos_token_id=2).save_pretrained(original)
    AutoTokenizer.from_pretrained(smollm2_dir).save_pretrained(original)
    return original, convert(str(original), "3", work / "tiny-ladder3")


def write_recipe(path: Path, model: Path, output: Path, **overrides) -> Path:
    recipe = {
        "model_name_or_path": str(model), "dtype": "float32",
        "max_train_tokens": 1500, "train_layers": "ladder", "distill_alpha": 0.5, "use_peft": False,
        "datasets": [{"path": "json", "data_files": str(REPO / "gates/data/alpaca_5000.json"), "split": "train[:200]"}],
        "dataset_template": "alpaca", "gate_before": None, "gate_after": None,
        "output_dir": str(output), "max_length": 96, "packing": True, "per_device_train_batch_size": 2,
        "learning_rate": 1e-3, "use_cpu": True, "bf16": False, "logging_steps": 1, "save_steps": 2,
        "report_to": [], "seed": 0,
    } | overrides  # fmt: skip
    path.write_text(yaml.safe_dump(recipe))
    return path


def tiny_gates(path: Path) -> Path:
    suite = {"fidelity": {"chats": 8, "max_length": 128, "top_k": 16, "batch_size": 8},
             "generation": {"prompts": 2, "max_new_tokens": 8, "batch_size": 2}}  # fmt: skip
    gates = {"sane": {"response_perplexity": {"ratio_max": 1000.0}}, "perfect": {"kl": {"max": 0.0}}}
    path.write_text(yaml.safe_dump({"suite": suite, "gates": gates}))
    return path


def wait_for_a_checkpoint(output_dir: Path, timeout: float = 300) -> None:
    """Until the training run writing to `output_dir` has finished writing its first checkpoint."""
    deadline = time.time() + timeout
    while not list(output_dir.glob("checkpoint-*/trainer_state.json")) and time.time() < deadline:
        time.sleep(0.2)
