"""What is deployed: SavedModel export and publishing, local prediction, TF Serving clients."""
