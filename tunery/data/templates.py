"""Chat templates: the one source used by training, eval, chat and export.

A tokenizer's own Jinja template wins; a tokenizer without one (base models) gets `DEFAULT_TEMPLATE`,
which is written into the run's tokenizer so every later step renders exactly what training saw.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

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


def ensure_chat_template(tokenizer, prompt_template: str | None = None) -> bool:
    """Give `tokenizer` the run's `prompt_template` when there is one, else the default template when it has
    none; True when the default was added."""
    if prompt_template:
        tokenizer.chat_template = compile_prompt_template(prompt_template)
        return False
    if getattr(tokenizer, "chat_template", None):
        return False
    tokenizer.chat_template = DEFAULT_TEMPLATE
    return True


PROMPT_SLOTS = ("system", "prompt", "completion")
_SLOT = re.compile(r"\{\{|\}\}|\{(\w*)\}")


def compile_prompt_template(text: str) -> str:
    """A prompt template for a base model, e.g. "### Question:\n{prompt}\n\n### Response:\n{completion}", as a
    Jinja chat template, so training, eval, chat and export all render it the one way chat templates are.

    Slots: `{prompt}` (the user's turn) and `{completion}` (the reply, which ends the template and is trained,
    followed by the eos token), once each; `{system}` (the system text, or nothing) at most once, before the
    prompt, with the blank after it written only when a row has a system text; `{{` and `}}` are literal braces,
    and a typed `\\n` or `\\t` (a shell's single quotes keep the backslash) is a newline or a tab.
    A conversation of several turns repeats the template once per exchange, a blank line apart."""
    from tunery.config import ConfigError

    text = text.replace("\\n", "\n").replace("\\t", "\t")  # typed on a command line: \n is a newline
    pieces: list[tuple[str, str]] = []  # ("text", literal) or ("slot", name)
    at = 0
    for match in _SLOT.finditer(text):
        pieces.append(("text", text[at:match.start()]))
        token = match.group(0)
        if token in ("{{", "}}"):
            pieces.append(("text", token[0]))
        elif match.group(1) not in PROMPT_SLOTS:
            raise ConfigError(f"prompt_template: unknown slot {token}; the slots are "
                              f"{', '.join('{' + s + '}' for s in PROMPT_SLOTS)} (write {{{{ and }}}} for braces)")
        else:
            pieces.append(("slot", match.group(1)))
        at = match.end()
    pieces.append(("text", text[at:]))
    slots = [name for kind, name in pieces if kind == "slot"]
    if slots.count("prompt") != 1 or slots.count("completion") != 1 or slots.count("system") > 1:
        raise ConfigError("prompt_template needs {prompt} and {completion} once each ({system} at most once)")
    if slots[-1] != "completion" or "".join(v for k, v in pieces[pieces.index(("slot", "completion")):]
                                            if k == "text").strip():
        raise ConfigError("prompt_template must end with {completion}: the reply is what follows the prompt")
    if "system" in slots and slots.index("system") > slots.index("prompt"):
        raise ConfigError("prompt_template: {system} must come before {prompt}")

    def literal(value: str) -> str:
        return "{{ " + json.dumps(value, ensure_ascii=False) + " }}" if value else ""

    def jinja(part: list[tuple[str, str]]) -> str:
        out, after_system = [], False
        for kind, value in part:
            if kind == "text" and after_system:  # the blank after {system} only when there is a system text
                gap = value[:len(value) - len(value.lstrip())]
                out.append("{% if ns.system and ns.first %}" + literal(gap) + "{% endif %}" + literal(value[len(gap):]))
            elif kind == "text":
                out.append(literal(value))
            elif value == "system":
                out.append("{{ ns.system if ns.first else '' }}")
            elif value == "prompt":
                out.append("{{ message['content'] }}")
            after_system = kind == "slot" and value == "system"
        return "".join(out)

    user = jinja(pieces[:pieces.index(("slot", "completion"))])
    return ("{%- set ns = namespace(system='', first=true) -%}"
            "{%- for message in messages if message['role'] == 'system' -%}"
            "{%- set ns.system = message['content'] -%}{%- endfor -%}"
            "{{- bos_token if bos_token else '' -}}"
            "{%- for message in messages -%}"
            "{%- if message['role'] == 'user' -%}"
            "{%- if not ns.first %}{{ '\n\n' }}{% endif -%}" + user + "{%- set ns.first = false -%}"
            "{%- elif message['role'] == 'assistant' -%}{{ message['content'] }}{{ eos_token if eos_token else '' }}"
            "{%- endif -%}{%- endfor -%}")


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


# the end-of-turn markers of the common templates (ChatML, Llama 3, Gemma, Phi-3, and an end-of-text token)
END_OF_TURN_MARKERS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")


def stop_token_ids(tokenizer) -> list[int]:
    """Token ids that end an assistant turn: eos plus the template's end-of-turn markers when present."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    for marker in END_OF_TURN_MARKERS:
        if marker in vocab and marker in (tokenizer.chat_template or ""):
            ids.add(vocab[marker])
    return sorted(ids)


@dataclass(frozen=True)
class TemplateFit:
    """What a chat template accepts, found by rendering small conversations (real templates differ: Gemma 1/2
    refuse a system turn, several Mistral templates demand strict user/assistant alternation)."""

    system: bool  # renders a system turn, and its text
    alternation_free: bool  # accepts two user turns in a row


def template_fit(tokenizer) -> TemplateFit:
    """The template's TemplateFit, probed once per tokenizer and template."""
    key = tokenizer.chat_template or ""
    cached = getattr(tokenizer, "_tunery_fit", None)
    if cached is not None and cached[0] == key:
        return cached[1]

    def renders(messages: list[dict], needle: str | None = None) -> bool:
        try:
            text = render(tokenizer, messages)
        except Exception:  # noqa: BLE001 - templates raise TemplateError, or anything from their own code
            return False
        return needle is None or needle in text

    u, a = {"role": "user", "content": "Uq"}, {"role": "assistant", "content": "Aa"}
    fit = TemplateFit(system=renders([{"role": "system", "content": "Ssys"}, u, a], "Ssys"),
                      alternation_free=renders([u, dict(u, content="Uq2"), a]))
    tokenizer._tunery_fit = (key, fit)
    return fit


def fit_messages(tokenizer, messages: list[dict]) -> tuple[list[dict], list[str]]:
    """The conversation reshaped into what the template accepts, and a note for each change: a system turn
    merged into the first user turn where the template has no system role, consecutive turns of one role
    merged where it demands alternation, an assistant turn before any user turn dropped."""
    fit, notes = template_fit(tokenizer), []
    out = [dict(m) for m in messages]
    if not fit.system and any(m["role"] == "system" for m in out):
        kept, pending = [], []
        for m in out:  # each system text goes to the start of the next user turn
            if m["role"] == "system":
                pending.append(m["content"])
            elif m["role"] == "user" and pending:
                kept.append({**m, "content": "\n\n".join([*pending, m["content"]])})
                pending = []
            else:
                kept.append(m)
        out = kept
        notes.append("system turn merged into the next user turn (the template has no system role)")
    # an assistant turn before any user turn answers nothing: dropped whatever the template accepts, so the same
    # data trains the same way on every model (and no template header ends up inside a trained span)
    first_user = next((i for i, m in enumerate(out) if m["role"] == "user"), len(out))
    if any(m["role"] == "assistant" for m in out[:first_user]):
        out = [m for i, m in enumerate(out) if i >= first_user or m["role"] != "assistant"]
        notes.append("opening assistant turn dropped (no user turn before it to answer)")
    if not fit.alternation_free:
        merged: list[dict] = []
        for m in out:
            if merged and merged[-1]["role"] == m["role"] and m["role"] in ("user", "assistant"):
                merged[-1] = {**merged[-1], "content": f"{merged[-1]['content']}\n\n{m['content']}"}
                notes.append(f"consecutive {m['role']} turns merged (the template needs alternating turns)")
            else:
                merged.append(m)
        out = merged
    return out, sorted(set(notes))
