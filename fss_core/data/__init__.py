"""Datasets: image I/O, dataset layouts, folds, preparation, synthetic data, episodes."""
