"""``memreason smoke``: load a model and answer one question — a quick check that the install works."""

from __future__ import annotations

import argparse
import time

DEFAULT_QUESTION = "Is the Pacific Ocean larger than the Atlantic Ocean?"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "smoke", help="load a model and answer one question",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  memreason smoke\n  memreason smoke --model ./my-llama --question 'Do fish sleep?'")
    parser.add_argument("--model", default=None, help="model dir, .gguf file or hub id (default: embedded SmolLM2)")
    parser.add_argument("--question", default=DEFAULT_QUESTION)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.set_defaults(func=run)


def run(args) -> int:
    import torch

    from memreason.model import load

    start = time.perf_counter()
    model, tokenizer = load(args.model)
    loaded = time.perf_counter() - start
    messages = [{"role": "user", "content": args.question}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True).to(model.device)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    print(f"model: {model.config.name_or_path} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params, "
          f"loaded in {loaded:.1f} s on {model.device})")
    print(f"Q: {args.question}\nA: {answer.strip()}")
    return 0
