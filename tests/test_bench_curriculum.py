"""benchmarks/curriculum.py: what the in-rationale curriculum trains, by a rationale's step count."""

import numpy as np
import pytest


@pytest.fixture(scope="module")
def curriculum(load_benchmark):
    return load_benchmark("curriculum")


def test_epochs_train_stage_e_plus_one_then_stage_t(curriculum):
    assert curriculum.epoch_stages(6, 4).tolist() == [1, 2, 3, 4, 4, 4]
    assert curriculum.epoch_stages(3, 4).tolist() == [1, 2, 3]


def test_exposure_counts_epochs_with_the_first_step_an_output(curriculum):
    # A 5-step rationale that gives 4 steps as input until stage 3 (3 there), a 3-step one whole from
    # stage 1, a 4-step one whole only at stage T = 4.
    c = np.array([[4, 4, 4, 3, 0], [1, 0, 0, 0, 0], [3, 2, 2, 1, 0]])
    n = np.array([5, 3, 4])
    first, share = curriculum.epoch_exposure(c, n, 8)  # stages 1, 2, 3, 4, 4, 4, 4, 4
    assert first.tolist() == [5, 8, 5]
    assert share == pytest.approx([(1 + 1 + 2 + 5 * 5) / 5 / 8, 1.0, (2 + 2 + 3 + 5 * 4) / 4 / 8])
    first, share = curriculum.epoch_exposure(c, n, 4)
    assert first.tolist() == [1, 4, 1]
    assert share == pytest.approx([(1 + 1 + 2 + 5) / 5 / 4, 1.0, (2 + 2 + 3 + 4) / 4 / 4])
    table = curriculum.by_steps(np.vstack([c, c[1:2]]), np.append(n, 3), 8)
    assert table[3] == {"rationales": 2, "epochs_first_step_output": 8.0, "share_of_steps_output": 1.0}
    assert table[5]["epochs_first_step_output"] == 5.0
    assert sorted(table) == [3, 4, 5]
