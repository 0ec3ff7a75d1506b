"""Networks: the stacked ensemble (members as one ``nn.Module``), the built-in models,
Bayesian layers, the hypernetwork, likelihoods, weight samples, precision, member
sharding over processes, and weight-space symmetries of the models."""
