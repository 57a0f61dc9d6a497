"""Chat templates: the one source used by training, eval, chat and export.

A tokenizer's own Jinja template wins; a tokenizer without one (base models) gets `DEFAULT_TEMPLATE`,
which is written into the run's tokenizer so every later step renders exactly what training saw.
"""

from __future__ import annotations

import re

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# ChatML as plain text for base models, whose vocabularies lack <|im_start|>: the eos token closes each
# assistant turn so generation stops where training taught it to.
DEFAULT_TEMPLATE = (
    "{{ bos_token if bos_token else '' }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' }}"
    "{% if message['role'] == 'assistant' and eos_token and eos_token != '<|im_end|>' %}{{ eos_token }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def ensure_chat_template(tokenizer) -> bool:
    """Give `tokenizer` the default template when it has none; True when it was added."""
    if getattr(tokenizer, "chat_template", None):
        return False
    tokenizer.chat_template = DEFAULT_TEMPLATE
    return True


# a template that reads the message's reasoning_content field (Qwen3's, DeepSeek-R1's), not one that only names a
# variable so after parsing <think> out of the content
_READS_REASONING = re.compile(r"""message(\.reasoning_content|\[['"]reasoning_content['"]\])""")


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The conversation as the text the model sees. An assistant message's `reasoning` (a trace the data
    carries) goes where the template expects it: its `reasoning_content` field when the template reads one,
    else a `<think>...</think>` block before the reply; either way it is part of the trained reply."""
    as_field = bool(_READS_REASONING.search(tokenizer.chat_template or ""))
    messages = [with_reasoning(m, as_field) for m in messages]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def with_reasoning(message: dict, as_field: bool) -> dict:
    if "reasoning" not in message:
        return message
    rest = {k: v for k, v in message.items() if k != "reasoning"}
    if as_field:
        return {**rest, "reasoning_content": message["reasoning"]}
    return {**rest, "content": f"<think>\n{message['reasoning']}\n</think>\n\n{message['content']}"}


def stop_token_ids(tokenizer) -> list[int]:
    """Token ids that end an assistant turn: eos plus the template's end-of-turn markers when present."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    for marker in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>"):
        if marker in vocab and marker in (tokenizer.chat_template or ""):
            ids.add(vocab[marker])
    return sorted(ids)
