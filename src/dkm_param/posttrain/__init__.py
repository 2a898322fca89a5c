"""Post-training compression: palettize (k-means once, no training) and sensitivity from calibration data."""
