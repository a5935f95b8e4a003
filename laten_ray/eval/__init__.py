"""Evaluation: the four tasks (tasks.py) and their protocols (protocol.py), the generation
engines (engines.py), batch evaluation with resumable results and scoring of samples
(evaluate.py), paired statistics (stats.py), and the code sandbox (sandbox.py, sandbox_init.py)
with its judge (judge.py)."""
