"""The stopping-rule benchmark (``benchmarks/stopping_rules.py``): its rules replayed on ``lanczos(trace=...)`` stop
where the solver stops, on exact Hessians; its oracle and error measures on hand-made traces; its quick run."""

import math

import pytest
import torch

from dense_hessian import dense_hessian
from lyapunov_callbacks import MatrixOperator, lanczos
from scripts import load_script


def _bench():
    return load_script("benchmarks/stopping_rules.py", "stopping_rules_benchmark", reuse=True)


def _spd(dim: int, seed: int, top: tuple[float, ...]) -> torch.Tensor:
    """A symmetric matrix with eigenvalues ``top`` above a bulk in [0, 1], in a random basis."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    values = torch.cat([torch.tensor(top, dtype=torch.float64),
                        torch.rand(dim - len(top), generator=gen, dtype=torch.float64)])
    return q @ torch.diag(values) @ q.T


def test_trace_records_every_step_and_ends_at_the_returned_value():
    A = _spd(60, 0, (5.0, 4.0))
    trace = []
    res = lanczos(MatrixOperator(A), k=1, tol=1e-8, max_iter=40, trace=trace)
    assert [t[0] for t in trace] == list(range(1, len(trace) + 1))  # one product per step
    assert res.num_hvps == len(trace)
    hvps, ritz, bounds = trace[-1]
    assert ritz == sorted(ritz) and len(ritz) == len(bounds) == len(trace)
    assert ritz[-1] == pytest.approx(float(res.eigenvalues[0]), rel=1e-12)
    assert bounds[-1] <= 1e-8 * ritz[-1]  # the step that stopped met the residual rule
    assert ritz[-1] == pytest.approx(5.0, rel=1e-10)
    # the top Ritz value never decreases (interlacing) and stays below the top eigenvalue
    with pytest.raises(ValueError, match="trace must be a list"):
        lanczos(MatrixOperator(A), k=1, trace=())
    tops = [t[1][-1] for t in trace]
    assert all(b >= a - 1e-12 for a, b in zip(tops, tops[1:])) and max(tops) <= 5.0 + 1e-10


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("tol, safety", [(1e-4, 10.0), (1e-3, 3.0), (1e-2, 1.0)])
def test_the_rules_replayed_on_the_trace_stop_where_the_solver_stops(seed, tol, safety):
    bench = _bench()
    A = _spd(80, seed, (2.0, 1.6, 1.3))
    stopped = {}
    for stop, rule in (("residual", bench.residual_rule), ("gap", bench.gap_rule(safety))):
        trace = []
        res = lanczos(MatrixOperator(A), k=1, tol=tol, max_iter=60, seed=seed, stop=stop, gap_safety=safety,
                      trace=trace)
        # a solve with a tolerance it never meets records every step; the rule replayed on it stops where the
        # solver with that rule stopped, with the value the solver returned
        full = []
        lanczos(MatrixOperator(A), k=1, tol=1e-15, max_iter=60, seed=seed, trace=full)
        step = bench.stop_at(full, rule, tol=tol)
        assert step[0] == res.num_hvps
        assert step[1][-1] == pytest.approx(float(res.eigenvalues[0]), rel=1e-12)
        stopped[stop] = step[0]
    assert stopped["gap"] < stopped["residual"]  # on this spectrum the gap rule saves products at every setting


def test_oracle_and_evaluation_on_a_hand_made_trace():
    bench = _bench()
    ref = 10.0
    # top Ritz values 8, 9.5, 9.95, 9.999 with residuals falling 3, 1, 0.3, 0.01; a second Ritz value at 5 ± 1
    trace = [(1, [8.0], [3.0]), (2, [5.0, 9.5], [1.0, 1.0]), (3, [5.0, 9.95], [1.0, 0.3]),
             (4, [5.0, 9.999], [1.0, 0.01])]
    assert bench.oracle(trace, ref, 1e-2) == 3  # 9.95 is within 0.5 % of 10; 9.5 is not
    assert bench.oracle(trace, ref, 1e-6) is None
    # the residual rule needs r <= 0.01 * 9.999: step 4; the gap rule at safety 1 stops at step 3, where
    # r^2 / gap = 0.09 / (9.95 - 5 - 1) = 0.0228 <= 0.0995; at step 2 0.01 * 9.5 < 1 / 3.5
    assert bench.stop_at(trace, bench.residual_rule, tol=1e-2)[0] == 4
    assert bench.stop_at(trace, bench.gap_rule(1.0), tol=1e-2)[0] == 3
    assert bench.gap_estimate([5.0, 9.95], [1.0, 0.3]) == pytest.approx(0.09 / 3.95)
    # a start-span value mu2 = 9 <= h1 puts the nearest eigenvalue at 9: gap 0.95, estimate 0.0947 <= 0.0995
    assert bench.gap_estimate([5.0, 9.95], [1.0, 0.3], floor=9.0) == pytest.approx(0.09 / 0.95)
    # mu2 = 9.8: the gap (0.15) is below r: no estimate
    assert bench.gap_estimate([5.0, 9.95], [1.0, 0.3], floor=9.8) == math.inf
    assert bench.stop_at(trace, bench.gap_rule(1.0, span_floor=True), tol=1e-2, mu2=9.8)[0] == 4
    # the second pair is resolved only when its residual is at most a tenth of theta1 - theta2 (0.495 here)
    assert bench.stop_at(trace, bench.gap_rule(1.0, resolved=0.1), tol=1e-2)[0] == 4
    result = bench.evaluate([{"trace": trace, "reference": ref}], tol=1e-2)
    assert result["oracle"] == 3 and result["n"] == 1
    gap1 = result["rules"]["gap, safety 1"]
    assert gap1["hvps"] == 3 and gap1["excess"] == 0 and gap1["beyond"] == 0
    assert gap1["max_err"] == pytest.approx(0.005)
    assert result["rules"]["residual"]["excess"] == 1


def test_a_rule_that_trusts_an_unresolved_gap_stops_on_the_second_eigenvalue_of_an_exact_hessian():
    """The failure the benchmark counts, on a small network's exact Hessian: from a start almost orthogonal to the
    top eigenvector, the Krylov space first converges to the second eigenvalue; the gap rule at safety 1 reads the
    bulk as the nearest eigenvalue and stops there, the residual rule does not."""
    bench = _bench()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    x, y = torch.randn(32, 6, dtype=torch.float64), torch.randint(0, 3, (32,))

    def loss_of(f, batch):
        return torch.nn.functional.cross_entropy(f(batch[0]), batch[1])

    H = dense_hessian(model, loss_of, (x, y))
    values, vectors = torch.linalg.eigh(H)
    h0, h1 = float(values[-1]), float(values[-2])
    assert h0 > 1.05 * h1  # the test needs a gap
    # start: mostly the second eigenvector, 1e-4 of the top one, a little of the rest
    gen = torch.Generator().manual_seed(1)
    start = vectors[:, -2] + 1e-4 * vectors[:, -1] + 1e-2 * torch.randn(H.shape[0], generator=gen, dtype=H.dtype)
    trace = []
    lanczos(MatrixOperator(H), k=1, tol=1e-15, max_iter=min(40, H.shape[0]), init=start / start.norm(), trace=trace)
    early = bench.stop_at(trace, bench.gap_rule(1.0), tol=1e-2)
    assert abs(early[1][-1] - h1) <= 1e-2 * h1  # stopped on h1
    assert abs(early[1][-1] - h0) > 1e-2 * h0
    assert bench.oracle(trace, h0, 1e-2) > early[0]


@pytest.mark.slow
def test_quick_run_writes_a_table_whose_default_row_replays_the_monitor(tmp_path):
    import logging

    bench = _bench()
    out = tmp_path / "stopping_rules.md"
    level = logging.getLogger("lightning.pytorch").level
    try:
        result = bench.main(["--quick", "--threads", "1", "--out", str(out)])
    finally:
        logging.getLogger("lightning.pytorch").setLevel(level)
    run = result["small:60:0"]
    assert run["n"] >= 4 and run["same_as_monitor"] == run["n"]
    assert set(run["rules"]) == set(bench.RULES)
    for rule in run["rules"].values():
        assert rule["hvps"] > 0 and 0.0 <= rule["median_err"] <= rule["max_err"] < 1.0
    text = out.read_text()
    assert "load average" in text and "| gap, safety 10 (default) |" in text
