"""Ray actors, thin shells over laten_ray: the source and the target of a training run, the
evaluator, and the OpenAI server (a Ray Serve deployment)."""
