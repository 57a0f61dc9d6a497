"""tunery: fine-tuning a small open LLM as ordinary engineering."""

import time

STARTED = time.time()  # when this process imported tunery: `tunery train` reports its time to first step from it
