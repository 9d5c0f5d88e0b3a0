"""Greedy generation on vLLM, run by the serving environment's Python for tests/test_vllm.py.

    python tests/vllm_greedy.py JOB_JSON

JOB_JSON: {"models": [[dir, enforce_eager], ...], "tensor_parallel_size": N, "prompts": [[token id, ...], ...],
"max_tokens": N}: each model on vLLM's default path (torch.compile), or eager where `enforce_eager`.
Each model loads in turn into one process (vLLM's start-up is most of the time). Prints, per model, one line
`RESULT {"model": dir, "enforce_eager": bool, "tokens": [[...], ...], "logprobs": [[...], ...]}`: the generated ids
and their log-probs.
"""

import json
import sys

from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt


def main() -> None:
    job = json.loads(sys.argv[1])
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in job["prompts"]]
    greedy = SamplingParams(temperature=0, max_tokens=job["max_tokens"], logprobs=0)
    for model, enforce_eager in job["models"]:
        llm = LLM(model=model, tensor_parallel_size=job["tensor_parallel_size"], dtype="float32",
                  enforce_eager=enforce_eager, max_model_len=1024, seed=0)  # fmt: skip
        outputs = [request.outputs[0] for request in llm.generate(prompts, greedy, use_tqdm=False)]
        logprobs = [[step[token].logprob for token, step in zip(o.token_ids, o.logprobs)] for o in outputs]
        tokens = [list(o.token_ids) for o in outputs]
        result = {"model": model, "enforce_eager": enforce_eager, "tokens": tokens, "logprobs": logprobs}
        print("RESULT " + json.dumps(result), flush=True)
        del llm  # stops its engine before the next model's starts


if __name__ == "__main__":
    main()
