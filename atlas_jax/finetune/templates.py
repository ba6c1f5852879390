"""Chat templates: Jinja, rendered as Hugging Face renders them (a sandboxed environment with
trim_blocks and lstrip_blocks, `messages` and `add_generation_prompt` in scope, plus bos_token /
eos_token), so the same template text can go to llama.cpp (GGUF `tokenizer.chat_template`) and to
transformers (`chat_template.jinja` beside the tokenizer).

`data.chat_template` names a built-in (`chatml`) or a .jinja file. The run keeps the text it
trained with as <run_dir>/chat_template.jinja.
"""
from __future__ import annotations

from pathlib import Path

from atlas_jax.errors import ConfigError, DataError

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
BUILTIN = {"chatml": CHATML}
RUN_FILE = "chat_template.jinja"


class ChatTemplate:
    def __init__(self, source: str, name: str):
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        self.source, self.name = source, name
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateError as e:
            raise ConfigError(f"{name}: not a valid Jinja chat template ({e})") from None

    def end_of_turn(self) -> str:
        """The text the template writes after an assistant reply (chatml: '<|im_end|>'), stripped:
        where a generated reply ends, before EOS."""
        mark = "\x00reply\x00"
        text = self.render([{"role": "user", "content": "x"}, {"role": "assistant", "content": mark}])
        return text.split(mark, 1)[1].strip() if mark in text else ""

    def render(self, messages: list[dict], add_generation_prompt: bool = False, bos_token: str = "",
               eos_token: str = "") -> str:
        import jinja2

        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=bos_token, eos_token=eos_token)
        except jinja2.TemplateError as e:
            raise DataError(f"chat template {self.name}: {e}") from None


def load_template(spec: str) -> ChatTemplate:
    """A built-in name or a path to a .jinja file."""
    if spec in BUILTIN:
        return ChatTemplate(BUILTIN[spec], spec)
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"data.chat_template={spec}: neither a built-in ({', '.join(BUILTIN)}) nor a file")
    try:
        return ChatTemplate(path.read_text(encoding="utf-8"), str(path))
    except UnicodeDecodeError:
        raise ConfigError(f"data.chat_template={spec}: not UTF-8 text") from None


def run_template(run_dir: Path) -> ChatTemplate | None:
    path = Path(run_dir) / RUN_FILE
    return ChatTemplate(path.read_text(encoding="utf-8"), str(path)) if path.is_file() else None


def write_run_template(run_dir: Path, template: ChatTemplate) -> None:
    path = Path(run_dir) / RUN_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(template.source, encoding="utf-8")
    tmp.replace(path)
