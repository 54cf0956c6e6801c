from memreason.cli.demo import _pick_examples


def _row(i, outcome, steps, predicted="True"):
    return {"id": str(i), "outcome": outcome, "predicted": predicted,
            "steps": [{"kind": k, "text": t} for k, t in steps],
            "n_memory": sum(k == "memory" for k, _ in steps), "n_reason": sum(k == "reason" for k, _ in steps)}


def test_demo_shows_correct_well_formed_traces_first_and_never_hides_the_order():
    glitchy = _row(0, "correct", [("memory", "The"), ("reason", "is that water boils."), ("reason", "The")])
    repeated = _row(1, "correct", [("memory", "Ice is frozen water."), ("memory", "Ice is frozen water."),
                                   ("reason", "So it melts when warm.")])
    clean = _row(2, "correct", [("memory", "Ice is frozen water."), ("reason", "So it melts when warm.")])
    wrong = _row(3, "wrong", [("memory", "Paris is in Spain."), ("reason", "So the answer is no.")])
    memory_only = _row(4, "correct", [("memory", "Ice is frozen water.")])
    unparsed = _row(5, "unparseable", [("memory", "Ice is frozen water."), ("reason", "Hence yes.")], None)

    picked = _pick_examples([glitchy, repeated, unparsed, memory_only, wrong, clean])

    assert [r["id"] for r in picked] == ["2", "0", "1"]
    assert [r["id"] for r in _pick_examples([unparsed, wrong, memory_only])] == ["3", "5", "4"]
