"""LMDB datasets, converters, transforms and loaders for SmoothSA (`smoothsa.dataio`)."""
