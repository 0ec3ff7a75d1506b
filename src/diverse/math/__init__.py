"""Pure math on tensors: kernels and their gradients, score estimators, CKA and
hyperspherical energy, MMD, predictive metrics, uncertainty scores, calibration,
conformal prediction, selective classification, MCMC diagnostics, annealing
schedules. Nothing here knows about networks, data sets or runs."""
