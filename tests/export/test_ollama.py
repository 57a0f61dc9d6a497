"""The Ollama Modelfile: its TEMPLATE, run by Go's text/template as Ollama runs it, renders every conversation
exactly as the tokenizer's Jinja chat template (the one training used) does.

Needs Go (`apt-get install -y golang-go`): tests/export/go/render.go is built once per session.

    .venv/bin/python -m pytest tests/export/test_ollama.py -q
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tunery.data.templates import CHATML_TEMPLATE, DEFAULT_TEMPLATE
from tunery.errors import ExportError
from tunery.export.ollama import chat_format, modelfile_text, ollama_create_command, write_modelfile

GO_SOURCE = Path(__file__).resolve().parent / "go"

# Faithful copies of the chat-template behaviour of each family (tools branches left out: tunery trains without
# tools), written for these tests from the published templates' logic.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Llama 3.1 / 3.2: a system header is always written, with the knowledge and "today" dates before the system text
LLAMA31_TEMPLATE = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# Qwen2.5: ChatML with a default system prompt when the conversation has none; later system messages are turns
QWEN25_TEMPLATE = """{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Qwen3: no default system prompt; an assistant message after the last user message that ends the conversation
# (a prefill, or the reply in training) gets an empty think block
QWEN3_TEMPLATE = """{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- set content = message.content %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if '</think>' in content %}
            {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n')
                    + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""

# Mistral-7B-Instruct-v0.3: the system message goes into the LAST user turn (and is dropped when an assistant
# message ends the conversation); assistant text is trimmed and closed by eos
MISTRAL_V3_TEMPLATE = """{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- for message in loop_messages %}
    {%- if (message["role"] == "user") != (loop.index0 % 2 == 0) %}
        {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant") }}
    {%- endif %}
{%- endfor %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\\n\\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token }}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, after an optional system message") }}
    {%- endif %}
{%- endfor %}
"""

# Mistral-7B-Instruct-v0.2: the system message is folded into the FIRST user turn
MISTRAL_V2_TEMPLATE = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token }}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, after an optional system message') }}
    {%- endif %}
{%- endfor %}
"""

# Gemma 3: "model" role, system text folded into the first user turn, contents trimmed
GEMMA3_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {{- message['content'] | trim }}
    {{- '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{ '<start_of_turn>model\\n' }}
{%- endif -%}
"""

# Gemma 2: refuses system messages
GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

# Phi-3.5-mini-instruct: <|system|>/<|user|>/<|assistant|> turns closed by <|end|>; eos after a finished chat
PHI35_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and message['content'] %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# Phi-3-mini-4k (first release): the user turn opens the assistant turn itself, system messages are dropped
PHI3_MINI_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') %}{{'<|user|>' + '\n' + message['content'] + '<|end|>' + '\n' + '<|assistant|>'"
    " + '\n'}}{% elif (message['role'] == 'assistant') %}{{message['content'] + '<|end|>' + '\n'}}{% endif %}"
    "{% endfor %}"
)


# LFM2 (Liquid): ChatML turns after <|startoftext|>; the system turn (with a tool list, when tools are given) first
LFM2_TEMPLATE = (
    '{{- bos_token -}}{%- set ns = namespace(system_prompt="") -%}'
    '{%- if messages[0]["role"] == "system" -%}{%- set ns.system_prompt = messages[0]["content"] -%}'
    '{%- set messages = messages[1:] -%}{%- endif -%}'
    '{%- if tools -%}{%- set ns.system_prompt = ns.system_prompt + ("\n" if ns.system_prompt else "") + '
    '"List of tools: <|tool_list_start|>[" -%}{%- for tool in tools -%}{%- if tool is not string -%}'
    '{%- set tool = tool | tojson -%}{%- endif -%}{%- set ns.system_prompt = ns.system_prompt + tool -%}'
    '{%- if not loop.last -%}{%- set ns.system_prompt = ns.system_prompt + ", " -%}{%- endif -%}{%- endfor -%}'
    '{%- set ns.system_prompt = ns.system_prompt + "]<|tool_list_end|>" -%}{%- endif -%}'
    '{%- if ns.system_prompt -%}{{- "<|im_start|>system\n" + ns.system_prompt + "<|im_end|>\n" -}}{%- endif -%}'
    '{%- for message in messages -%}{{- "<|im_start|>" + message["role"] + "\n" -}}'
    '{%- set content = message["content"] -%}{%- if content is not string -%}{%- set content = content | tojson -%}'
    '{%- endif -%}{%- if message["role"] == "tool" -%}'
    '{%- set content = "<|tool_response_start|>" + content + "<|tool_response_end|>" -%}{%- endif -%}'
    '{{- content + "<|im_end|>\n" -}}{%- endfor -%}'
    '{%- if add_generation_prompt -%}{{- "<|im_start|>assistant\n" -}}{%- endif -%}'
)

@dataclass(frozen=True)
class Family:
    template: str
    bos: str | None = None
    eos: str = "<|im_end|>"
    specials: tuple[str, ...] = ()
    stops: tuple[str, ...] = ()
    system: str = "turn"  # the ChatFormat.system expected: "turn", "last_user" or "none"
    refuses_system: bool = False  # the template raises on a system message (rather than dropping it)
    default_system: str | None = None


FAMILIES = {
    "chatml": Family(CHATML_TEMPLATE, stops=("<|im_end|>",)),
    "tunery-default": Family(DEFAULT_TEMPLATE, bos="<s>", eos="</s>", stops=("<|im_end|>", "</s>")),
    "llama3": Family(LLAMA3_TEMPLATE, "<|begin_of_text|>", "<|eot_id|>",
                     ("<|start_header_id|>", "<|end_header_id|>", "<|end_of_text|>"), ("<|eot_id|>",)),
    "llama3.1": Family(LLAMA31_TEMPLATE, "<|begin_of_text|>", "<|eot_id|>",
                       ("<|start_header_id|>", "<|end_header_id|>", "<|end_of_text|>"), ("<|eot_id|>",)),
    "qwen2.5": Family(QWEN25_TEMPLATE, None, "<|im_end|>", ("<|im_start|>", "<|endoftext|>"), ("<|im_end|>",),
                      default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant."),
    "qwen3": Family(QWEN3_TEMPLATE, None, "<|im_end|>", ("<|im_start|>", "<|endoftext|>", "<think>", "</think>"),
                    ("<|im_end|>",)),
    "mistral-v0.3": Family(MISTRAL_V3_TEMPLATE, "<s>", "</s>", ("[INST]", "[/INST]"), ("</s>",), system="last_user"),
    "mistral-v0.2": Family(MISTRAL_V2_TEMPLATE, "<s>", "</s>", (), ("</s>",)),
    "gemma3": Family(GEMMA3_TEMPLATE, "<bos>", "<eos>", ("<start_of_turn>", "<end_of_turn>"),
                     ("<end_of_turn>", "<eos>")),
    "gemma2": Family(GEMMA2_TEMPLATE, "<bos>", "<eos>", ("<start_of_turn>", "<end_of_turn>"),
                     ("<end_of_turn>", "<eos>"), system="none", refuses_system=True),
    "phi3.5": Family(PHI35_TEMPLATE, None, "<|endoftext|>", ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
                     ("<|end|>", "<|endoftext|>")),
    "lfm2": Family(LFM2_TEMPLATE, "<|startoftext|>", "<|im_end|>",
                   ("<|im_start|>", "<|tool_list_start|>", "<|tool_list_end|>", "<|tool_response_start|>",
                    "<|tool_response_end|>"), ("<|im_end|>",)),
    "phi3-mini": Family(PHI3_MINI_TEMPLATE, "<s>", "<|endoftext|>", ("<|user|>", "<|assistant|>", "<|end|>"),
                        ("<|end|>", "<|endoftext|>"), system="none"),
}


def _tokenizer(family: Family):
    from tunery.models.tiny import train_tokenizer

    tok = train_tokenizer(["user\n", "assistant\n", "Name a colour.", "Blue."], vocab_size=300)
    specials = {"eos_token": family.eos}
    if family.bos:
        specials["bos_token"] = family.bos
    tok.add_special_tokens(specials)
    tok.add_tokens(list(family.specials), special_tokens=True)
    tok.chat_template = family.template
    return tok


def S(text: str) -> dict:  # noqa: N802 (reads like the roles in the conversations below)
    return {"role": "system", "content": text}


def U(text: str) -> dict:  # noqa: N802
    return {"role": "user", "content": text}


def A(text: str) -> dict:  # noqa: N802
    return {"role": "assistant", "content": text}


SYSTEM = 'You are terse.\nAnswer "in one line" {{ .Content }} \\ café ☕'
CHATS = {
    "single": [U("Name a colour.")],
    "single+system": [S(SYSTEM), U("Name a colour.")],
    "multi": [U("Name a colour."), A("Blue."), U("Another one?\nOne word, ünïcode ok.")],
    "multi+system": [S(SYSTEM), U("Name a colour."), A("Blue."), U("Another one?"), A("Green, like grass.\n{{ x }}"),
                     U("And <b>a third</b>?")],
    "prefill": [U("Name a colour."), A("Bl")],
    "prefill+system": [S(SYSTEM), U("Name a colour."), A("Blue."), U("Another?"), A("Gre")],
}


def jinja(tokenizer, messages: list[dict]) -> str:
    """The training-side rendering, in the mode Ollama uses: continue a final assistant message, else prompt."""
    cont = messages[-1]["role"] == "assistant"
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=not cont,
                                         continue_final_message=cont)


def modelfile_fields(text: str) -> dict:
    """TEMPLATE, SYSTEM and stop values of a Modelfile written by modelfile_text."""
    template = re.search(r'^TEMPLATE """(.*?)"""$', text, re.S | re.M)
    system = re.search(r'^SYSTEM """(.*?)"""$', text, re.S | re.M)
    return {"template": template.group(1), "system": system.group(1) if system else "",
            "stops": re.findall(r'^PARAMETER stop "(.*)"$', text, re.M),
            "from": re.search(r"^FROM (.*)$", text, re.M).group(1)}


@pytest.fixture(scope="session")
def go_render(tmp_path_factory):
    """render(cases) -> texts: the cases run through Go's text/template exactly as Ollama feeds its templates."""
    go = shutil.which("go")
    if go is None:
        pytest.fail("Go is not installed, and the Ollama template parity tests execute the generated TEMPLATE with "
                    "Go's text/template as Ollama does: install it (Debian/Ubuntu: apt-get install -y golang-go)")
    tmp = tmp_path_factory.mktemp("go")
    env = {**os.environ, "HOME": str(tmp), "GOCACHE": str(tmp / "cache"), "GOPATH": str(tmp / "gopath"),
           "GOTOOLCHAIN": "local", "GOPROXY": "off", "GOFLAGS": "", "CGO_ENABLED": "0", "GO111MODULE": "on"}
    binary = tmp / "render"
    build = subprocess.run([go, "build", "-o", str(binary), "."], cwd=GO_SOURCE, env=env, capture_output=True,
                           text=True, timeout=300)
    assert build.returncode == 0, f"go build failed:\n{build.stdout}\n{build.stderr}"

    def render(cases: list[dict]) -> list[str]:
        proc = subprocess.run([str(binary)], input=json.dumps(cases), capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        results = json.loads(proc.stdout)
        errors = [r["error"] for r in results if r.get("error")]
        assert not errors, f"Go template execution failed: {errors}"
        return [r["text"] for r in results]

    return render


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_go_template_renders_like_jinja(name: str, go_render):
    family = FAMILIES[name]
    tok = _tokenizer(family)
    fields = modelfile_fields(modelfile_text(tok, "./model.gguf"))
    fmt = chat_format(tok)
    chats = {k: v for k, v in CHATS.items() if not (family.refuses_system and "system" in k)}
    expected = [jinja(tok, chat) for chat in chats.values()]
    # raw template (no Modelfile SYSTEM), then as `ollama run` sends it: Modelfile SYSTEM prepended when none given
    got = go_render([{"template": fields["template"], "messages": chat, "system": ""} for chat in chats.values()])
    with_system = go_render([{"template": fields["template"], "messages": chat, "system": fields["system"]}
                             for chat in chats.values()])
    for chat_name, want, raw, served in zip(chats, expected, got, with_system):
        assert fmt.bos + raw == want, f"{name} / {chat_name}"
        assert fmt.bos + served == want, f"{name} / {chat_name} with the Modelfile SYSTEM"
    assert fields["stops"] == list(family.stops)
    assert fmt.bos == (family.bos or "")
    assert fmt.system == family.system
    if family.bos:
        assert family.bos not in fields["template"]


@pytest.mark.parametrize("name", sorted(n for n, f in FAMILIES.items() if f.system != "none"))
def test_modelfile_system_renders_like_a_system_message(name: str, go_render):
    """SYSTEM in the Modelfile reaches the model as the training template writes a system message."""
    tok = _tokenizer(FAMILIES[name])
    fields = modelfile_fields(modelfile_text(tok, "./model.gguf", system=SYSTEM))
    assert fields["system"] == SYSTEM
    fmt = chat_format(tok)
    chats = [c for k, c in CHATS.items() if "system" not in k]
    got = go_render([{"template": fields["template"], "messages": c, "system": fields["system"]} for c in chats])
    for chat, text in zip(chats, got):
        assert fmt.bos + text == jinja(tok, [S(SYSTEM), *chat])


def test_default_system_prompt_is_derived():
    qwen = modelfile_fields(modelfile_text(_tokenizer(FAMILIES["qwen2.5"]), "./m.gguf"))
    assert qwen["system"] == FAMILIES["qwen2.5"].default_system
    assert chat_format(_tokenizer(FAMILIES["llama3.1"])).default_system == ""  # a header, but no text
    llama = modelfile_text(_tokenizer(FAMILIES["llama3.1"]), "./m.gguf")
    assert "\nSYSTEM " not in llama and "Cutting Knowledge Date" in llama
    assert chat_format(_tokenizer(FAMILIES["chatml"])).default_system is None


def test_shapes_and_notes():
    qwen3 = chat_format(_tokenizer(FAMILIES["qwen3"]))
    assert qwen3.prefill == {"user": "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"}
    assert chat_format(_tokenizer(FAMILIES["qwen2.5"])).prefill == {}
    assert chat_format(_tokenizer(FAMILIES["mistral-v0.3"])).fold == ("", "\n\n")
    gemma3 = chat_format(_tokenizer(FAMILIES["gemma3"]))
    assert gemma3.system == "turn" and set(gemma3.trimmed_roles) == {"user", "assistant"}
    assert any("after the first turn" in n for n in gemma3.notes)
    llama = modelfile_text(_tokenizer(FAMILIES["llama3"]), "./m.gguf")
    assert "# Note: the chat template strips whitespace around system/user/assistant" in llama
    assert "# The chat template starts with <|begin_of_text|>" in llama


def test_template_without_system_support_refuses_a_system_prompt(go_render):
    tok = _tokenizer(FAMILIES["gemma2"])
    text = modelfile_text(tok, "./m.gguf")
    assert "# Note: the chat template refuses system messages" in text
    with pytest.raises(ExportError, match="no place for a system message"):
        modelfile_text(tok, "./m.gguf", system="Be terse.")
    # a system message sent through Ollama anyway is left out, as the training data never had one
    [got] = go_render([{"template": modelfile_fields(text)["template"], "messages": CHATS["multi+system"],
                        "system": ""}])
    assert "<bos>" + got == jinja(tok, CHATS["multi+system"][1:])


@pytest.mark.parametrize("template, match", [
    # a turn counter: the text between messages changes with the position
    ("{% for m in messages %}### Turn {{ loop.index }} ({{ m['role'] }})\n{{ m['content'] }}\n{% endfor %}"
     "{% if add_generation_prompt %}### Turn {{ messages|length + 1 }} (assistant)\n{% endif %}",
     "replaying fixed texts"),
    # message text rewritten
    ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] | lower }}</{{ m['role'] }}>{% endfor %}",
     "exactly once, verbatim"),
    # the system message written after the conversation
    ("{% for m in messages if m['role'] != 'system' %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
     "{% if messages[0]['role'] == 'system' %}[SYS]{{ messages[0]['content'] }}{% endif %}"
     "{% if add_generation_prompt %}<assistant>{% endif %}",
     "where a template over .Messages cannot follow"),
    # refuses a plain user/assistant conversation
    ("{{ raise_exception('no chat here') }}", "no chat here"),
])
def test_unexpressible_templates_are_rejected(template: str, match: str):
    tok = _tokenizer(FAMILIES["chatml"])
    tok.chat_template = template
    with pytest.raises(ExportError, match=match) as err:
        modelfile_text(tok, "./m.gguf")
    assert "cannot be written as an Ollama TEMPLATE" in str(err.value)


def test_tokenizer_without_template_is_rejected():
    tok = _tokenizer(FAMILIES["chatml"])
    tok.chat_template = None
    with pytest.raises(ExportError, match="no chat template"):
        chat_format(tok)


def test_clock_dependent_template_is_noted():
    tok = _tokenizer(FAMILIES["chatml"])
    tok.chat_template = "{{ '# ' + strftime_now('%Y') + '\n' }}" + CHATML_TEMPLATE
    assert "the date of export" in modelfile_text(tok, "./m.gguf")


def test_modelfile_values_are_safe_for_ollamas_parser():
    tok = _tokenizer(FAMILIES["gemma3"])
    text = modelfile_text(tok, "./my model.gguf", params={"temperature": 0.2, "num_ctx": 4096, "stop": ["###"]})
    fields = modelfile_fields(text)
    assert fields["from"] == '"./my model.gguf"'
    assert fields["stops"] == ["<end_of_turn>", "<eos>", "###"]
    assert "PARAMETER temperature 0.2\nPARAMETER num_ctx 4096\n" in text
    # the Modelfile parser drops unprintable characters: the template is printable ASCII only
    assert all(ch == "\n" or 0x20 <= ord(ch) < 0x7F for ch in fields["template"])
    assert '"""' not in fields["template"]
    with pytest.raises(ExportError, match='contains """'):
        modelfile_text(tok, "./m.gguf", system='say """ hi')
    with pytest.raises(ExportError, match="U\\+0007"):
        modelfile_text(tok, "./m.gguf", system="bell \a")
    with pytest.raises(ExportError, match="PARAMETER name"):
        modelfile_text(tok, "./m.gguf", params={"bad key": 1})


def _gguf(path: Path, add_bos: bool | None) -> Path:
    """A metadata-only GGUF file: all write_modelfile reads from it is tokenizer.ggml.add_bos_token."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_write_modelfile(tmp_path: Path, go_render):
    tok = _tokenizer(FAMILIES["qwen2.5"])
    tok.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "export"
    out.mkdir()
    gguf = _gguf(out / "model.gguf", add_bos=False)
    path = write_modelfile(tmp_path / "adapter", gguf, out / "Modelfile", system="Be terse.")
    fields = modelfile_fields(path.read_text())
    assert fields["from"] == "./model.gguf" and fields["system"] == "Be terse."
    [text] = go_render([{"template": fields["template"], "messages": CHATS["multi"], "system": fields["system"]}])
    assert text == jinja(tok, [S("Be terse."), *CHATS["multi"]])
    elsewhere = write_modelfile(tmp_path / "adapter", gguf, tmp_path / "ollama" / "Modelfile")
    assert modelfile_fields(elsewhere.read_text())["from"] == "../export/model.gguf"
    with pytest.raises(ExportError, match="no such GGUF"):
        write_modelfile(tmp_path / "adapter", out / "missing.gguf", out / "Modelfile")
    (out / "fake.gguf").write_text("not a gguf")
    with pytest.raises(ExportError, match="not a readable GGUF"):
        write_modelfile(tmp_path / "adapter", out / "fake.gguf", out / "Modelfile")
    # a GGUF that adds a bos the chat template never writes would prompt the model with an unseen token
    with pytest.raises(ExportError, match="writes none"):
        write_modelfile(tmp_path / "adapter", _gguf(out / "bos.gguf", add_bos=True), out / "Modelfile")


@pytest.mark.parametrize("add_bos", [True, False, None])
def test_bos_follows_the_gguf(tmp_path: Path, go_render, add_bos):
    """The template's bos comes from the GGUF when it adds one, else from TEMPLATE: exactly one either way."""
    tok = _tokenizer(FAMILIES["llama3.1"])
    tok.save_pretrained(tmp_path / "model")
    gguf = _gguf(tmp_path / "model.gguf", add_bos)
    fields = modelfile_fields(write_modelfile(tmp_path / "model", gguf, tmp_path / "Modelfile").read_text())
    [text] = go_render([{"template": fields["template"], "messages": CHATS["multi+system"], "system": ""}])
    added = "<|begin_of_text|>" if add_bos else ""
    assert added + text == jinja(tok, CHATS["multi+system"])
    assert text.count("<|begin_of_text|>") == (0 if add_bos else 1)


def test_ollama_create_command(tmp_path: Path):
    assert ollama_create_command("dates:v1", tmp_path / "Modelfile") == [
        "ollama", "create", "dates:v1", "-f", str(tmp_path / "Modelfile")]
    assert ollama_create_command("me/dates-tuned.q4", tmp_path / "M")[2] == "me/dates-tuned.q4"
    for bad in ("", "has space", "-flag", "a:b:c", "x/"):
        with pytest.raises(ExportError, match="not an Ollama model name"):
            ollama_create_command(bad, tmp_path / "Modelfile")
