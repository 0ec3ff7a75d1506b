"""Data: data sets from standard files, toy problems, OOD sets, synthetic outliers,
corruptions, and augmentation — all in torch, nothing downloaded."""
