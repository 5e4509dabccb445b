"""An in-memory Lightning logger for tests: every ``log_metrics`` call, in order."""

from __future__ import annotations

from lightning.pytorch.loggers import Logger


class RecordingLogger(Logger):
    """``records`` is the list of ``(step, metrics)`` the logger was given."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.records.append((step, dict(metrics)))

    def series(self, tag: str) -> dict[int, float]:
        """``{step: value}`` of one tag."""
        return {step: m[tag] for step, m in self.records if tag in m}

    def at(self, step: int) -> dict[str, float]:
        """The first metrics dict logged at ``step``."""
        return next(m for s, m in self.records if s == step)
