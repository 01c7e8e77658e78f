"""Re-MeanFlow: one-step generation by MeanFlow training of EDM2 on rectified teacher couplings."""

__version__ = "0.1.0"
