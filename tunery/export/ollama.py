"""Ollama Modelfile whose TEMPLATE, stop parameters and SYSTEM are derived from the tokenizer's own chat template.

Training renders conversations with the tokenizer's Jinja template (tunery.data.templates); Ollama renders them
with a Go text/template over `.Messages`. Rather than keep hand-written Go templates per model family, the Jinja
template is probed: it renders conversations whose contents are unique markers, and the text found between two
markers is what the template writes between one message and the next. Those "transitions", keyed by the previous
role (or the start) and the next role (or the end, where the generation prompt goes), become a Go template that
replays them over Ollama's messages. The result is replayed here on further conversations and compared with the
Jinja renders; a template that does not survive that comparison is rejected with ExportError, never approximated.

Ollama conventions followed (its server and template package): a Modelfile SYSTEM is sent as a leading system
message when the request has none; consecutive messages of one role are merged; a conversation that ends with an
assistant message is a prefill the model continues, so that message is left open (as Jinja's
continue_final_message renders it); a conversation that ends with a user message gets the generation prompt.

    python -c "from pathlib import Path; from tunery.export.ollama import write_modelfile; \
write_modelfile(Path('runs/RUN/adapter'), Path('out/model.gguf'), Path('out/Modelfile'))"
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tunery.errors import ExportError

START, END = "start", "end"
ROLES = ("system", "user", "assistant")
_PREV_ORDER = (START, *ROLES)

Render = Callable[[list[dict], str], str]  # (messages, mode "gen" | "cont" | "plain") -> text


class _Unexpressible(Exception):
    """The chat template does something a Go template over .Messages cannot replay."""


@dataclass(frozen=True)
class ChatFormat:
    """A chat template as the text it writes between messages, which a Go template over .Messages can replay."""

    # (previous role or START, role or END) -> text written between the previous message's content (or the
    # start) and this message's content (or the end: the generation prompt after a final user message)
    transitions: dict[tuple[str, str], str]
    # previous role -> text before a FINAL assistant message (a prefill), where it differs from the transition
    # (Qwen3 writes an empty think block there)
    prefill: dict[str, str]
    # the bos token the template writes first ("" if none); llama.cpp adds it from the GGUF (add_bos_token), so
    # the Go template leaves it out
    bos: str
    # "turn": a system message is a message with its own transitions (a template that folds it into the first
    # user turn is this case too); "last_user": folded into the last user message, fold[0] + system + fold[1]
    # before its content (Mistral v0.3); "none": the template refuses or drops system messages
    system: str
    fold: tuple[str, str]
    default_system: str | None  # the system prompt the template writes when a conversation has none
    stops: tuple[str, ...]  # end-of-turn markers after an assistant message, then eos
    trimmed_roles: tuple[str, ...]  # roles whose content the template strips of surrounding whitespace
    notes: tuple[str, ...]  # behaviours the Go template cannot reproduce, written into the Modelfile


def chat_format(tokenizer) -> ChatFormat:
    """Derive the ChatFormat of `tokenizer.chat_template`; ExportError when a Go template cannot reproduce it."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    if not isinstance(template, str) or not template:
        raise ExportError("the tokenizer has no chat template to derive the Ollama TEMPLATE from; export from a "
                          "run's adapter/ or model/ folder, where training saves the template it used")
    render = _renderer(tokenizer)
    try:
        fmt = _derive(render, tokenizer, template)
        _verify(fmt, render)
    except _Unexpressible as e:
        raise ExportError(f"the tokenizer's chat template cannot be written as an Ollama TEMPLATE: {e}. Export "
                          "the GGUF without a Modelfile and write its TEMPLATE by hand, or train with a template "
                          "tunery can export (ChatML, Llama 3, Qwen, Mistral, Gemma, Phi-3 style)") from None
    return fmt


def go_template(fmt: ChatFormat, with_bos: bool = False) -> str:
    """The Ollama TEMPLATE (Go text/template over .Messages) that replays `fmt`; all literal text is quoted.
    `with_bos`: write the template's bos too (for a GGUF whose tokenizer does not add it)."""
    last_user = fmt.system == "last_user"
    lines = ['{{- $prev := "start" }}']
    if with_bos and fmt.bos:
        lines.append(_literal(fmt.bos).replace("{{", "{{-", 1))
    if last_user:
        lines += ['{{- $sys := "" }}', "{{- $hassys := false }}"]
    if last_user or fmt.prefill:
        lines += ["{{- range $i, $m := .Messages }}", "{{- $last := eq (len (slice $.Messages $i)) 1 }}"]
    else:
        lines.append("{{- range .Messages }}")
    keyword = "if"
    for role in ROLES:
        branches = _branches(fmt, role)
        if not branches and not (role == "system" and last_user):
            continue
        lines.append(f'{{{{- {keyword} eq .Role "{role}" }}}}')
        keyword = "else if"
        if role == "system" and last_user:
            lines.append('{{- if eq $prev "start" }}{{ $sys = .Content }}{{ $hassys = true }}{{ end }}')
            continue
        fold = ""
        if role == "user" and last_user:
            fold = ("{{ if and $last $hassys }}" + _literal(fmt.fold[0]) + "{{ $sys }}" + _literal(fmt.fold[1])
                    + "{{ end }}")
        for j, (prev, text) in enumerate(branches):
            opening = _literal(text)
            if role == "assistant" and prev in fmt.prefill:
                opening = f"{{{{ if $last }}}}{_literal(fmt.prefill[prev])}{{{{ else }}}}{opening}{{{{ end }}}}"
            lines.append(f'{{{{- {"if" if j == 0 else "else if"} eq $prev "{prev}" }}}}{opening}{fold}'
                         f'{{{{ .Content }}}}{{{{ $prev = "{role}" }}}}')
        lines.append("{{- end }}")
    lines += ["{{- end }}", "{{- end }}"]
    ends = [(prev, fmt.transitions[(prev, END)]) for prev in _PREV_ORDER if fmt.transitions.get((prev, END))]
    for j, (prev, text) in enumerate(ends):
        lines.append(f'{{{{- {"if" if j == 0 else "else if"} eq $prev "{prev}" }}}}{_literal(text)}')
    if ends:
        lines.append("{{- end }}")
    return "\n".join(lines)


def modelfile_text(tokenizer, gguf_filename: str, system: str | None = None, params: dict | None = None,
                   gguf_adds_bos: bool | None = None, adapter_filename: str | None = None) -> str:
    """An Ollama Modelfile: FROM the GGUF, TEMPLATE/stop/SYSTEM derived from the tokenizer's chat template.

    `system` is the SYSTEM prompt (the run's system_prompt); without it, the template's own default system prompt
    (if it writes one) is used. `params` adds PARAMETER lines ({"temperature": 0.7, "stop": ["###"]}).
    `gguf_adds_bos`: the GGUF's tokenizer.ggml.add_bos_token (see gguf_adds_bos()); None assumes it matches the
    template (adds a bos exactly when the template writes one). `adapter_filename`: a LoRA GGUF over FROM's model.
    """
    fmt = chat_format(tokenizer)
    if gguf_adds_bos and not fmt.bos:
        raise ExportError("the GGUF adds a bos token before every prompt (tokenizer.ggml.add_bos_token) but the "
                          "chat template writes none, so Ollama would prompt the model with a token training never "
                          "put there; write the GGUF with add_bos_token false")
    with_bos = gguf_adds_bos is False and bool(fmt.bos)
    if system is not None and fmt.system == "none":
        raise ExportError("the chat template has no place for a system message (it refuses or drops it), so a "
                          "SYSTEM prompt would reach the model in a format it never saw; export without one")
    system = system if system is not None else fmt.default_system
    lines = ["# Ollama Modelfile written by tunery; load it with: ollama create NAME -f Modelfile",
             "# TEMPLATE, stop and SYSTEM are derived from the tokenizer's chat template, the one training used."]
    if with_bos:
        lines.append(f"# The chat template starts with {fmt.bos} and the GGUF does not add it, so TEMPLATE does.")
    elif fmt.bos:
        lines.append(f"# The chat template starts with {fmt.bos}; llama.cpp adds it from the GGUF "
                     "(tokenizer.ggml.add_bos_token), so TEMPLATE leaves it out.")
    lines += [f"# Note: {note}" for note in fmt.notes]
    lines.append(f"FROM {_value(gguf_filename, 'FROM')}")
    if adapter_filename:
        lines.append(f"ADAPTER {_value(adapter_filename, 'ADAPTER')}")
    lines.append(f'TEMPLATE """{go_template(fmt, with_bos)}"""')
    if system:
        lines.append(f'SYSTEM """{_checked(system, "SYSTEM")}"""')
    extra = dict(params or {})
    stops = list(fmt.stops)
    for stop in _as_list(extra.pop("stop", [])):
        if stop not in stops:
            stops.append(stop)
    lines += [f"PARAMETER stop {_value(stop, 'PARAMETER stop', quote=True)}" for stop in stops]
    for key, value in extra.items():
        if not re.fullmatch(r"[A-Za-z0-9_]+", str(key)):
            raise ExportError(f"Modelfile PARAMETER name {key!r} must be letters, digits and _")
        lines += [f"PARAMETER {key} {_param(v, key)}" for v in _as_list(value)]
    return "\n".join(lines) + "\n"


def write_modelfile(tokenizer_dir: Path, gguf_path: Path, out_path: Path, system: str | None = None,
                    adapter: Path | None = None) -> Path:
    """Write the Modelfile for `gguf_path` (FROM relative to the Modelfile's folder) with the template derived
    from the tokenizer saved in `tokenizer_dir` (a run's adapter/ or model/, or a merged export), checked against
    whether the GGUF adds a bos token itself; `adapter`, a LoRA GGUF over it (ADAPTER, relative too)."""
    from tunery.data.templates import ensure_chat_template
    from tunery.models.load import load_tokenizer

    gguf_path, out_path = Path(gguf_path), Path(out_path)
    if not gguf_path.is_file():
        raise ExportError(f"{gguf_path}: no such GGUF file; write the GGUF first, then its Modelfile")
    tokenizer = load_tokenizer(str(tokenizer_dir))
    ensure_chat_template(tokenizer)  # what training did to a tokenizer without one
    if adapter is not None and not Path(adapter).is_file():
        raise ExportError(f"{adapter}: no such adapter GGUF file")
    text = modelfile_text(tokenizer, _relative(gguf_path, out_path), system, gguf_adds_bos=gguf_adds_bos(gguf_path),
                          adapter_filename=_relative(Path(adapter), out_path) if adapter is not None else None)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(text)
    return out_path


def _relative(path: Path, modelfile: Path) -> str:
    """`path` as the Modelfile names it: relative to the Modelfile's folder."""
    try:
        source = os.path.relpath(path.resolve(), modelfile.resolve().parent)
        return source if source.startswith(".") else f"./{source}"
    except ValueError:  # another drive (Windows)
        return str(path.resolve())


def gguf_adds_bos(gguf_path: Path) -> bool:
    """Whether llama.cpp and Ollama put a bos token before each prompt for this GGUF: its
    tokenizer.ggml.add_bos_token (absent: no, llama.cpp's default for the BPE vocabularies tunery writes)."""
    try:
        import gguf
    except ImportError:
        raise ExportError("reading the GGUF's metadata needs the gguf package (pip install gguf)") from None
    try:
        field = gguf.GGUFReader(gguf_path).fields.get(gguf.Keys.Tokenizer.ADD_BOS)
    except (OSError, ValueError, IndexError, KeyError) as e:
        raise ExportError(f"{gguf_path} is not a readable GGUF file ({type(e).__name__}: {e})") from None
    return bool(field.parts[field.data[0]][0]) if field is not None else False


def ollama_create_command(name: str, modelfile: Path) -> list[str]:
    """`ollama create NAME -f Modelfile` as an argument list."""
    part = r"[A-Za-z0-9][A-Za-z0-9._-]*"
    if not re.fullmatch(rf"{part}(/{part})*(:[A-Za-z0-9_][A-Za-z0-9._-]{{0,127}})?", name):
        raise ExportError(f"{name!r} is not an Ollama model name: use letters, digits, '.', '_', '-', an optional "
                          "namespace/ and an optional :tag (e.g. my-model:latest)")
    return ["ollama", "create", name, "-f", str(modelfile)]


# --- deriving the format -------------------------------------------------------------------------------------


def _template_errors() -> tuple[type[Exception], ...]:
    """What a chat template raises on a conversation it refuses (raise_exception, bad indexing, ...)."""
    from jinja2.exceptions import TemplateError

    return (TemplateError, ValueError, TypeError, KeyError, IndexError, AttributeError)


def _renderer(tokenizer) -> Render:
    def render(messages: list[dict], mode: str) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=mode == "gen",
                                             continue_final_message=mode == "cont")
    return render


def _mark(role: str, n: int) -> str:
    return f"@{role[0].upper()}{n}@"


def _msg(marker: str) -> dict:
    return {"role": {"S": "system", "U": "user", "A": "assistant"}[marker[1]], "content": marker}


def _conv(*markers: str) -> list[dict]:
    return [_msg(m) for m in markers]


def _mode(messages: list[dict]) -> str:
    """How Ollama renders this conversation: a final assistant message is continued, anything else prompted."""
    return "cont" if messages[-1]["role"] == "assistant" else "gen"


def _pieces(text: str, markers: list[str]) -> list[str]:
    """The len(markers) + 1 texts around the markers, which must each appear once and in order."""
    pieces, rest = [], text
    for marker in markers:
        if text.count(marker) != 1:
            raise _Unexpressible(f"it does not write each message's text exactly once, verbatim (message "
                                 f"{marker!r} in {text!r})")
        if marker not in rest:
            raise _Unexpressible(f"it reorders messages ({text!r})")
        head, rest = rest.split(marker, 1)
        pieces.append(head)
    return pieces + [rest]


def _probe(render: Render, messages: list[dict], mode: str, what: str) -> str:
    try:
        return render(messages, mode)
    except _template_errors() as e:
        raise _Unexpressible(f"it fails on {what} ({type(e).__name__}: {_one_line(e)})") from None


def _derive(render: Render, tokenizer, template: str) -> ChatFormat:
    u1, a1, u2 = _mark("user", 1), _mark("assistant", 1), _mark("user", 2)
    p = _pieces(_probe(render, _conv(u1, a1, u2), "gen", "a user/assistant conversation"), [u1, a1, u2])
    t = {(START, "user"): p[0], ("user", "assistant"): p[1], ("assistant", "user"): p[2], ("user", END): p[3]}
    c = _pieces(_probe(render, _conv(u1, a1), "cont", "a conversation ending with an assistant message"), [u1, a1])
    prefill = {"user": c[1]} if c[1] != p[1] else {}
    system, fold, notes = _system_shape(render, t)
    default = None
    if system == "turn":
        head, sep, first = t[(START, "system")], t[("system", "user")], t[(START, "user")]
        if first.startswith(head) and first.endswith(sep) and len(first) >= len(head) + len(sep):
            default = first[len(head):len(first) - len(sep)]
    bos = _strip_bos(t, tokenizer.bos_token)
    trimmed = _trimmed_roles(render, system)
    if trimmed:
        notes.append(f"the chat template strips whitespace around {'/'.join(trimmed)} messages and Ollama "
                     "cannot; text without leading or trailing whitespace renders identically")
    if "strftime_now" in template:
        notes.append("the chat template writes the current date; this TEMPLATE keeps the date of export")
    stops = _stops(render, t, tokenizer)
    return ChatFormat(t, prefill, bos, system, fold, default, stops, trimmed, tuple(notes))


def _system_shape(render: Render, t: dict) -> tuple[str, tuple[str, str], list[str]]:
    """How the template writes a system message: "turn", "last_user" or "none"; adds system transitions to `t`."""
    s, u1, a1, u2 = _mark("system", 1), _mark("user", 1), _mark("assistant", 1), _mark("user", 2)
    try:
        first = render(_conv(s, u1), "gen")
        later = render(_conv(s, u1, a1, u2), "gen")
    except _template_errors() as e:
        return "none", ("", ""), [f"the chat template refuses system messages ({_one_line(e)}); this TEMPLATE "
                                  "leaves them out"]
    if s not in later:
        return "none", ("", ""), ["the chat template drops system messages; so does this TEMPLATE"]
    order = sorted((s, u1, a1, u2), key=later.find)
    if order == [s, u1, a1, u2]:
        q = _pieces(first, [s, u1])
        t[(START, "system")], t[("system", "user")] = q[0], q[1]
        notes = _later_system(render, t)
        only = _maybe(render, _conv(s), "gen")
        if only is not None and only.startswith(q[0] + s):
            t[("system", END)] = only[len(q[0] + s):]
        return "turn", ("", ""), notes
    if order == [u1, a1, s, u2]:
        q = _pieces(later, [u1, a1, s, u2])
        between = t[("assistant", "user")]
        if not q[2].startswith(between):
            raise _Unexpressible(f"it writes the system message inside the last user turn in a way that changes "
                                 f"the turn's opening ({q[2]!r} vs {between!r})")
        return "last_user", (q[2][len(between):], q[3]), []
    raise _Unexpressible(f"it writes the system message where a template over .Messages cannot follow ({later!r})")


def _later_system(render: Render, t: dict) -> list[str]:
    """Add (assistant, system) when the template writes a system message after the first turn like the first."""
    s, u1, a1, u2 = _mark("system", 2), _mark("user", 1), _mark("assistant", 1), _mark("user", 2)
    text = _maybe(render, _conv(u1, a1, s, u2), "gen")
    if text is None:
        return ["the chat template refuses system messages after the first turn; this TEMPLATE leaves them out"]
    try:
        q = _pieces(text, [u1, a1, s, u2])
    except _Unexpressible:
        q = None
    if q and q[:2] == [t[(START, "user")], t[("user", "assistant")]] and q[3:] == [t[("system", "user")],
                                                                                    t[("user", END)]]:
        t[("assistant", "system")] = q[2]
        return []
    return ["system messages after the first turn are left out (the chat template writes them differently)"]


def _one_line(error: Exception, limit: int = 160) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[:limit] + "..."


def _maybe(render: Render, messages: list[dict], mode: str) -> str | None:
    try:
        return render(messages, mode)
    except _template_errors():
        return None


def _strip_bos(t: dict, bos_token: str | None) -> str:
    """Remove a leading bos from the transitions out of START; the bos, or "" when the template writes none."""
    if not bos_token or not t[(START, "user")].startswith(bos_token):
        return ""
    for key in [k for k in t if k[0] == START]:
        if not t[key].startswith(bos_token):
            raise _Unexpressible(f"it writes the bos token {bos_token!r} before some conversations only")
        t[key] = t[key][len(bos_token):]
    return bos_token


def _trimmed_roles(render: Render, system: str) -> tuple[str, ...]:
    padded = {role: f" \n {_mark(role, 9)} \n" for role in ROLES}
    order = (["system"] if system != "none" else []) + ["user", "assistant", "user"]
    text = _maybe(render, [{"role": r, "content": padded[r]} for r in order], "gen")
    if text is None:
        raise _Unexpressible("it fails on messages that start or end with whitespace")
    trimmed = []
    for role in dict.fromkeys(order):
        if padded[role] in text:
            continue
        if padded[role].strip() not in text:
            raise _Unexpressible(f"it changes {role} text that starts or ends with whitespace")
        trimmed.append(role)
    return tuple(trimmed)


def _special_tokens(tokenizer) -> list[str]:
    found = [getattr(tokenizer, name, None) for name in ("bos_token", "eos_token", "pad_token", "unk_token")]
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    found += [getattr(token, "content", str(token)) for token in decoder.values()]
    return sorted({tok for tok in found if isinstance(tok, str) and tok}, key=len, reverse=True)


def _stops(render: Render, t: dict, tokenizer) -> tuple[str, ...]:
    """The end-of-turn markers: what the template writes after an assistant message both when the conversation
    ends there and when a user message follows (split at special tokens and whitespace), then eos."""
    u1, a1 = _mark("user", 1), _mark("assistant", 1)
    closed = _probe(render, _conv(u1, a1), "plain", "a finished conversation")
    tail = closed.split(a1, 1)[1] if closed.count(a1) == 1 else ""
    specials = _special_tokens(tokenizer)
    split = re.compile("|".join([re.escape(s) for s in specials] + ["."]), re.S)
    a, b = split.findall(tail), split.findall(t[("assistant", "user")])
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    shared = a[:n]

    def plain_char(atoms: list[str], i: int) -> bool:
        return i < len(atoms) and atoms[i] not in specials and not atoms[i].isspace()

    if plain_char(a, n) or plain_char(b, n):  # the shared text stops inside a word: that word is not a marker
        while shared and shared[-1] not in specials and not shared[-1].isspace():
            shared.pop()
    stops, word = [], ""
    for atom in shared + [" "]:
        if atom in specials or atom.isspace():
            stops += [word] if word else []
            stops += [atom] if atom in specials else []
            word = ""
        else:
            word += atom
    if tokenizer.eos_token:
        stops.append(tokenizer.eos_token)
    return tuple(dict.fromkeys(stops))


# --- checking the format -------------------------------------------------------------------------------------


def _branches(fmt: ChatFormat, role: str) -> list[tuple[str, str]]:
    return [(prev, fmt.transitions[(prev, role)]) for prev in _PREV_ORDER if (prev, role) in fmt.transitions]


def _replay(fmt: ChatFormat, messages: list[dict]) -> str:
    """What go_template(fmt) renders for `messages` (as Ollama passes them), with the bos in front."""
    out, prev, system = [fmt.bos], START, None
    for i, message in enumerate(messages):
        role, content = message["role"], message["content"]
        if role == "system" and fmt.system == "last_user":
            system = content if prev == START else system
            continue
        if (prev, role) not in fmt.transitions:
            continue
        last = i == len(messages) - 1
        out.append(fmt.prefill[prev] if role == "assistant" and last and prev in fmt.prefill
                   else fmt.transitions[(prev, role)])
        if role == "user" and system is not None and last:
            out += [fmt.fold[0], system, fmt.fold[1]]
        out.append(content)
        prev = role
    out.append(fmt.transitions.get((prev, END), ""))
    return "".join(out)


def _verify(fmt: ChatFormat, render: Render) -> None:
    """Replay fmt on conversations it was not derived from and compare with the Jinja renders."""
    chats = [["U"], ["U", "A"], ["U", "A", "U"], ["U", "A", "U", "A"], ["U", "A", "U", "A", "U"]]
    if fmt.system != "none":
        chats += [["S", "U"], ["S", "U", "A"], ["S", "U", "A", "U"], ["S", "U", "A", "U", "A", "U"]]
    if ("assistant", "system") in fmt.transitions:
        chats.append(["U", "A", "S", "U"])
    for roles in chats:
        messages = _conv(*[f"@{r}{20 + i}@" for i, r in enumerate(roles)])
        expected = _probe(render, messages, _mode(messages), f"the conversation {'/'.join(roles)}")
        got = _replay(fmt, messages)
        if got != expected:
            at = next((i for i, (x, y) in enumerate(zip(got, expected)) if x != y), min(len(got), len(expected)))
            lo, hi = max(0, at - 30), at + 30
            raise _Unexpressible(f"for the conversation {'/'.join(roles)} it writes {expected[lo:hi]!r} where "
                                 f"replaying fixed texts between messages gives {got[lo:hi]!r}")


# --- Modelfile text ------------------------------------------------------------------------------------------


def _literal(text: str) -> str:
    """`text` as a Go template action printing it: a Go string literal of printable ASCII only, which survives
    the Modelfile parser (it drops unprintable characters) and `{{-` trimming."""
    if not text:
        return ""
    out = []
    for ch in text:
        code = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch in "\n\t\r":
            out.append({"\n": "\\n", "\t": "\\t", "\r": "\\r"}[ch])
        elif 0x20 <= code < 0x7F:
            out.append(ch)
        elif 0xD800 <= code <= 0xDFFF:
            raise ExportError(f"the chat template contains a lone surrogate U+{code:04X}")
        else:
            out.append(f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    return '{{ "' + "".join(out) + '" }}'


def _checked(text: str, what: str) -> str:
    """Text that Ollama's Modelfile parser keeps as written inside triple quotes."""
    if '"""' in text:
        raise ExportError(f'{what} value {text!r} contains """, which ends a Modelfile value early')
    bad = sorted({ch for ch in text if not (ch.isprintable() or ch in "\n\r\t")})
    if bad:
        raise ExportError(f"{what} value {text!r} contains characters the Modelfile parser drops: "
                          f"{', '.join(f'U+{ord(c):04X}' for c in bad)}")
    return text


def _value(text: str, what: str, quote: bool = False) -> str:
    text = _checked(str(text), what)
    if '"' in text:
        return f'"""{text}"""'
    if quote or not text or any(ch.isspace() for ch in text):
        return f'"{text}"'
    return text


def _param(value: object, key: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return _value(str(value), f"PARAMETER {key}")


def _as_list(value: object) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]
