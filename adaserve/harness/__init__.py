"""The artifact harness: sweeps of the paper's figures, plots and the headline table."""
