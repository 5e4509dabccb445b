"""Reading what a run logged and drawing conclusions from it: the TensorBoard event reader, the figures and
the per-run summary with its verdicts.

Layer rule: modules here import ``lyapunov_callbacks.core`` where they need its constants, matplotlib and
TensorBoard's event reader, never Lightning or ``lyapunov_callbacks.callbacks``: an analysis runs on logs,
without a Trainer.
"""
