from matvlm.training.profiling import quiet_window_start


def test_quiet_window_skips_checkpoint_and_evaluation_steps():
    # profile_at 3000 with eval_every 3000 would profile the held-out evaluation as step time
    assert quiet_window_start(3000, [250, 3000]) == 3001
    start = quiet_window_start(2995, [250, 3000])
    assert start == 3001 and not any(s % 250 == 0 for s in range(start, start + 9))
    assert quiet_window_start(3001, [250, 3000]) == 3001  # already quiet
    assert quiet_window_start(0, [250]) == 0  # off stays off
    assert quiet_window_start(2, [3]) == 2  # a period shorter than the window cannot be avoided
    assert quiet_window_start(7, [0, 0]) == 7  # no saves or evaluations
