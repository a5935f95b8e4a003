"""`laten study`: LaTen against controls and baselines on the same items (docs/method.md §10)."""
