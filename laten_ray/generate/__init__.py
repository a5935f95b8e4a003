"""The one generation layer: evaluation, the study and the server all generate through it.

    sampling.py    Sampling (validated) and the transformers engine's token choice
    stops.py       stop strings: the text ends before the first one; streaming holds back a
                   possible beginning of one
    base.py        what every engine shares (tokenizer ids, limits, the progress clock)
    hf.py          transformers: one decoding loop, in batches or streamed
    vllm.py        vLLM: arguments, KV-cache plan, Sampling and log-prob translation; LLM for
                   batches, AsyncLLM for streaming
    engine_log.py  vLLM's output to a log file, and its failure in one line
    start.py       which engine runs (vllm | hf | auto), the start checks and the fallback

What differs between the fronts is only what they do with the text: evaluation scores items
(laten_ray/eval), the server speaks HTTP (laten_ray/serve, actors/server.py)."""
from .sampling import GREEDY_BELOW, Sampling
from .start import EngineUnavailable, engine_from_settings, start_batch, start_stream, use_vllm, vllm_available

__all__ = ["GREEDY_BELOW", "Sampling", "EngineUnavailable", "engine_from_settings", "start_batch", "start_stream",
           "use_vllm", "vllm_available"]
