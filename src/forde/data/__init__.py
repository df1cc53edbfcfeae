"""Datasets, their corrupted test sets and the PCA of the training inputs, each checked where it enters."""
