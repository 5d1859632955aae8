"""Self-supervised (SimCLR) pretraining of a backbone on unlabelled images, for model.weights."""
