"""Rank / energy analysis, FLOP and parameter accounting, reports, the CLI and the demo."""
from .plots import plot_energy, plot_pareto, plot_sensitivity, plot_spectrum
from .sensitivity import SensitivityTable, sensitivity, tradeoff_curve
from .spectra import energy_curve, energy_table, spectra, spectrum, svd_matrix
from .tables import Table

__all__ = ["spectrum", "spectra", "svd_matrix", "energy_curve", "energy_table", "sensitivity", "tradeoff_curve",
           "SensitivityTable", "Table", "plot_energy", "plot_spectrum", "plot_pareto", "plot_sensitivity"]
