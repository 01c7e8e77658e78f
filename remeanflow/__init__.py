"""Re-MeanFlow: one-step generation by MeanFlow training of EDM2 on rectified teacher couplings."""

import warnings

__version__ = "0.1.0"

# Snakemake marks every directory() output with a `.snakemake_timestamp` file; the Zarr stores
# among them would otherwise warn on every open that this file is no Zarr component.
warnings.filterwarnings("ignore", message=r"Object at \.snakemake_timestamp is not recognized")


def __getattr__(name: str):
    """`remeanflow.load_generator` (from `remeanflow.generate`), imported on first use: a plain
    `import remeanflow` stays light, and no rule's code version depends on the generator tools."""
    if name == "load_generator":
        import importlib

        return importlib.import_module(f"{__name__}.generate").load_generator
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
