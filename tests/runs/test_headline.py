"""A finished run's one-line result says when early stopping ended it."""

from dcablate.runs.tables import headline_result


def test_the_result_line_says_when_a_run_stopped_early():
    summary = {"final": {"overall": 0.9951}, "wall_time_s": 26.07, "steps": 400, "planned_steps": 600,
               "stopped_early": True}
    assert headline_result(summary, "mqar") == "overall 0.995 in 26.1s, stopped early at step 400 of 600"
    summary["stopped_early"] = False
    assert headline_result(summary, "mqar") == "overall 0.995 in 26.1s"
