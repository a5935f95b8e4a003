"""Evaluation: the tasks (tasks.py, one class per task holding every fact about it) and their
protocols (protocol.py), the generation engines (engines.py), batch evaluation with resumable
results and scoring of samples (evaluate.py), paired statistics (stats.py), and the code
sandbox (sandbox.py, sandbox_init.py) with its judge (judge.py)."""
