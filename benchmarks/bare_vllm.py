"""The baseline a user would write by hand: one vLLM engine, one LLM.generate call.

    python benchmarks/bare_vllm.py --model DIR --prompts FILE --settings JSON

Settings: dtype, enforce_eager, temperature, top_p, max_tokens, seed, ignore_eos.
The caller sets the environment (VLLM_CPU_KVCACHE_SPACE, ...). Prints one JSON
line: import_s, load_s, generate_s, output_tokens, tokens_per_s.
"""

import argparse
import json
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--settings", required=True)
    args = parser.parse_args()
    settings = json.loads(args.settings)
    with open(args.prompts, encoding="utf-8") as handle:
        prompts = [line.strip() for line in handle if line.strip()]

    t0 = time.monotonic()
    from vllm import LLM, SamplingParams

    import_s = time.monotonic() - t0
    t0 = time.monotonic()
    llm = LLM(model=args.model, dtype=settings["dtype"], enforce_eager=settings["enforce_eager"])
    load_s = time.monotonic() - t0
    params = SamplingParams(
        temperature=settings["temperature"],
        top_p=settings["top_p"],
        max_tokens=settings["max_tokens"],
        seed=settings["seed"],
        ignore_eos=settings["ignore_eos"],
    )
    t0 = time.monotonic()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    generate_s = time.monotonic() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    result = {
        "import_s": import_s,
        "load_s": load_s,
        "generate_s": generate_s,
        "output_tokens": tokens,
        "tokens_per_s": tokens / generate_s,
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
