"""Training methods: the step interface and composition pieces (:mod:`.base`), the
embedding spaces, one module per family, and the one method table (:mod:`.catalog`)."""
