"""Entry points for `ray job submit` (train, merge, evaluate, serve); see issues 3 and 4."""
