"""What every entry point shares (the `laten` command and each `python -m jobs.*`): the
process-wide environment defaults, and one way to report a user's mistake:
`laten: error: ...` on stderr and exit status 2, with no traceback."""
from __future__ import annotations

import os
import sys
import warnings
from typing import Callable

from .config import ConfigError
from .records import DataError

# Set before Ray or a tokenizer starts; Ray actors get them through their runtime_env too.
ENV_DEFAULTS = {
    "RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": "1",  # torch tensors through the object store unpickled
    "TOKENIZERS_PARALLELISM": "false",          # no tokenizer threads beside torch's, no fork warning
    "RAY_TRAIN_ENABLE_STATE_TRACKING": "1",     # Ray Train's run state (a study's LoRA arms) kept for its API
    "RAY_CHDIR_TO_TRIAL_DIR": "0",              # Ray Train workers keep the working directory (relative paths)
}
# Forwarded from this process to Ray workers when set here: where models, data and caches live.
PASSED_ON = ("LATEN_CACHE", "HF_HOME", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
# Mistakes a user can fix from the message alone (a config key, a file, a line, a value).
USER_ERRORS = (ConfigError, DataError, FileNotFoundError, FileExistsError, ValueError)


def worker_env(num_cpus: float | None = None, **extra: str) -> dict[str, str]:
    """The env_vars of a Ray worker's runtime_env: the defaults, what this process passes on,
    `extra`, and with `num_cpus` as many OpenMP threads (at least 1)."""
    env = {**ENV_DEFAULTS, **{k: os.environ[k] for k in PASSED_ON if k in os.environ}, **extra}
    if num_cpus is not None:
        env["OMP_NUM_THREADS"] = str(max(1, int(num_cpus)))
    return env


def unknown_options(command: str | None, argv: list[str], extra: list[str]) -> str:
    """The error for words argparse did not know: for a config value given as an option
    (`--lr 1e-3`) the key=value it should be (laten_ray/hints.py)."""
    from .config import Config
    from .hints import option_as_override
    schemas = [("", Config, None)]
    if command in ("study", "arm"):  # a study's own keys, and LaTen's under `laten.`
        from .study.config import LATEN_SECTIONS, StudyConfig
        schemas = [("", StudyConfig, None), ("laten.", Config, LATEN_SECTIONS)]
    options = [w for w in extra if w.startswith("--")]
    hint = option_as_override(schemas, argv, options) if command and options else None
    return hint or f"unrecognized arguments: {' '.join(extra)}"


def parse_args(p, argv: list[str] | None, command: str | None = None):
    """p.parse_args, with unknown_options' message for what it does not know."""
    argv = sys.argv[1:] if argv is None else argv
    args, extra = p.parse_known_args(argv)
    if extra:
        p.error(unknown_options(command, argv, extra))
    return args


def set_process_defaults() -> None:
    """Environment defaults (an explicit setting wins) and quiet library progress bars."""
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    # Received slices are read-only buffers that nothing writes to (see actors/common.py).
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


def run(main: Callable[[], int | None]) -> int:
    """Run an entry point's body with the process defaults set; a user error is one line."""
    set_process_defaults()
    try:
        return main() or 0
    except USER_ERRORS as e:
        print(f"laten: error: {e}", file=sys.stderr, flush=True)
        return 2
