"""bench.mesh_hops's figures: inter-token latency from a receiver's arrivals."""

import math

from bench.mesh_hops import HopRun


def test_itl_spreads_an_arrival_over_its_tokens_and_skips_each_first_arrival():
    run = HopRun(offered=0)
    run.arrivals = {"a": [(0.0, 1), (0.010, 1), (0.030, 2)], "b": [(0.005, 3), (0.045, 4)]}
    # a: 10 ms, then 20 ms shared by two tokens (10, 10); b: 40 ms shared by four (10 x 4)
    assert math.isclose(run.itl(50), 10.0) and math.isclose(run.itl(99), 10.0)
    run.arrivals["c"] = [(0.0, 1), (0.1, 1)]
    assert math.isclose(run.itl(99), 100.0)
    assert math.isnan(HopRun(offered=0).itl(50))
