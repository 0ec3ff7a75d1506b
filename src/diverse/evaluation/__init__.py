"""Evaluation of trained members: predictions, metrics files, distribution shift,
post-hoc calibration and conformal sets, the distance to a reference posterior,
and the HTML report."""
