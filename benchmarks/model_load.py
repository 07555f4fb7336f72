"""How long the offline default student takes to load (first: GGUF conversion; later: the cached
checkpoint, with HF_HUB_OFFLINE=1), and what its greedy generation looks like.

    .venv/bin/python benchmarks/model_load.py [--fresh-cache]

Writes benchmarks/results/model-load.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, provenance  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--fresh-cache", action="store_true", help="convert into an empty cache directory first"
    )
    args = parser.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    tmp = None
    if args.fresh_cache:
        tmp = tempfile.mkdtemp(prefix="kpod-cache-")
        os.environ["KPOD_CACHE"] = tmp
    import torch

    from kpod.models import load_model
    from kpod.prompt import render_prompt

    result: dict = {"benchmark": "model-load", **provenance()}
    start = time.perf_counter()
    loaded = load_model("smollm2-135m-instruct", trainable=False)
    result["first_load_s"] = round(time.perf_counter() - start, 2)
    del loaded
    start = time.perf_counter()
    loaded = load_model("smollm2-135m-instruct", trainable=False)
    result["second_load_s"] = round(time.perf_counter() - start, 2)
    tok, model = loaded.tokenizer, loaded.model
    samples = {}
    for name, messages in {
        "chat": [{"role": "user", "content": "Explain in two sentences why the sky is blue."}],
        "word-problem": [
            {
                "role": "user",
                "content": "Natalia sold 48 clips in April and half as many in May. "
                "How many clips did she sell in all? Let's think step by step.",
            }
        ],
    }.items():
        prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
        rates = {}
        for precision in ("fp32", "bf16"):
            autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
            with torch.no_grad(), autocast:
                model.generate(**ids, max_new_tokens=2, do_sample=False)  # warm-up
                start = time.perf_counter()
                out = model.generate(**ids, max_new_tokens=64, do_sample=False)
            n_new = out.shape[1] - ids["input_ids"].shape[1]
            rates[f"tokens_per_s_{precision}_batch1"] = round(n_new / (time.perf_counter() - start), 1)
        samples[name] = {
            "text": tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True),
            **rates,
        }
    result["samples"] = samples
    result["paper_prompt_example"] = render_prompt("What is 2 + 2?")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out_path = RESULTS / "model-load.json"
    import json

    out_path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps(result, indent=2, ensure_ascii=False))
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
