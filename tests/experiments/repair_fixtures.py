"""The crafted evaluation the repair tests share (tests/experiments/test_repair.py, test_demo.py): a tiny
trained Llama's own answer to the boiling question, with its memory step made false and its answer flipped
(8 wrong rows), plus 4 right copies; the gold file that corrects them; a saved copy of the model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from memreason.api import Reasoner
from memreason.evaluate import EvalSettings, evaluate, read_results
from memreason.tasks import get_task
from memreason.traces import Result, Trace

TASK = get_task("strategyqa")
FALSE_FACT = "Water boils at 50 degrees."
N_WRONG, N_RIGHT = 8, 4


def _crafted(own: Result, rid: str, tokenizer) -> Result:
    """The model's own answer to the boiling question with its memory step made false and the answer flipped."""
    raw = own.raw.replace(own.steps[0].text, FALSE_FACT).replace("The answer is: True", "The answer is: False")
    from memreason.model.tokens import parse

    trace = Trace(own.question, parse(raw).steps, "False", meta={"id": rid})
    return own.replace(trace=trace, outcome="wrong", raw=raw,
                       token_ids=tuple(tokenizer(raw, add_special_tokens=False)["input_ids"]))


def crafted_evaluation(tiny_reasoner, base: Path) -> dict:
    """Write the crafted evaluation (``base/crafted``), a 2-row dev one (``base/dev``), ``base/gold.jsonl``
    and the saved model (``base/model``); returns them with the reasoner and the rows."""
    model, tokenizer, scheme, traces = tiny_reasoner
    settings = EvalSettings(model="tiny", task=TASK.name, source="tiny", split=None, prompt_style="plain",
                            scheme=scheme.to_dict(), max_new_tokens=80)
    evaluate(model, tokenizer, traces, TASK, settings, base / "own", batch_size=3)
    own = read_results(base / "own" / "results.jsonl")[2]
    assert own.outcome == "correct" and own.steps[0].kind == "memory", own.raw
    rows = [_crafted(own, f"b{i}", tokenizer) for i in range(N_WRONG)]
    rows += [own.replace(trace=Trace(own.question, own.steps, own.predicted, meta={"id": f"c{i}"}))
             for i in range(N_RIGHT)]
    for name, ids in (("crafted", rows), ("dev", [_crafted(own, f"d{i}", tokenizer) for i in range(2)])):
        (base / name).mkdir()
        (base / name / "results.jsonl").write_text("".join(json.dumps(r.to_dict()) + "\n" for r in ids))
        shutil.copy(base / "own" / "eval_config.json", base / name / "eval_config.json")
    gold = traces[2]
    (base / "gold.jsonl").write_text("".join(
        json.dumps({**gold.to_dict(), "meta": {"id": rid}}) + "\n" for rid in [r.id for r in rows] + ["d0", "d1"]))
    saved = base / "model"
    model.save_pretrained(saved)
    tokenizer.save_pretrained(saved)
    reasoner = Reasoner(model, tokenizer, TASK, scheme, "plain", "tiny", max_new_tokens=80)
    return {"base": base, "gold": gold, "reasoner": reasoner, "model_dir": saved, "rows": rows}
