"""ctpo: Cumulative Token Policy Optimization — losses, diagnostics, TIR sandbox, trainers, workflow."""

__version__ = "0.1.0"
