"""Lightning callbacks that measure Hessian curvature and the Lyapunov exponent of training."""
