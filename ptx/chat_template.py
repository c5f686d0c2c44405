"""Chat templates as transformers renders them: Jinja in an immutable sandbox, with the
globals and filters Hugging Face templates use (raise_exception, strftime_now, tojson,
namespace, the `{% generation %}` tag)."""
import datetime
import json
import os

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ptx.sources import DataError

CHAT_TEMPLATE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"


def read_templates(path: str, config: dict) -> tuple[dict[str, str], str]:
    """({name: Jinja source}, the file they come from).

    chat_template.jinja wins over tokenizer_config.json's "chat_template" (a
    string, or a list of {"name", "template"}), as in transformers.
    """
    file = os.path.join(path, CHAT_TEMPLATE)
    if os.path.isfile(file):
        with open(file, encoding="utf-8") as f:
            return {"default": f.read()}, file
    file = os.path.join(path, TOKENIZER_CONFIG)
    source = config.get("chat_template")
    if source is None:
        return {}, file
    if isinstance(source, str):
        return {"default": source}, file
    if isinstance(source, list) and all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                        and isinstance(t.get("template"), str) for t in source):
        return {t["name"]: t["template"] for t in source}, file
    raise DataError(f"{file}: chat_template must be a string or a list of {{name, template}}, "
                     f"got {source!r:.200}")


def plain_message(message: dict) -> dict:
    """A message as transformers hands it to templates: None values dropped, reasoning aliased."""
    message = {k: v for k, v in message.items() if v is not None}
    reasoning = next((message[k] for k in ("reasoning_content", "thinking", "reasoning") if k in message), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message


class _GenerationTag(jinja2.ext.Extension):
    """Parses transformers' `{% generation %}...{% endgeneration %}` assistant marker as its body.

    assistant_spans finds turns from the rendering itself, so that templates
    without markers (Llama 3, Qwen3, Gemma 3) work too.
    """
    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class _TemplateDict:
    """dict() and dict.fromkeys() for templates, without handing them the dict type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _SafeNamespace(jinja2.utils.Namespace):
    """namespace() refusing underscore names, which could reach Python internals from a template."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        for name in dict(*args, **kwargs):
            _SafeNamespace.check(name)
        jinja2.utils.Namespace.__init__(self, *args, **kwargs)

    def __setitem__(self, name, value):
        _SafeNamespace.check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat template sets namespace attribute {name!r}")


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson escapes HTML characters; templates expect plain json.dumps.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def compile_template(source: str, where: str) -> jinja2.Template:
    """A chat template compiled in transformers' environment: a sandbox that templates (untrusted
    code from the Hub) cannot mutate, trim_blocks and lstrip_blocks, loop controls, the generation
    tag, and the raise_exception / strftime_now / tojson helpers."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, dict=_TemplateDict(), namespace=_SafeNamespace,
                       strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt))
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise DataError(f"{where}: chat template line {e.lineno}: {e.message}") from e
