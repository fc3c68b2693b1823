"""The ensemble: group outputs, boosting fits, learned weights, and the trained ensemble as a model."""
