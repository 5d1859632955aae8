"""Running a classifier over held-out data: predictions, the report, plots, Grad-CAM."""
