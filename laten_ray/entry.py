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
}
# Mistakes a user can fix from the message alone (a config key, a file, a line, a value).
USER_ERRORS = (ConfigError, DataError, FileNotFoundError, FileExistsError, ValueError)


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
