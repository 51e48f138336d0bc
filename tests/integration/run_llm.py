"""Run a real vLLM engine (offline ``LLM``) on a model directory; print one JSON line.

Run as a script in its own process: vLLM starts an engine-core child process, and its log
lines (including vllm_lk's activation line from every process) go to this process's stdout/err.
"""

import json
import sys

from vllm import LLM, SamplingParams

PROMPTS = ["def main(", "import os\nimport sys\n\n\nclass "]


def main(model_dir: str) -> None:
    llm = LLM(model=model_dir, dtype="float32", enforce_eager=True, gpu_memory_utilization=0.1, max_model_len=512, seed=0)
    greedy = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=16, prompt_logprobs=0))
    sampled = llm.generate(PROMPTS, SamplingParams(temperature=1.0, max_tokens=16, seed=1))
    result = {
        "greedy": [
            {
                "prompt_token_ids": out.prompt_token_ids,
                # logprob the engine gives each prompt token (after the first), as the model sees it
                "prompt_logprobs": [
                    entry[tok].logprob for tok, entry in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:])
                ],
                "token_ids": list(out.outputs[0].token_ids),
                "text": out.outputs[0].text,
            }
            for out in greedy
        ],
        "sampled": [list(out.outputs[0].token_ids) for out in sampled],
    }
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
