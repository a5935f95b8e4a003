"""Run by test_families.py in a process of its own: each model folder given in vLLM (CPU, engine
in this process, VLLM_ENABLE_V1_MULTIPROCESSING=0, so one import serves every folder), printing
{folder: log-probabilities of the prompt's tokens 1..T-1} as JSON on the last line."""
import gc
import json
import sys


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from laten_ray.generate.vllm import vllm_args
    ids, folders = json.loads(sys.argv[1]), sys.argv[2:]
    out = {}
    for folder in folders:
        llm = LLM(**vllm_args(folder, "float32", "cpu", 256, cpu_kv_cache_gb=0.05), distributed_executor_backend="uni")
        r = llm.generate([TokensPrompt(prompt_token_ids=ids)], SamplingParams(max_tokens=1, prompt_logprobs=0),
                         use_tqdm=False)[0]
        out[folder] = [r.prompt_logprobs[p][tok].logprob for p, tok in enumerate(ids) if p > 0]
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
