"""`make figures` says how many runs it will train and how long its plan predicts, before it trains anything."""

from scripts import load_script

make_figures = load_script("figures/make_figures.py", reuse=True)  # the module test_figures.py loaded


def test_the_banner_comes_before_training_and_states_the_plans_prediction(tmp_path, monkeypatch, capsys):
    seen = {}

    def train(runs, spec, args):
        seen["printed_before_training"] = capsys.readouterr().out
        seen["runs"], seen["spec"], seen["args"] = runs, spec, args
        return {}, []

    monkeypatch.setattr(make_figures, "_train", train)
    monkeypatch.setattr(make_figures, "_plot", lambda *a: [])
    monkeypatch.setattr(make_figures, "_summarise", lambda *a: {"md": "summary.md"})
    monkeypatch.setattr(make_figures, "_render_page", lambda *a: "results.md")
    assert make_figures.main(["--data", "synthetic", "--quick", "--jobs", "2", "--logs", str(tmp_path)]) == 0

    runs, spec, args = seen["runs"], seen["spec"], seen["args"]
    plan = make_figures.predict_plan(runs, "synthetic", make_figures.load_rates(), spec, 2)
    seeded = sum(len(r.seeds) for r in runs)
    assert len(runs) == len(make_figures.plan_runs(spec, list(spec["figures"]), "quick")) and seeded >= len(runs)
    expected = (
        f"make_figures: training {len(runs)} runs ({seeded} with their seeds) on data=synthetic, quick scale, "
        f"2 at a time: predicted {plan['wall_s'] / 60:.0f} min wall ({plan['cpu_s'] / 60:.0f} CPU min of one "
        f"thread) from the rates in "
    )
    (line,) = [l for l in seen["printed_before_training"].splitlines() if l.startswith("make_figures: training")]
    assert line.startswith(expected) and line.endswith(", on an idle machine (--plan prints it per run).")
    assert make_figures.start_banner(runs, args, spec) == line
