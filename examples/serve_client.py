"""Query a specdiff server with the OpenAI client and read its speculation counters.

Start the server first (the embedded target and the shipped conditioned drafter; one line each
for the paths, then `vllm serve` with the plugin's flags; `vllm-specdiff serve` takes the same
arguments on any install):

    TARGET=$(.venv/bin/python -c 'from vllm_specdiff.assets import prepare_target as p; print(p())')
    DRAFTER=$(.venv/bin/python -c 'from vllm_specdiff.assets import CONDITIONED_DRAFTER_DIR as d; print(d)')
    VLLM_CPU_KVCACHE_SPACE=1 .venv/bin/vllm-specdiff serve "$TARGET" --host 127.0.0.1 --port 8000 \\
        --dtype float32 --enforce-eager --speculative-method specdiff \\
        --speculative-model "$DRAFTER" --num-speculative-tokens 4 &

then

    .venv/bin/python examples/serve_client.py --base-url http://127.0.0.1:8000 --model "$TARGET"
"""
from __future__ import annotations

import argparse
import urllib.request


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", required=True, help="the served model name (the target path)")
    parser.add_argument("--prompt", default="The history of the internet began")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=0.0)
    args = parser.parse_args(argv)

    import openai

    client = openai.OpenAI(base_url=f"{args.base_url}/v1", api_key="EMPTY")
    completion = client.completions.create(model=args.model, prompt=args.prompt,
                                           max_tokens=args.max_tokens, temperature=args.temperature)
    text = completion.choices[0].text
    print(f"+++ {text!r}")
    # vLLM's Prometheus counters: drafting rounds and accepted draft tokens since the server started.
    with urllib.request.urlopen(f"{args.base_url}/metrics", timeout=30) as response:
        metrics = response.read().decode()
    counters = {}
    for line in metrics.splitlines():
        name, _, value = line.partition(" ")
        for key in ("vllm:spec_decode_num_drafts_total", "vllm:spec_decode_num_accepted_tokens_total"):
            if name.split("{")[0] == key:
                counters[key] = counters.get(key, 0.0) + float(value)
    drafts = counters.get("vllm:spec_decode_num_drafts_total", 0.0)
    if drafts:
        accepted = counters.get("vllm:spec_decode_num_accepted_tokens_total", 0.0)
        print(f"server so far: {drafts:.0f} drafting rounds, acceptance length "
              f"{1 + accepted / drafts:.2f} tokens per round")
    return text


if __name__ == "__main__":
    main()
