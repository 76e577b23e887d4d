"""Evaluation: the official metrics in NumPy (`metrics`: AU-ROC, AU-PRO, AU-sPRO; no JAX), the evaluation of a
run on its test images (`evaluate`), its pictures (`pictures`) and the tables of a sweep (`tables`).

Importing this package imports no JAX (`efficientad_jax.metrics` is NumPy/SciPy only)."""
