"""The evaluator actor (`laten-evaluator`): one generation engine (vLLM, or transformers) on its
GPU; it runs whole evaluations there, code sandbox included, reading and writing that node's paths."""
from __future__ import annotations


class EvaluatorActor:
    """Holds one engine at a time; evaluates as many (model, task file) as it is asked to, so a
    study keeps a few of these for all its models instead of starting one per model."""

    def __init__(self, settings: dict, num_cpus: float):
        import torch

        from laten_ray.entry import set_process_defaults
        set_process_defaults()  # no library progress bars in the actor's log
        torch.set_num_threads(max(1, int(num_cpus)))
        self.settings = settings
        self.model, self.engine = None, None  # built by the first evaluation of a model, sized for its prompts

    def evaluate(self, model: str, task: str, data: str, out: str, limit: int | None,
                 progress: bool = True) -> dict:
        from laten_ray.eval.evaluate import evaluate
        if model != self.model:  # another model: its own engine
            getattr(self.engine, "close", lambda: None)()
            self.model, self.engine = model, None
        # a study (progress off) tells a fallback itself, from the summary, once per arm
        summary, self.engine = evaluate(self.model, task, data, out, self.settings, limit, engine=self.engine,
                                        progress=progress, keep_engine=True,
                                        say=None if progress else (lambda line: None))
        return summary
