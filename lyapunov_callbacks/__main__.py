"""``python -m lyapunov_callbacks`` runs the same LightningCLI as ``lyapunov-cli``."""

from lyapunov_callbacks.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
