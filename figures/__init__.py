"""The figure driver's package: ``make_figures.py`` (the plan runner) and the callbacks only figure runs use."""
