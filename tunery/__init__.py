"""tunery: fine-tuning a small open LLM as ordinary engineering."""

import time

STARTED = time.time()  # when this process imported tunery: `tunery train` reports its time to first step from it
# environment variables the CLI set to its defaults because the user had not (tunery/cli/app.py); a process it
# starts may choose otherwise for them (tunery/data/pretokenize.py)
DEFAULTED_ENV: set[str] = set()
