"""The Lightning layer: the three callbacks, the glue between a running ``Trainer`` and the core (loss
resolution, micro-batches, the probe batch, setup checks, step-accurate logging) and the TensorBoard layout.

Layer rule: modules here import Lightning and ``lyapunov_callbacks.core``, never ``lyapunov_callbacks.analysis``.
Each callback validates its arguments, collects what a step offers, asks a core object, applies its answer and
logs; the maths and the decisions live in the core.
"""
