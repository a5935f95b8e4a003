"""Ray actors, thin shells over laten_ray: source, trainer, evaluator; see issue 3."""
