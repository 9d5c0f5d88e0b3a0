"""Training step time of the ladder model against stock Llama, and of the healing recipe's speed-ups.

    python benchmarks/train_speed.py [--steps 6] [--layers 15] [--variants "distill, all" "distill, all, sdpa"]

SmolLM2-135M-Instruct, stock and converted with its top `--layers` layers, trained in turns on the same packed,
padding-free batches (the SmolLM2 recipe's: 4 x 512 tokens of Alpaca chats in one row), each step our trainer's loss
(`DistillingSFTTrainer.compute_loss`), its backward and an AdamW step. Attention is the recipe's "sdpa_packed"
(adapt/packed_attention.py) unless the name says "sdpa"; freed memory is kept for reuse (adapt/allocator.py), as
in adapt/sft.py, after a first pass with glibc's malloc as it comes when --malloc-ratio is given. Variants:

    stock SFT               LlamaForCausalLM, every parameter trained, cross-entropy
    ladder SFT              the same for the ladder model: target <= 1.03x the stock step time
    distill, all            the SmolLM2 recipe: every layer trained, 0.9 KL(original || ladder) + 0.1 CE
    distill, all, sdpa      the same with transformers' sdpa (the whole row under a block-diagonal mask)
    distill, frozen         ladder layers trained, the original run whole
    distill, frozen, shared the same, the original reusing the student's frozen trunk (SharedTrunkTeacher)

Prints the median step time and tokens/s of each and the ratios, measured in one run.
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
from trl import SFTConfig

from ladder.adapt.allocator import keep_freed_memory
from ladder.adapt.packed_attention import NAME as PACKED_ATTENTION
from ladder.adapt.trainer import DistillingSFTTrainer, freeze_all_but, share_trunk
from ladder.convert.converter import convert
from ladder.convert.smollm2 import fetch_smollm2
from ladder.gates.alpaca import TRAIN, alpaca_chat, alpaca_records


VARIANTS = ["stock SFT", "ladder SFT", "distill, all", "distill, all, sdpa", "distill, frozen", "distill, frozen, shared"]


def build_trainers(original: Path, ladder: Path, chats: Dataset, work: Path, names: list[str]) -> dict:
    args = SFTConfig(output_dir=str(work / "unused"), packing=True, max_length=512, per_device_train_batch_size=4,
                     learning_rate=1e-5, use_cpu=True, report_to=[], seed=0)  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(original)

    def trainer(model, teacher=None, alpha=0.0):
        built = DistillingSFTTrainer(model=model, args=args, train_dataset=chats, processing_class=tokenizer,
                                     teacher=teacher, alpha=alpha)  # fmt: skip
        built.create_optimizer()
        return built

    def ladder_model(attention=PACKED_ATTENTION):
        return AutoModelForCausalLM.from_pretrained(ladder, dtype=torch.float32, attn_implementation=attention)

    def frozen_ladder():
        model = ladder_model()
        freeze_all_but(model, model.config.ladder_layers)
        return model

    def stock(attention=PACKED_ATTENTION):
        return LlamaForCausalLM.from_pretrained(original, dtype=torch.float32, attn_implementation=attention)

    def frozen_shared():
        model = frozen_ladder()
        return trainer(model, share_trunk(model, stock()), 0.9)

    builders = {
        "stock SFT": lambda: trainer(stock()),
        "ladder SFT": lambda: trainer(ladder_model()),
        "distill, all": lambda: trainer(ladder_model(), stock(), 0.9),
        "distill, all, sdpa": lambda: trainer(ladder_model("sdpa"), stock("sdpa"), 0.9),
        "distill, frozen": lambda: trainer(frozen_ladder(), stock(), 0.9),
        "distill, frozen, shared": frozen_shared,
    }
    return {name: builders[name]() for name in names}


def step_seconds(trainer: DistillingSFTTrainer, batch: dict) -> float:
    start = time.perf_counter()
    trainer.compute_loss(trainer.model, dict(batch)).backward()
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def median_step_seconds(trainers: dict, batches: list[dict]) -> dict[str, float]:
    """Every variant on every batch, in turns; the median step time of each, the first step left out."""
    times = {name: [] for name in trainers}
    for index, batch in enumerate(batches):
        order = list(trainers) if index % 2 == 0 else list(reversed(trainers))  # alternate who goes first
        seconds = {name: step_seconds(trainers[name], batch) for name in order}
        if index > 0:  # the first step of each warms up allocators and kernels
            for name, value in seconds.items():
                times[name].append(value)
        print(f"step {index}: " + ", ".join(f"{name} {value:.2f} s" for name, value in seconds.items()), flush=True)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="measured steps per variant (after one warm-up step)")
    parser.add_argument("--layers", default="15", help="ladder layers, as ladder-convert --layers takes them")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=VARIANTS, help="which to time (default: all)")
    parser.add_argument("--malloc-ratio", action="store_true",
                        help="first time every variant with glibc's malloc as it comes, then with keep_freed_memory")  # fmt: skip
    args = parser.parse_args()
    torch.manual_seed(0)
    original = fetch_smollm2()
    chats = Dataset.from_list([{"messages": alpaca_chat(r)} for r in alpaca_records(TRAIN)[: 40 * (args.steps + 1)]])
    with tempfile.TemporaryDirectory() as work:
        ladder = convert(str(original), args.layers, Path(work) / "ladder")
        trainers = build_trainers(original, ladder, chats, Path(work), args.variants)
        loader = iter(next(iter(trainers.values())).get_train_dataloader())
        batches = [next(loader) for _ in range(args.steps + 1)]

        if args.malloc_ratio:
            print("glibc's malloc as it comes:")
            default_malloc = median_step_seconds(trainers, batches)
        keep_freed_memory()  # as adapt/sft.py does; it holds for the rest of the process
        medians = median_step_seconds(trainers, batches)

    tokens = batches[0]["input_ids"].numel()
    padding = sum(int((b["attention_mask"] == 0).sum()) for b in batches if "attention_mask" in b)
    print(f"\nSmolLM2-135M-Instruct, ladder layers {args.layers}, {tokens} tokens per step, fp32, "
          f"{torch.get_num_threads()} threads, {args.steps} measured steps; padding tokens: {padding}, batch shape "
          f"{tuple(batches[0]['input_ids'].shape)}")  # fmt: skip
    for name, median in medians.items():
        print(f"{name:24s} median step {median:6.2f} s  {tokens / median:6.0f} tokens/s")
    for slower, faster, target in [
        ("ladder SFT", "stock SFT", " (target <= 1.03x)"),
        ("distill, all, sdpa", "distill, all", ""),
        ("distill, frozen", "distill, frozen, shared", ""),
        ("distill, all", "distill, frozen, shared", ""),
    ]:
        if slower in medians and faster in medians:
            print(f"{slower} / {faster} step time: {medians[slower] / medians[faster]:.3f}x{target}")
    if args.malloc_ratio:
        for name, median in default_malloc.items():
            print(f"{name}: glibc's malloc as it comes / keep_freed_memory step time: {median / medians[name]:.3f}x")


if __name__ == "__main__":
    main()
