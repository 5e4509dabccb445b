"""The curvature maths in pure PyTorch: Hessian operators, eigen-solvers, tangent dynamics, stability factors,
preconditioning, distributed reductions, the state guard, argument checks, the warm-started eigen tracker and the
quasi-Newton rule.

Layer rule: modules here import ``torch`` and each other, never Lightning, ``lyapunov_callbacks.callbacks`` or
``lyapunov_callbacks.analysis`` (``tests/test_packaging.py`` checks it). Everything here runs in a plain training
loop; the callbacks are thin layers on it.
"""
