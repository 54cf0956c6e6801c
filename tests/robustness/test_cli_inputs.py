"""The robustness corpus: malformed and hostile inputs to every verb, run in-process through the CLI.

Each case asserts the exit code and that stderr is exactly one line naming what to fix (``memreason <verb>:
error: ...``) — never a traceback, never exit 0 on garbage — or, for a legitimate input, the documented
result. Every input file is checksummed before and after each case: no verb changes a file it reads.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from memreason.cli import main

pytestmark = pytest.mark.filterwarnings("ignore")


def _row(qid, outcome="correct", **extra):
    return json.dumps({"id": qid, "question": f"Is {qid} true?", "gold": "True", "predicted": "True",
                       "outcome": outcome, "steps": [{"kind": "memory", "text": "A fact."}], "raw": "A fact.\n"
                       "The answer is: True", **extra})


def _paper(records):
    return json.dumps(records)


FILES = {
    "empty.json": b"",
    "emptylist.json": b"[]",
    "false.json": b"false",
    "notes.txt": b"one line of notes\n",
    "garbage.json": b"{not json",
    "nonutf8.json": b"\xff\xfe\x00\x81 not text",
    "nonutf8.jsonl": b'{"id": "a"}\n\xff\xfe\n',
    "torn.jsonl": (_row("a") + "\n" + '{"id": "b", "quest').encode(),
    "results_a.jsonl": "\n".join([_row("a"), _row("b", "wrong"), _row("c")]).encode() + b"\n",
    "results_b.jsonl": "\n".join([_row("x"), _row("y", "wrong")]).encode() + b"\n",
    "noid.jsonl": (json.dumps({"question": "q", "outcome": "correct"}) + "\n").encode(),
    "nullid.jsonl": (json.dumps({"id": None, "question": "q", "outcome": "correct"}) + "\n").encode(),
    "dupid.jsonl": (_row("a") + "\n" + _row("a") + "\n").encode(),
    "future.jsonl": (json.dumps({"schema": "memreason-result/99", "id": "a", "question": "q", "outcome": "x"})
                     + "\n").encode(),
    "list_rows.jsonl": b"[1, 2]\n[3]\n",
    "deep.json": b"[" * 5000 + b"]" * 5000,
    "noanswer.json": _paper([{"question": "Is it?", "cot_steps": ["[rag]: A fact."]}]).encode(),
    "badanswer.json": _paper([{"question": "Is it?", "answer": "Maybe", "cot_steps": []}]).encode(),
    "badtag.json": _paper([{"question": "Is it?", "answer": "True", "cot_steps": ["[guess]: x"]}]).encode(),
    "noquestion.json": _paper([{"answer": "True", "cot_steps": []}]).encode(),
    "dupids.jsonl": (json.dumps({"id": "q1", "question": "A?", "answer": "True", "steps": []}) + "\n"
                     + json.dumps({"id": "q1", "question": "B?", "answer": "False", "steps": []}) + "\n").encode(),
    "scalar_records.json": b"[1, 2, 3]",
    "yaml_empty.yaml": b"",
    "yaml_comment.yaml": b"# nothing here\n",
    "yaml_list.yaml": b"[]\n",
    "yaml_false.yaml": b"false\n",
    "yaml_syntax.yaml": b"optim:\n  lr: [1\n",
    "yaml_badkey.yaml": b"optim:\n  learning_rate: 1e-3\n",
    "yaml_nan.yaml": b"optim:\n  lr: .nan\n",
    "yaml_types.yaml": b"optim:\n  epochs: many\n  batch_size: 1.5\n",
    "yaml_section.yaml": b"optim: 3\n",
    "yaml_nonutf8.yaml": b"\xff\xfe",
    "facts.txt": b"Paris is in France.\n",
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    for name, data in FILES.items():
        (root / name).write_bytes(data)
    (root / "adir").mkdir()
    (root / "results_dir").mkdir()
    (root / "results_dir" / "results.jsonl").write_bytes(FILES["results_a.jsonl"])
    (root / "afile").write_text("x")
    model = root / "model_badconfig"
    model.mkdir()
    (model / "config.json").write_text("{not json")
    typed = root / "model_badtypes"
    typed.mkdir()
    (typed / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": "wide",
                                                   "num_hidden_layers": "two"}))
    _truncated_model(root / "model_truncated")
    run = root / "run_badjson"
    run.mkdir()
    (run / "run.json").write_text("{")
    foreign = root / "run_foreign"
    foreign.mkdir()
    (foreign / "run.json").write_text(json.dumps({"format": "something-else/1"}))
    return root


def _truncated_model(path: Path) -> None:
    from conftest import build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    build_tiny_model(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])


def _checksums(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# (verb argv with {dir} for the inputs directory, expected exit code, a substring of the one stderr line)
ERROR = 2
CASES = {
    # ---- data check
    "data/missing": ("data check {dir}/missing.json", ERROR, "not found"),
    "data/directory": ("data check {dir}/adir", ERROR, ""),
    "data/empty-file": ("data check {dir}/empty.json --task strategyqa", ERROR, ""),
    "data/empty-list": ("data check {dir}/emptylist.json --task strategyqa", ERROR, ""),
    "data/false": ("data check {dir}/false.json --task strategyqa", ERROR, ""),
    "data/notes": ("data check {dir}/notes.txt --task strategyqa", ERROR, ""),
    "data/garbage": ("data check {dir}/garbage.json --task strategyqa", ERROR, ""),
    "data/non-utf8": ("data check {dir}/nonutf8.json --task strategyqa", ERROR, ""),
    "data/non-utf8-jsonl": ("data check {dir}/nonutf8.jsonl --task strategyqa", ERROR, ""),
    "data/deep-nesting": ("data check {dir}/deep.json --task strategyqa", ERROR, ""),
    "data/no-answer": ("data check {dir}/noanswer.json --task strategyqa", ERROR, "answer"),
    "data/bad-answer": ("data check {dir}/badanswer.json --task strategyqa", ERROR, ""),
    "data/unknown-tag": ("data check {dir}/badtag.json --task strategyqa", ERROR, "guess"),
    "data/no-question": ("data check {dir}/noquestion.json --task strategyqa", ERROR, "question"),
    "data/duplicate-ids": ("data check {dir}/dupids.jsonl --task strategyqa", ERROR, "q1"),
    "data/scalar-records": ("data check {dir}/scalar_records.json --task strategyqa", ERROR, ""),
    "data/unknown-task": ("data check bundled:strategyqa --task nosuchtask", ERROR, "nosuchtask"),
    "data/unknown-bundled": ("data check bundled:nosuch", ERROR, "nosuch"),
    "data/bad-split": ("data check bundled:strategyqa --split nosplit", ERROR, ""),
    "data/bad-compound": ("data check bundled:strategyqa --compound-tag sideways", ERROR, "compound"),
    "data/bad-columns": ("data check hf:{dir}/adir --columns nosuchpreset", ERROR, ""),
    "data/hf-missing-dir": ("data check hf:./no/such/dir --task strategyqa", ERROR, ""),
    "data/no-source": ("data check", ERROR, ""),
    "data/bundled-ok": ("data check bundled:strategyqa", 0, None),
    # ---- eval (every one of these fails before any model loads)
    "eval/no-out": ("eval", ERROR, "out"),
    "eval/batch-0": ("eval --out {dir}/o --batch-size 0", ERROR, "batch_size"),
    "eval/batch-neg": ("eval --out {dir}/o --batch-size -3", ERROR, "batch_size"),
    "eval/batch-text": ("eval --out {dir}/o --batch-size abc", ERROR, "batch_size"),
    "eval/max-new-0": ("eval --out {dir}/o --max-new-tokens 0", ERROR, "max_new_tokens"),
    "eval/samples-0": ("eval --out {dir}/o --samples 0", ERROR, "samples"),
    "eval/temperature-neg": ("eval --out {dir}/o --temperature -1", ERROR, "temperature"),
    "eval/temperature-nan": ("eval --out {dir}/o --temperature nan", ERROR, "temperature"),
    "eval/top-p-2": ("eval --out {dir}/o --top-p 2", ERROR, "top_p"),
    "eval/limit-neg": ("eval --out {dir}/o --limit -1", ERROR, "limit"),
    "eval/limit-0": ("eval --out {dir}/o --limit 0", ERROR, "limit"),
    "eval/shots-neg": ("eval --out {dir}/o --shots -1", ERROR, "shots"),
    "eval/task-unknown": ("eval --out {dir}/o --task nosuchtask", ERROR, "nosuchtask"),
    "eval/prompt-style": ("eval --out {dir}/o --prompt-style fancy", ERROR, "prompt_style"),
    "eval/dtype": ("eval --out {dir}/o --dtype float8", ERROR, "dtype"),
    "eval/device-cuda": ("eval --out {dir}/o --device cuda", ERROR, "CUDA"),
    "eval/out-is-file": ("eval --out {dir}/afile", ERROR, "file"),
    "eval/bad-override": ("eval --out {dir}/o nonsense", ERROR, "key=value"),
    "eval/unknown-override": ("eval --out {dir}/o batchsize=3", ERROR, "batch_size"),
    "eval/config-missing": ("eval --config {dir}/missing.yaml --out {dir}/o", ERROR, "not found"),
    "eval/config-empty": ("eval --config {dir}/yaml_empty.yaml --out {dir}/o", ERROR, "empty"),
    "eval/config-list": ("eval --config {dir}/yaml_list.yaml --out {dir}/o", ERROR, "mapping"),
    "eval/config-syntax": ("eval --config {dir}/yaml_syntax.yaml --out {dir}/o", ERROR, "line"),
    "eval/config-dir": ("eval --config {dir}/adir --out {dir}/o", ERROR, "directory"),
    "eval/bad-columns": ("eval --out {dir}/o --columns nosuchpreset", ERROR, "columns"),
    "eval/model-missing": ("eval --out {dir}/o --model {dir}/no_such_model", ERROR, ""),
    "eval/model-badconfig": ("eval --out {dir}/o --model {dir}/model_badconfig", ERROR, ""),
    "eval/model-badtypes": ("eval --out {dir}/o --model {dir}/model_badtypes", ERROR, ""),
    "eval/model-truncated": ("eval --out {dir}/o --model {dir}/model_truncated", ERROR, ""),
    "eval/model-empty-dir": ("eval --out {dir}/o --model {dir}/adir", ERROR, ""),
    "eval/run-badjson": ("eval --out {dir}/o --model {dir}/run_badjson", ERROR, "run.json"),
    "eval/run-foreign": ("eval --out {dir}/o --model {dir}/run_foreign", ERROR, "run"),
    "eval/data-missing": ("eval --out {dir}/o --model {dir}/model_truncated --data {dir}/missing.json", ERROR, ""),
    # ---- compare (read-only)
    "compare/notes": ("compare {dir}/notes.txt {dir}/results_a.jsonl", ERROR, "notes.txt"),
    "compare/missing": ("compare {dir}/missing.jsonl {dir}/results_a.jsonl", ERROR, "missing.jsonl"),
    "compare/directory-without-results": ("compare {dir}/adir {dir}/results_a.jsonl", ERROR, "no results file"),
    "compare/empty": ("compare {dir}/empty.json {dir}/results_a.jsonl", ERROR, ""),
    "compare/garbage": ("compare {dir}/garbage.json {dir}/results_a.jsonl", ERROR, "garbage.json"),
    "compare/non-utf8": ("compare {dir}/nonutf8.jsonl {dir}/results_a.jsonl", ERROR, "UTF-8"),
    "compare/list-rows": ("compare {dir}/list_rows.jsonl {dir}/results_a.jsonl", ERROR, "row 1"),
    "compare/no-id": ("compare {dir}/noid.jsonl {dir}/results_a.jsonl", ERROR, "id"),
    "compare/null-id": ("compare {dir}/nullid.jsonl {dir}/results_a.jsonl", ERROR, "no question id"),
    "compare/duplicate-id": ("compare {dir}/dupid.jsonl {dir}/results_a.jsonl", ERROR, "twice"),
    "compare/future-schema": ("compare {dir}/future.jsonl {dir}/results_a.jsonl", ERROR, "memreason-result/99"),
    "compare/disjoint": ("compare {dir}/results_a.jsonl {dir}/results_b.jsonl", ERROR, "no question in common"),
    "compare/show-negative": ("compare {dir}/results_a.jsonl {dir}/results_a.jsonl --show -5", ERROR, "show"),
    "compare/show-text": ("compare {dir}/results_a.jsonl {dir}/results_a.jsonl --show lots", ERROR, "show"),
    "compare/one-argument": ("compare {dir}/results_a.jsonl", ERROR, ""),
    "compare/torn-ok": ("compare {dir}/torn.jsonl {dir}/results_a.jsonl", 0, None),
    "compare/same-ok": ("compare {dir}/results_dir {dir}/results_a.jsonl", 0, None),
    # ---- report (read-only on its inputs)
    "report/notes": ("report --results {dir}/notes.txt --out {dir}/r.html", ERROR, ""),
    "report/missing": ("report --results {dir}/missing.jsonl --out {dir}/r.html", ERROR, ""),
    "report/garbage": ("report --results {dir}/garbage.json --out {dir}/r.html", ERROR, ""),
    "report/non-utf8": ("report --results {dir}/nonutf8.jsonl --out {dir}/r.html", ERROR, ""),
    "report/empty": ("report --results {dir}/empty.json --out {dir}/r.html", ERROR, ""),
    "report/no-id": ("report --results {dir}/noid.jsonl --out {dir}/r.html", ERROR, ""),
    "report/list-rows": ("report --results {dir}/list_rows.jsonl --out {dir}/r.html", ERROR, ""),
    "report/future-schema": ("report --results {dir}/future.jsonl --out {dir}/r.html", ERROR, ""),
    "report/out-is-dir": ("report --results {dir}/results_a.jsonl --out {dir}/adir", ERROR, ""),
    "report/out-under-file": ("report --results {dir}/results_a.jsonl --out {dir}/afile/r.html", ERROR, ""),
    "report/no-results-flag": ("report", ERROR, "results"),
    # ---- inspect errors (read-only on its inputs)
    "inspect/notes": ("inspect errors --results {dir}/notes.txt --judge exact --gold-data bundled:strategyqa "
                      "--out {dir}/i1", ERROR, ""),
    "inspect/missing": ("inspect errors --results {dir}/missing.jsonl --judge exact --gold-data "
                        "bundled:strategyqa --out {dir}/i2", ERROR, ""),
    "inspect/garbage": ("inspect errors --results {dir}/garbage.json --judge exact --gold-data "
                        "bundled:strategyqa --out {dir}/i3", ERROR, ""),
    "inspect/non-utf8": ("inspect errors --results {dir}/nonutf8.jsonl --judge exact --gold-data "
                         "bundled:strategyqa --out {dir}/i4", ERROR, ""),
    "inspect/no-id": ("inspect errors --results {dir}/noid.jsonl --judge exact --gold-data "
                      "bundled:strategyqa --out {dir}/i5", ERROR, ""),
    "inspect/bad-judge": ("inspect errors --results {dir}/results_a.jsonl --judge oracle", ERROR, "judge"),
    "inspect/world-without-dir": ("inspect errors --results {dir}/results_a.jsonl --judge world "
                                  "--out {dir}/i6", ERROR, ""),
    "inspect/attention-notes": ("inspect attention --results {dir}/notes.txt --out {dir}/i7", ERROR, ""),
    # ---- train (config errors, before any model loads)
    "train/config-missing": ("train --config {dir}/missing.yaml", ERROR, "not found"),
    "train/config-empty": ("train --config {dir}/yaml_empty.yaml", ERROR, "empty"),
    "train/config-comment": ("train --config {dir}/yaml_comment.yaml", ERROR, "empty"),
    "train/config-list": ("train --config {dir}/yaml_list.yaml", ERROR, "mapping"),
    "train/config-false": ("train --config {dir}/yaml_false.yaml", ERROR, "mapping"),
    "train/config-syntax": ("train --config {dir}/yaml_syntax.yaml", ERROR, "line"),
    "train/config-badkey": ("train --config {dir}/yaml_badkey.yaml", ERROR, "learning_rate"),
    "train/config-nan": ("train --config {dir}/yaml_nan.yaml", ERROR, "finite"),
    "train/config-types": ("train --config {dir}/yaml_types.yaml", ERROR, "config errors"),
    "train/config-section": ("train --config {dir}/yaml_section.yaml", ERROR, "optim"),
    "train/config-nonutf8": ("train --config {dir}/yaml_nonutf8.yaml", ERROR, "UTF-8"),
    "train/config-dir": ("train --config {dir}/adir", ERROR, "directory"),
    "train/lr-nan": ("train optim.lr=nan", ERROR, "finite"),
    "train/lr-inf": ("train optim.lr=inf", ERROR, "finite"),
    "train/lr-zero": ("train optim.lr=0", ERROR, "optim.lr"),
    "train/batch-0": ("train optim.batch_size=0", ERROR, "batch_size"),
    "train/epochs-text": ("train optim.epochs=lots", ERROR, "epochs"),
    "train/bad-mode": ("train mode=everything", ERROR, "mode"),
    "train/bad-style": ("train scheme.style=fancy", ERROR, "style"),
    "train/unknown-key": ("train optim.learning_rate=1", ERROR, "learning_rate"),
    "train/section-as-value": ("train optim=3", ERROR, "section"),
    "train/missing-data": ("train data.source={dir}/missing.json data.task=strategyqa", ERROR, "not found"),
    "train/bundled-unknown": ("train data.source=bundled:nosuch", ERROR, "nosuch"),
    "train/val-fraction-0": ("train data.val_fraction=0", ERROR, "val_fraction"),
    "train/malformed-override": ("train optim.lr", ERROR, "key=value"),
    "train/many-errors": ("train optim.lr=nan optim.batch_size=0 lora.r=x", ERROR, "3 config errors"),
    # ---- world
    "world/generate-unknown-key": ("world generate --out {dir}/w n_peple=3", ERROR, "n_people"),
    "world/generate-bad-int": ("world generate --out {dir}/w n_people=many", ERROR, "n_people"),
    "world/generate-small": ("world generate --out {dir}/w n_people=2", ERROR, "n_people"),
    "world/generate-hops": ("world generate --out {dir}/w max_hops=9", ERROR, "hops"),
    "world/generate-pairs": ("world generate --out {dir}/w heldout_pairs=a>b", ERROR, "heldout_pairs"),
    "world/generate-out-file": ("world generate --out {dir}/afile", ERROR, ""),
    "world/ablate-unknown-arm": ("world ablate --out {dir}/wa arms=tokens,cot", ERROR, "arm"),
    "world/ablate-steps-0": ("world ablate --out {dir}/wa reason_steps=0", ERROR, "reason_steps"),
    "world/ablate-lr-text": ("world ablate --out {dir}/wa knowledge_lr=fast", ERROR, "knowledge_lr"),
    "world/ablate-world-key": ("world ablate --out {dir}/wa world.hops=2", ERROR, "world.hops"),
    "world/ablate-config-empty": ("world ablate --config {dir}/yaml_empty.yaml --out {dir}/wa", ERROR, "empty"),
    "world/ablate-malformed": ("world ablate --out {dir}/wa reason_steps", ERROR, "key=value"),
    # ---- annotate
    "annotate/no-key-no-url": ("annotate --data bundled:strategyqa --out {dir}/an --model gpt-test", ERROR,
                               "OPENAI_API_KEY"),
    "annotate/missing-data": ("annotate --data {dir}/missing.json --out {dir}/an2 --base-url "
                              "http://127.0.0.1:9/v1", ERROR, ""),
    "annotate/bad-concurrency": ("annotate --data bundled:strategyqa --out {dir}/an3 --concurrency 0 "
                                 "--base-url http://127.0.0.1:9/v1", ERROR, "concurrency"),
    # ---- serve (argument errors, before the model loads)
    "serve/port-text": ("serve --port web", ERROR, "port"),
    "serve/port-range": ("serve --port 70000", ERROR, "port"),
    "serve/max-queue-0": ("serve --max-queue 0", ERROR, "queue"),
    "serve/read-timeout-neg": ("serve --read-timeout -1", ERROR, "timeout"),
    "serve/model-missing": ("serve --model {dir}/no_such_model --port 0", ERROR, ""),
    # ---- inject sweep / rebalance eval (all before any model loads)
    "inject/layers-text": ("inject sweep --layers abc --out {dir}/s1", ERROR, "layers"),
    "inject/taus-text": ("inject sweep --taus x --out {dir}/s2", ERROR, "taus"),
    "inject/prompts-dir": ("inject sweep --prompts {dir}/adir --out {dir}/s3", ERROR, "is a directory"),
    "inject/prompts-missing": ("inject sweep --prompts {dir}/missing.csv --out {dir}/s4", ERROR, "not found"),
    "inject/limit-neg": ("inject sweep --limit -1 --out {dir}/s5", ERROR, "limit"),
    "inject/dev-fraction": ("inject sweep --dev-fraction 2 --out {dir}/s6", ERROR, "dev_fraction"),
    "inject/out-file": ("inject sweep --out {dir}/afile", ERROR, "is a file"),
    "inject/controls": ("inject sweep --controls nonsense --out {dir}/s7", ERROR, "control"),
    "inject/positions": ("inject sweep --positions zz --out {dir}/s8", ERROR, "positions"),
    "inject/config-notes": ("inject sweep --config {dir}/notes.txt --out {dir}/s9", ERROR, "mapping"),
    "inject/config-empty": ("inject sweep --config {dir}/yaml_empty.yaml --out {dir}/s10", ERROR, "empty"),
    "rebalance/limit-neg": ("rebalance eval --limit -1 --out {dir}/b1", ERROR, "limit"),
    "rebalance/data-missing": ("rebalance eval --data {dir}/missing.csv --out {dir}/b2", ERROR, "missing.csv"),
    "rebalance/mode": ("rebalance eval --mode fast --out {dir}/b3", ERROR, "mode"),
    "rebalance/alpha-text": ("rebalance eval --alpha x --out {dir}/b4", ERROR, "alpha"),
    "rebalance/conditions": ("rebalance eval --conditions nope --out {dir}/b5", ERROR, "condition"),
    "rebalance/out-file": ("rebalance eval --out {dir}/afile", ERROR, "is a file"),
    "rebalance/batch-0": ("rebalance eval --batch-size 0 --out {dir}/b6", ERROR, "batch_size"),
    "rebalance/data-garbage": ("rebalance eval --data {dir}/garbage.json --out {dir}/b7", ERROR, ""),
    # ---- the shell itself
    "cli/unknown-verb": ("frobnicate", ERROR, "frobnicate"),
    "cli/unknown-flag": ("eval --out {dir}/o --no-such-flag", ERROR, "no-such-flag"),
}


@pytest.mark.parametrize("case", sorted(CASES), ids=str)
def test_bad_input_gets_one_clear_line_and_reads_never_write(case, inputs, capsys, monkeypatch):
    command, expected, fragment = CASES[case]
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = _checksums(inputs)
    argv = command.format(dir=inputs).split()
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse exits itself
        code = exc.code
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == expected, f"{case}: exit {code}, stderr: {captured.err[-800:]}"
    assert "Traceback" not in captured.err and "internal error" not in captured.err, captured.err[-800:]
    if expected:
        assert len(lines) == 1, f"{case}: stderr has {len(lines)} lines: {captured.err[-800:]}"
        assert "error" in lines[0] and fragment in lines[0], lines[0]
    after = _checksums(inputs)
    changed = {name for name in before if before[name] != after.get(name)}
    assert not changed, f"{case} changed {changed}"


def test_the_corpus_covers_every_area_with_at_least_150_cases():
    areas = {case.split("/")[0] for case in CASES}
    assert {"data", "eval", "compare", "report", "inspect", "train", "world", "annotate", "serve"} <= areas
    assert len(CASES) >= 150 or pytest.skip(f"{len(CASES)} cases so far")
