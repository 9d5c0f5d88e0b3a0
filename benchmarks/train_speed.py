"""Training step time of the ladder model against stock Llama, and of distillation with and without a shared trunk.

    python benchmarks/train_speed.py [--steps 6] [--layers 15]

SmolLM2-135M-Instruct, stock and converted with its top `--layers` layers, trained in turns on the same packed,
padding-free batches (the SmolLM2 recipe's: 4 x 512 tokens of Alpaca chats), each step our trainer's loss
(`DistillingSFTTrainer.compute_loss`), its backward and an AdamW step. Variants:

    stock SFT           LlamaForCausalLM, every parameter trained, cross-entropy
    ladder SFT          the same for the ladder model: target <= 1.03x the stock step time
    distill             ladder layers trained, loss 0.9 KL(original || ladder) + 0.1 CE, the original run whole
    distill, shared     the same, the original reusing the student's frozen trunk (SharedTrunkTeacher)

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

from adapt.trainer import DistillingSFTTrainer, freeze_all_but, share_trunk
from convert.converter import convert
from convert.smollm2 import fetch_smollm2
from gates.data import TRAIN, alpaca_chat, alpaca_records


def build_trainers(original: Path, ladder: Path, chats: Dataset, work: Path) -> dict[str, DistillingSFTTrainer]:
    args = SFTConfig(output_dir=str(work / "unused"), packing=True, max_length=512, per_device_train_batch_size=4,
                     learning_rate=1e-5, use_cpu=True, report_to=[], seed=0)  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(original)

    def trainer(model, teacher=None, alpha=0.0):
        built = DistillingSFTTrainer(model=model, args=args, train_dataset=chats, processing_class=tokenizer,
                                     teacher=teacher, alpha=alpha)  # fmt: skip
        built.create_optimizer()
        return built

    def frozen_ladder():
        model = AutoModelForCausalLM.from_pretrained(ladder, dtype=torch.float32)
        freeze_all_but(model, model.config.ladder_layers)
        return model

    def stock():
        return LlamaForCausalLM.from_pretrained(original, dtype=torch.float32)

    distilled, shared = frozen_ladder(), frozen_ladder()
    return {
        "stock SFT": trainer(stock()),
        "ladder SFT": trainer(AutoModelForCausalLM.from_pretrained(ladder, dtype=torch.float32)),
        "distill": trainer(distilled, stock(), 0.9),
        "distill, shared": trainer(shared, share_trunk(shared, stock()), 0.9),
    }


def step_seconds(trainer: DistillingSFTTrainer, batch: dict) -> float:
    start = time.perf_counter()
    trainer.compute_loss(trainer.model, dict(batch)).backward()
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="measured steps per variant (after one warm-up step)")
    parser.add_argument("--layers", default="15", help="ladder layers, as ladder-convert --layers takes them")
    args = parser.parse_args()
    torch.manual_seed(0)
    original = fetch_smollm2()
    chats = Dataset.from_list([{"messages": alpaca_chat(r)} for r in alpaca_records(TRAIN)[: 40 * (args.steps + 1)]])
    with tempfile.TemporaryDirectory() as work:
        trainers = build_trainers(original, convert(str(original), args.layers, Path(work) / "ladder"), chats, Path(work))
        loader = iter(trainers["stock SFT"].get_train_dataloader())
        batches = [next(loader) for _ in range(args.steps + 1)]

        times = {name: [] for name in trainers}
        for index, batch in enumerate(batches):
            order = list(trainers) if index % 2 == 0 else list(reversed(trainers))  # alternate who goes first
            seconds = {name: step_seconds(trainers[name], batch) for name in order}
            if index > 0:  # the first step of each warms up allocators and kernels
                for name, value in seconds.items():
                    times[name].append(value)
            print(f"step {index}: " + ", ".join(f"{name} {value:.2f} s" for name, value in seconds.items()), flush=True)

    tokens = batches[0]["input_ids"].numel()
    padding = sum(int((b["attention_mask"] == 0).sum()) for b in batches if "attention_mask" in b)
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"\nSmolLM2-135M-Instruct, ladder layers {args.layers}, {tokens} tokens per step, fp32, "
          f"{torch.get_num_threads()} threads, {args.steps} measured steps; padding tokens: {padding}, batch shape "
          f"{tuple(batches[0]['input_ids'].shape)}")  # fmt: skip
    for name, median in medians.items():
        print(f"{name:16s} median step {median:6.2f} s  {tokens / median:6.0f} tokens/s")
    print(f"ladder SFT / stock SFT step time: {medians['ladder SFT'] / medians['stock SFT']:.3f}x (target <= 1.03x)")
    print(f"distill / distill, shared step time: {medians['distill'] / medians['distill, shared']:.2f}x")


if __name__ == "__main__":
    main()
