"""Where the time of one demo training step goes: matmuls, PEFT's trainable-token path, optimizer, data.

One optimiser step of the demo recipe (``configs/demo.yaml``: SmolLM2-135M, LoRA r16 on the MLP + the 15
new token rows through PEFT, batch 4, length-grouped) is run under ``torch.profiler`` after a warm-up step;
every operator's *self* time (time in the op itself, not in ops it calls) is put in one group:

* **matmul**: ``mm``/``addmm``/``bmm``/... of the linear layers (LoRA's included) and the LM head, forward
  and backward, except the one counted below;
* **attention**: the fused scaled-dot-product attention kernels, forward and backward;
* **trainable-token path**: what PEFT's ``TrainableTokensLayer`` adds to a step: the ``index_copy`` that
  rebuilds the whole ``[vocab, hidden]`` matrix with the new rows spliced in (embedding and tied head), its
  backward, the *dense* embedding gradient (a frozen embedding gets none), and the head's ``[vocab, hidden]``
  weight-gradient matmul (a frozen head gets none; only 15 of its rows are used);
* **optimizer**: gradient clipping, AdamW, the scheduler, zeroing gradients;
* **data**: drawing the batch from the recipe's data loader (sampler + collator) and moving it;
* **other**: everything else (norms, activations, softmax/cross-entropy, dropout, copies, autograd glue).

Shares are of the summed self time, which on a CPU equals the step's wall time minus the Python between
ops. The same step is also timed without the profiler, and — the baseline — in ``mode: lora`` (the same
LoRA, no new token rows, so no trainable-token path) on the same batch: the ratio of the two is an upper
bound on what an exact sparse replacement of the token path could save. The grouped share counts only the
ops that can be attributed to the token path by range, autograd node or shape (a zeroing or an elementwise op
it triggers elsewhere lands in "other"), so it is a lower bound; the lora ratio is the direct measure (on the
``--quick`` model: 7% grouped vs 1.22x). Last, the same step with memreason's exact sparse replacement
(``memreason.train.sparse_tokens``, what the recipe trains with) is timed on the same batch.

    .venv/bin/python benchmarks/profile_train_step.py              # SmolLM2, torch's default threads
    .venv/bin/python benchmarks/profile_train_step.py --quick      # tiny random model, seconds
    .venv/bin/python benchmarks/profile_train_step.py --trace /tmp/step.json   # also a Chrome trace
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm", "aten::matmul",
              "aten::linear", "aten::_addmm_activation", "aten::addmv", "aten::mv"}
TOKEN_RANGE = "peft.trainable_tokens"
TOKEN_BACKWARD = ("IndexCopyBackward", "EmbeddingBackward")
GROUPS = ("matmul", "attention", "trainable-token path", "optimizer", "data", "other")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2-135M)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    parser.add_argument("--top", type=int, default=12, help="also list the N ops with the most self time")
    parser.add_argument("--trace", default=None, help="write a Chrome trace of the profiled step here")
    parser.add_argument("--no-baseline", action="store_true", help="skip the mode=lora comparison step")
    parser.add_argument("--quick", action="store_true", help="tiny random SmolLM2-shaped model, 16 examples")
    return parser.parse_args(argv)


def mark_token_layers(model) -> list:
    """Put every PEFT ``TrainableTokensLayer`` forward in a ``record_function`` range; returns the hook
    handles (remove them when done)."""
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer
    from torch.profiler import record_function

    handles = []
    for module in model.modules():
        if isinstance(module, TrainableTokensLayer):
            def enter(mod, inputs):
                mod._bench_range = record_function(TOKEN_RANGE)
                mod._bench_range.__enter__()

            def leave(mod, inputs, output):
                mod._bench_range.__exit__(None, None, None)

            handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    return handles


def _ancestors(event):
    names = []
    while event is not None:
        names.append(event.name)
        event = event.cpu_parent
    return names


def _is_head_weight_grad(event, vocab: int, hidden: int) -> bool:
    """An ``mm`` whose output is ``[vocab, hidden]`` (or its transpose): the LM head's weight gradient."""
    shapes = [s for s in (event.input_shapes or []) if s]
    if event.name != "aten::mm" or len(shapes) < 2 or len(shapes[0]) != 2 or len(shapes[1]) != 2:
        return False
    return {shapes[0][0], shapes[1][1]} == {vocab, hidden}


def classify(event, vocab: int, hidden: int) -> str:
    """The group of one profiler event (see the module docstring)."""
    names = _ancestors(event)
    if "demo.data" in names:
        return "data"
    if "demo.optimizer" in names:
        return "optimizer"
    in_backward = "demo.backward" in names
    if in_backward and any(key in n for n in names for key in TOKEN_BACKWARD):
        return "trainable-token path"
    if event.name in MATMUL_OPS:
        if in_backward and _is_head_weight_grad(event, vocab, hidden):
            return "trainable-token path"
        return "matmul"
    if "scaled_dot_product" in event.name or "flash_attention" in event.name:
        return "attention"
    if TOKEN_RANGE in names and event.name not in ("aten::embedding", "aten::embedding_renorm_"):
        return "trainable-token path"
    return "other"


def profile_step(step, vocab: int, hidden: int, trace: str | None = None):
    """Profile one ``step.step()``: ({group: self seconds}, [(op, self seconds)], wall seconds)."""
    from torch.profiler import ProfilerActivity, profile

    handles = mark_token_layers(step.model)
    try:
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            start = time.perf_counter()
            step.step()
            wall = time.perf_counter() - start
    finally:
        for handle in handles:
            handle.remove()
    if trace:
        prof.export_chrome_trace(trace)
    groups = {g: 0.0 for g in GROUPS}
    ops: dict[str, float] = {}
    for event in prof.events():
        seconds = event.self_cpu_time_total / 1e6
        if seconds <= 0:
            continue
        groups[classify(event, vocab, hidden)] += seconds
        ops[event.name] = ops.get(event.name, 0.0) + seconds
    return groups, sorted(ops.items(), key=lambda kv: -kv[1]), wall


def load_model(model_arg, quick: bool):
    import torch

    from demo_step import tiny_smollm2_dir
    from memreason.model import load

    if quick:
        model_arg = str(tiny_smollm2_dir(Path(tempfile.gettempdir()) / "memreason-bench-tiny"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return load(model_arg, dtype="float32", device=device)


def main(argv=None) -> int:
    args = parse_args(argv)
    from demo_step import DemoStep, machine_line

    examples = 16 if args.quick else None
    with tempfile.TemporaryDirectory(prefix="memreason-profile-") as tmp:
        model, tokenizer = load_model(args.model, args.quick)
        hidden = model.config.hidden_size
        step = DemoStep(model, tokenizer, run_dir=Path(tmp) / "ours", examples=examples, sparse_tokens=False)
        vocab = step.model.get_input_embeddings().weight.shape[0]
        print(machine_line(step.device))
        print(f"demo recipe step: mode {step.mode}, batch {step.batch_size}, {len(step.rows)} examples, "
              f"vocab {vocab} x hidden {hidden}")
        step.timed_steps(0, warmup=args.warmup)
        plain, plain_batch = step.timed_steps(1, warmup=0)[0]  # batch `warmup`, without the profiler
        plain_shape = tuple(plain_batch["input_ids"].shape)
        groups, ops, wall = profile_step(step, vocab, hidden, args.trace)  # batch `warmup + 1`
        shape = tuple(step.last_batch["input_ids"].shape)
        real = int(step.last_batch["attention_mask"].sum())
        baseline = sparse = None
        if not args.no_baseline:
            # mode=lora (no new token rows) on a fresh copy of the model; same seed and sampler, so after
            # the same number of warm-up steps it draws the batch ours was timed on without the profiler
            del step
            model, tokenizer = load_model(args.model, args.quick)
            lora = DemoStep(model, tokenizer, run_dir=Path(tmp) / "lora", overrides=["mode=lora"],
                            examples=examples)
            seconds, batch = lora.timed_steps(1, warmup=args.warmup)[0]
            baseline = (seconds, tuple(batch["input_ids"].shape) == plain_shape)
            # what replaced the token path: the recipe's exact sparse forward, same step and batch
            del lora
            model, tokenizer = load_model(args.model, args.quick)
            ours = DemoStep(model, tokenizer, run_dir=Path(tmp) / "sparse", examples=examples, sparse_tokens=True)
            seconds, batch = ours.timed_steps(1, warmup=args.warmup)[0]
            sparse = (seconds, tuple(batch["input_ids"].shape) == plain_shape)

    total = sum(groups.values())
    print(f"profiled step: batch {shape} ({real} real tokens), wall {wall:.2f} s under the profiler; "
          f"summed self time {total:.2f} s. Unprofiled step on batch {plain_shape}: {plain:.2f} s")
    print("\n| part | seconds | share |\n|---|---|---|")
    for group in GROUPS:
        print(f"| {group} | {groups[group]:.3f} | {groups[group] / total:.1%} |")
    print(f"\ntop {args.top} ops by self time:")
    for name, seconds in ops[:args.top]:
        print(f"  {name:55s} {seconds:8.3f} s  {seconds / total:6.1%}")
    token_share = groups["trainable-token path"] / total
    print(f"\ntrainable-token path: {token_share:.1%} of the step "
          f"({'above' if token_share > 0.10 else 'below'} the 10% at which #17 asks for an exact sparse path)")
    if baseline:
        seconds, same = baseline
        print(f"baseline: the same step in mode=lora (LoRA only, no token rows) on batch {plain_shape}"
              f"{'' if same else ' [a different batch: compare with care]'}: {seconds:.2f} s; "
              f"lora+tokens / lora = {plain / seconds:.2f}x (both unprofiled, same batch)")
    if sparse:
        seconds, same = sparse
        where = "the same step" if same else "another batch"
        print(f"memreason's sparse token path (train.sparse_tokens) on {where}: "
              f"{seconds:.2f} s; PEFT's path / sparse = {plain / seconds:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
