"""``log_measurements``: values land in ``callback_metrics`` / ``progress_bar_metrics`` and in every logger."""

import math

import torch

from lyapunov_callbacks.callbacks._lightning import log_measurements


class Logger:
    def __init__(self):
        self.calls = []

    def log_metrics(self, metrics, step):
        self.calls.append((dict(metrics), step))


class Trainer:
    """Lightning 2.x's shape: the properties return the dictionaries themselves."""

    def __init__(self, copies: bool = False):
        self._callback, self._pbar, self.copies = {}, {}, copies
        self.is_global_zero = True
        self.loggers = [Logger()]

    @property
    def callback_metrics(self):
        return dict(self._callback) if self.copies else self._callback

    @property
    def progress_bar_metrics(self):
        return dict(self._pbar) if self.copies else self._pbar


class Module:
    def __init__(self):
        self.logged = []

    def log(self, name, value, **kw):
        self.logged.append((name, value, kw))


def test_values_are_written_into_the_trainers_dictionaries_and_the_loggers():
    trainer, module = Trainer(), Module()
    log_measurements(trainer, module, {"hessian/h0": 2.5, "hessian/num_hvps": 4, "x": float("nan")}, 7,
                     prog_bar=("hessian/h0",))
    assert module.logged == []  # no LightningModule.log bookkeeping
    assert isinstance(trainer.callback_metrics["hessian/h0"], torch.Tensor)
    assert float(trainer.callback_metrics["hessian/h0"]) == 2.5 and float(trainer.callback_metrics["hessian/num_hvps"]) == 4.0
    assert math.isnan(float(trainer.callback_metrics["x"]))
    assert trainer.progress_bar_metrics == {"hessian/h0": 2.5}
    assert len(trainer.loggers[0].calls) == 1 and trainer.loggers[0].calls[0][1] == 7
    assert trainer.loggers[0].calls[0][0]["hessian/h0"] == 2.5


def test_a_trainer_that_returns_copies_falls_back_to_lightning_module_log():
    trainer, module = Trainer(copies=True), Module()
    log_measurements(trainer, module, {"hessian/h0": 2.5, "optim/lr": 0.1}, 3, prog_bar=("hessian/h0",))
    assert [(n, v, kw["prog_bar"], kw["on_step"], kw["logger"]) for n, v, kw in module.logged] == [
        ("hessian/h0", 2.5, True, True, False), ("optim/lr", 0.1, False, True, False)]
    assert trainer.loggers[0].calls == [({"hessian/h0": 2.5, "optim/lr": 0.1}, 3)]
