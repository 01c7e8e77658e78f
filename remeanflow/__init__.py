"""Re-MeanFlow: one-step generation by MeanFlow training of EDM2 on rectified teacher couplings."""

import warnings

__version__ = "0.1.0"

# Snakemake marks every directory() output with a `.snakemake_timestamp` file; the Zarr stores
# among them would otherwise warn on every open that this file is no Zarr component.
warnings.filterwarnings("ignore", message=r"Object at \.snakemake_timestamp is not recognized")
