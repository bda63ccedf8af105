"""Training data: finding and checking image/label pairs, the training Zarr store, patches and augmentation."""
