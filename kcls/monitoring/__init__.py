"""Drift monitoring: the reference profile, the drift statistics, `kcls monitor`, prediction logs."""
