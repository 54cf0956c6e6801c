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
