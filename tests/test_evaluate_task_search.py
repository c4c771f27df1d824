"""The task distillation search's points (pipeline/evaluate/task_search.py): the sweep grammar drawn as Ray Tune's
basic variant generator draws it; the stage runs them in the shared end-to-end run (tests/test_stages_task_distill.py)."""

from pipeline.evaluate import task_search

SPACE = {"task_distill.temperature": {"type": "grid", "values": [1.0, 2.0, 4.0]},
         "task_distill.alpha_kd": {"type": "uniform", "low": 0.2, "high": 0.9},
         "task_distill.alpha_ce": {"type": "loguniform", "low": 0.01, "high": 1.0}}


def test_every_grid_point_comes_num_samples_times_with_the_other_entries_sampled_in_range():
    points = task_search.points(SPACE, 2, seed=0)
    assert len(points) == 3 * 2
    assert sorted(p["temperature"] for p in points) == [1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    assert all(0.2 <= p["alpha_kd"] <= 0.9 and 0.01 <= p["alpha_ce"] <= 1.0 for p in points)
    assert all(type(p["alpha_kd"]) is float for p in points)  # plain numbers: they go into JSON and the loop's extra
    assert len({p["alpha_kd"] for p in points}) == 6  # each point draws its own value


def test_the_points_are_the_same_for_the_same_seed_so_a_resubmitted_search_reruns_the_same_units():
    assert task_search.points(SPACE, 2, seed=0) == task_search.points(SPACE, 2, seed=0)
    assert task_search.points(SPACE, 2, seed=0) != task_search.points(SPACE, 2, seed=1)


def test_the_markdown_lists_every_point_best_first():
    found = {"seed": 0, "trials": [{"settings": {"temperature": 4.0}, "score": 0.75, "trial": 1},
                                   {"settings": {"temperature": 1.0}, "score": 0.7, "trial": 0}]}
    md = task_search.markdown("rt", found)
    assert "| temperature | dev score |" in md and md.index("| 4 | 0.7500 |") < md.index("| 1 | 0.7000 |")
