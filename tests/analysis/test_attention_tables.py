"""Tests of memreason.analysis.attention_tables: masses of teacher-forced tiny-model examples collected
into tables (partition sums, marker totals, bootstrap intervals from memreason.stats), and the files
written and read back without a model."""

from __future__ import annotations

import json

import pytest

from memreason.stats import bootstrap_column_means

from attention_fixtures import collected, scheme_tokenizer  # noqa: F401 - a fixture
from memreason.analysis import attention as A
from memreason.analysis import attention_tables as T


def test_layer_table_means_over_the_partition_sum_to_one_and_markers_is_their_sum(scheme_tokenizer):
    result = collected(scheme_tokenizer)
    rows = T.layer_table(result)
    for layer in range(result.n_layers):
        for group in ("memory", "answer", "markers"):
            cells = {r["key"]: r for r in rows if r["layer"] == layer and r["query"] == group}
            assert sum(cells[k]["mean"] for k in A.KEY_KINDS) == pytest.approx(1.0, abs=1e-6)
            assert cells["markers"]["mean"] == pytest.approx(sum(cells[k]["mean"] for k in A.MARKER_KINDS))
            for cell in cells.values():
                assert cell["ci_low"] - 1e-9 <= cell["mean"] <= cell["ci_high"] + 1e-9
    # the reason-only example (q2) has no memory steps: answer→memory is averaged over 3, seen in 2
    answer_memory = next(r for r in rows if r["layer"] == 0 and r["query"] == "answer" and r["key"] == "memory")
    assert (answer_memory["n"], answer_memory["n_seen"]) == (3, 2)
    assert answer_memory["mean_when_seen"] == pytest.approx(answer_memory["mean"] * 3 / 2)


def test_bootstrap_ci_is_a_point_for_constant_values_and_ignores_invalid_entries():
    import numpy as np

    values = np.array([[0.5, 1.0], [0.5, 3.0], [0.5, 99.0]])
    valid = np.array([[True, True], [True, True], [True, False]])
    mean, low, high, n = bootstrap_column_means(values, valid, seed=1)
    assert mean.tolist() == [0.5, 2.0] and n.tolist() == [3, 2]
    assert low[0] == pytest.approx(0.5) and high[0] == pytest.approx(0.5)
    assert 1.0 <= low[1] <= 2.0 <= high[1] <= 3.0


def test_column_intervals_are_percentiles_of_the_masked_means_of_shared_multinomial_resamples():
    import numpy as np

    rng = np.random.default_rng(3)
    values = rng.random((7, 4))
    valid = rng.random((7, 4)) > 0.3
    valid[:, 3] = False  # a column no example has: no mean, no interval
    mean, low, high, n = bootstrap_column_means(values, valid, seed=5, n_resamples=400)
    weights = np.random.default_rng(5).multinomial(7, np.full(7, 1 / 7), size=400)  # the same resamples
    for column in range(3):
        sample = values[valid[:, column], column]
        assert mean[column] == pytest.approx(sample.mean())
        resampled = [(w * values[:, column] * valid[:, column]).sum() / (w * valid[:, column]).sum()
                     for w in weights if (w * valid[:, column]).sum() > 0]
        assert low[column] == pytest.approx(np.quantile(resampled, 0.025))
        assert high[column] == pytest.approx(np.quantile(resampled, 0.975))
    assert n[3] == 0 and np.isnan([mean[3], low[3], high[3]]).all()


def test_save_then_load_round_trips_without_a_model(scheme_tokenizer, tmp_path):
    import numpy as np

    result = collected(scheme_tokenizer)
    paths = T.save(result, tmp_path)
    back = T.load(tmp_path)
    assert back.ids == result.ids
    assert np.allclose(back.mass, result.mass) and np.array_equal(back.n_queries, result.n_queries)
    assert T.read_table(paths["by_layer"])[0]["layer"] == 0
    summary = json.loads(paths["summary"].read_text())
    assert summary["n_examples"] == 3 and summary["model"] == "tiny"
    counts = [json.loads(line) for line in paths["tokens"].read_text().splitlines()]
    assert counts[2]["marker_memory"] == 0 and counts[2]["marker_reason"] == 4
