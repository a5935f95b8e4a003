"""The evaluator actor (`laten-evaluator`): one generation engine (vLLM, or transformers) on its
GPU; it runs whole evaluations there, code sandbox included, reading and writing that node's paths."""
from __future__ import annotations


class EvaluatorActor:
    """Holds one engine; evaluates as many task files as it is asked to."""

    def __init__(self, model: str, settings: dict, num_cpus: float):
        import torch

        from laten_ray.entry import set_process_defaults
        set_process_defaults()  # no library progress bars in the actor's log
        torch.set_num_threads(max(1, int(num_cpus)))
        self.model, self.settings = model, settings
        self.engine = None  # built by the first evaluation, sized for its prompts

    def evaluate(self, task: str, data: str, out: str, limit: int | None, progress: bool = True) -> dict:
        from laten_ray.eval.evaluate import evaluate
        # a study (progress off) tells a fallback itself, from the summary, once per arm
        summary, self.engine = evaluate(self.model, task, data, out, self.settings, limit, engine=self.engine,
                                        progress=progress, keep_engine=True,
                                        say=None if progress else (lambda line: None))
        return summary
