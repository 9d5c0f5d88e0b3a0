"""`python -m ladder.convert.chat CHECKPOINT [CHECKPOINT ...] --prompt TEXT`: each checkpoint's greedy answer to one chat
prompt, side by side; the quickest look at what a conversion did to a model."""

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import ladder  # noqa: F401  (registers the ladder model with the Auto classes)


@torch.no_grad()
def answer(checkpoint: str, prompt: str, max_new_tokens: int) -> str:
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    chat = [{"role": "user", "content": prompt}]
    inputs = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--prompt", default="What is the capital of France? Answer in one sentence.")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args(argv)
    print(f"prompt: {args.prompt}")
    for checkpoint in args.checkpoints:
        print(f"\n[{checkpoint}]\n{answer(checkpoint, args.prompt, args.max_new_tokens)}")


if __name__ == "__main__":
    main()
