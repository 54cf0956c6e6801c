from memreason.experiments.demo import pick_examples as _pick_examples
from memreason.traces import Result


def _row(i, outcome, steps, predicted="True"):
    return Result.from_dict({"id": str(i), "question": f"q{i}", "outcome": outcome, "predicted": predicted,
                             "steps": [{"kind": k, "text": t} for k, t in steps]})


def test_demo_shows_correct_well_formed_traces_first_and_never_hides_the_order():
    glitchy = _row(0, "correct", [("memory", "The"), ("reason", "is that water boils."), ("reason", "The")])
    repeated = _row(1, "correct", [("memory", "Ice is frozen water."), ("memory", "Ice is frozen water."),
                                   ("reason", "So it melts when warm.")])
    clean = _row(2, "correct", [("memory", "Ice is frozen water."), ("reason", "So it melts when warm.")])
    wrong = _row(3, "wrong", [("memory", "Paris is in Spain."), ("reason", "So the answer is no.")])
    memory_only = _row(4, "correct", [("memory", "Ice is frozen water.")])
    unparsed = _row(5, "unparseable", [("memory", "Ice is frozen water."), ("reason", "Hence yes.")], None)

    picked = _pick_examples([glitchy, repeated, unparsed, memory_only, wrong, clean])

    assert [r.id for r in picked] == ["2", "0", "1"]
    assert [r.id for r in _pick_examples([unparsed, wrong, memory_only])] == ["3", "5", "4"]


def test_demo_repair_stage_fixes_wrong_answers_from_the_gold_trace_and_prints_a_pair(
        tiny_reasoner, tmp_path, monkeypatch, capsys):
    """The demo's repair stage on a crafted evaluation of a tiny trained model: the memory step that
    contradicts the gold trace is corrected from it, the fix rate is printed with its CI, and one
    before/after pair is shown."""
    from pathlib import Path

    from memreason.cli.demo import _print_repair
    from memreason.evaluate import compare, read_results
    from memreason.experiments import demo
    from repair_fixtures import N_WRONG, crafted_evaluation

    data = crafted_evaluation(tiny_reasoner, tmp_path)
    monkeypatch.setattr(demo, "GOLD_SOURCE", f"gold:{data['base'] / 'gold.jsonl'}")
    rows = read_results(data["base"] / "crafted" / "results.jsonl")
    outcome = demo.DemoOutcome(run_dir=data["model_dir"], base={}, trained={}, base_dir=Path("-"),
                               trained_dir=data["base"] / "crafted", comparison=compare(rows, rows), examples=[],
                               seconds=0.0, train_seconds=0.0)
    demo._repair(outcome, demo.DemoSettings(batch_size=4), tmp_path / "out", None)
    assert outcome.repair["fix"]["count"] == outcome.repair["fix"]["n"] == N_WRONG
    assert outcome.repair_example.outcome == "correct"
    assert outcome.repair_example.extra["repair"]["original"]["outcome"] == "wrong"
    _print_repair(outcome)
    printed = capsys.readouterr().out
    assert f"{N_WRONG} of {N_WRONG} wrong answers" in printed and f"{N_WRONG}/{N_WRONG} = 1.000, 95% CI [" in printed
    assert "before:" in printed and "after:" in printed and "correction of step 1" in printed


def test_demo_settings_switch_off_the_plain_cot_arm_and_the_repair():
    from memreason.cli import build_parser
    from memreason.cli._settings import settings_from_args
    from memreason.experiments.demo import DemoSettings

    args = build_parser().parse_args(["demo", "--skip-plain-cot", "--skip-repair", "--limit", "3"])
    settings = settings_from_args(DemoSettings, args)
    assert settings.skip_plain_cot and settings.skip_repair and settings.limit == 3
    assert not DemoSettings().skip_plain_cot and not DemoSettings().skip_repair
