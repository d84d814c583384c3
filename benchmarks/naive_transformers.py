"""The naive baseline: transformers ``generate``, one prompt at a time.

    python benchmarks/naive_transformers.py --model DIR --prompts FILE --settings JSON \\
        [--passes N]

Same sampling as the pipeline (ignore_eos: exactly max_tokens new tokens per prompt)
and the same dtype. Loads the model once and times ``--passes`` passes over the
prompts; prints one JSON line: load_s and, per pass, generate_s, output_tokens,
tokens_per_s.
"""

import argparse
import json
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--settings", required=True)
    parser.add_argument("--passes", type=int, default=1)
    args = parser.parse_args()
    settings = json.loads(args.settings)
    with open(args.prompts, encoding="utf-8") as handle:
        prompts = [line.strip() for line in handle if line.strip()]

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dtype = getattr(torch, settings["dtype"]) if settings["dtype"] != "auto" else "auto"
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).eval()
    load_s = time.monotonic() - t0
    if settings["seed"] is not None:
        torch.manual_seed(settings["seed"])
    new = settings["max_tokens"]

    def generate(prompt: str, tokens: int):
        inputs = tokenizer(prompt, return_tensors="pt")
        output = model.generate(
            **inputs,
            do_sample=settings["temperature"] > 0,
            temperature=settings["temperature"] or None,
            top_p=settings["top_p"],
            max_new_tokens=tokens,
            min_new_tokens=tokens if settings["ignore_eos"] else None,
            pad_token_id=tokenizer.pad_token_id,
        )
        return output.shape[1] - inputs["input_ids"].shape[1]

    passes = []
    with torch.inference_mode():
        generate(prompts[0], 4)  # warm-up, as vLLM warms up while it loads
        for _ in range(args.passes):
            tokens = 0
            t0 = time.monotonic()
            for prompt in prompts:
                tokens += generate(prompt, new)
            generate_s = time.monotonic() - t0
            passes.append(
                {
                    "generate_s": generate_s,
                    "output_tokens": tokens,
                    "tokens_per_s": tokens / generate_s,
                }
            )
    print(json.dumps({"load_s": load_s, "passes": passes}), flush=True)


if __name__ == "__main__":
    main()
