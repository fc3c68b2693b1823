"""The first-order surrogate of fine-tuning on client subsets, and the affinity it estimates."""
