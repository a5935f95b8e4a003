"""Ray actors, thin shells over laten_ray: the source and the trainer of a training run."""
