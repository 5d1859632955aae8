"""Drift monitoring: the reference profile, drift statistics, `kcls monitor`, prediction logs."""
