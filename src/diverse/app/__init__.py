"""The application edge: configs, the training loop (:func:`diverse.fit`), CLI runs,
checkpointed training, tracking, comparisons, the posterior study, loading a run
for prediction, the Lightning adapter and the command line."""
