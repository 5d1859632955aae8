"""Metrics: arrays in, numbers out. Nothing here runs a model or touches a file.

`classification` (single-label: accuracy, NLL, per-class scores, confusion matrix),
`calibration` (ECE, reliability bins, temperature scaling) and `multilabel` (mAP, F1,
per-label thresholds). They import nothing from kcls: the tasks, the evaluation and the
report call them, never the reverse.
"""
