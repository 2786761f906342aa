"""Chat templates come with a downloaded model: one that asks for gigabytes, loops for hours or raises
anything is stopped with a ChatTemplateError naming the template, in about a second at most, having
allocated little (``engine/template_sandbox.py``). On main, ``{{'a' * (messages|length*200000000)}}``
rendered 200 MB, ``'a'|center(10**9)``, nested ``range(100000)`` loops and ``10 ** 100000000`` were
still running after 20 s, and OverflowError/MemoryError escaped as raw exceptions.

The tiny model's context is 256 tokens; its longest token is under 16 characters, so a render may
write 256 x 16 = 4,096 characters plus twice what the messages hold.
"""

from __future__ import annotations

import threading
import time
import tracemalloc
from pathlib import Path

import pytest

from engine import InferenceOptions, Tokenizer
from engine.chat_template import ChatTemplateError
from engine.prompting import PromptBuilder
from engine.template_sandbox import MAX_RENDER_S
from tests.fixtures.tiny_model import write_tiny_gguf

HI = [{"role": "user", "content": "hi"}]
RENDER_BUDGET_S = MAX_RENDER_S + 2.0  # the deadline, and room for a busy CPU
PEAK_BUDGET = 32 << 20  # bytes traced while a hostile render is stopped
NAME = "the chat template given for t.gguf"

HOSTILE = {
    # the issue's: a string of messages|length * 2e8 characters (a float: a TypeError), and with an int
    "string times a float": ("{{'a' * (messages|length*2e8)}}", "failed: TypeError"),
    "string times 2e8": (
        "{{'a' * (messages|length*200000000)}}",
        "a repetition with * would make 200,000,000",
    ),
    "list times 1e9": ("{{ ([1] * 1000000000)|length }}", "a repetition with * would make 1,000,000,000"),
    "nested ranges": (
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}x",
        f"it ran longer than {MAX_RENDER_S:g} s",
    ),
    "nested ranges writing": (
        "{% for i in range(100000) %}{% for j in range(100000) %}a{% endfor %}{% endfor %}",
        "it wrote more than 4,108 characters",
    ),
    "loop over messages, forever": (
        "{% for i in range(100000) %}{% for j in range(1000) %}{% for m in messages %}{% endfor %}"
        "{% endfor %}{% endfor %}",
        "it ran longer than",
    ),
    "range of a million": ("{% for i in range(1000000) %}{% endfor %}", "range() of 1,000,000 items"),
    "center": ("{{ 'a'|center(1000000000) }}", "center would make 1,000,000,000"),
    "ljust": ("{{ 'a'.ljust(1000000000) }}", "str.ljust would make 1,000,000,000"),
    "percent width": ("{{ '%999999999d' % 1 }}", "a format width would make 999,999,999"),
    "percent star": ("{{ '%*d' % (999999999, 1) }}", "a format width taken from the arguments"),
    "format width": ("{{ '{:>999999999}'.format(1) }}", "a format width would make 999,999,999"),
    "format filter": ("{{ '%999999999s'|format('x') }}", "a format width would make 999,999,999"),
    "expandtabs": ("{{ ('\t' * 1000).expandtabs(1000000) }}", "expandtabs would make 1,000,001,000"),
    "replace empty": ("{{ ('a' * 4000).replace('', 'b' * 4000) }}", "str.replace would make 16,"),
    "replace filter": ("{{ ('a' * 4000)|replace('a', 'b' * 4000) }}", "replace would make 16,"),
    "join": ("{{ '-'.join(['x' * 4000] * 4000) }}", "str.join would make 16,"),
    "join filter": ("{{ (['x' * 4000] * 4000)|join }}", "join would make 16,"),
    "indent": ("{{ ('a\n' * 2000)|indent(100000) }}", "indent would make 200,"),
    "tojson indent": ("{{ messages|tojson(indent=100000) }}", "tojson's indent"),
    "power": ("{{ 10 ** 100000000 }}", "a number of 400,000,000 bits"),
    "doubling in a namespace": (
        "{% set ns = namespace(s='a') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
        "a ~ concatenation would make 8,192",
    ),
    "doubling by recursion": (
        "{% macro d(s, n) %}{% if n %}{{ d(s ~ s, n - 1) }}{% endif %}{% endmacro %}{{ d('a', 40) }}",
        "a ~ concatenation would make 8,192",
    ),
    "doubling in straight lines": (
        "{% set a = 'x' * 1000 %}" + "{% set a = a ~ a %}" * 40 + "{% set b = 'y' * 1000 %}{{ a }}",
        "a ~ concatenation would make 8,000",
    ),
    "doubling with + in straight lines": (
        "{% set a = 'x' * 1000 %}" + "{% set a = a + a %}" * 40 + "{{ a }}",
        "it made a value of 8,000 items",
    ),
    "endless recursion": ("{% macro r() %}{{ r() }}{% endmacro %}{{ r() }}", "failed: RecursionError"),
    "division by zero": ("{{ 1 // 0 }}", "failed: ZeroDivisionError"),
    "overflow": ("{{ 10 ** 400 * 1.0 }}", "failed: OverflowError"),
    "encoding": ("{{ 'é'.encode('ascii') }}", "failed: UnicodeEncodeError"),
    "python internals": ("{{ ''.__class__.__mro__ }}", "failed: SecurityError"),
}


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("templates") / "t.gguf")


def render(path: Path, template: str) -> None:
    Tokenizer.from_gguf(path, chat_template=template).encode_messages(HI)


@pytest.mark.parametrize("name", HOSTILE)
def test_a_hostile_template_is_stopped_with_the_named_error(model_file: Path, name: str) -> None:
    template, reason = HOSTILE[name]
    started = time.perf_counter()
    with pytest.raises(ChatTemplateError) as info:
        render(model_file, template)
    elapsed = time.perf_counter() - started
    message = str(info.value)
    assert message.startswith(NAME) and reason in message, message
    assert elapsed < RENDER_BUDGET_S, f"{name}: stopped after {elapsed:.2f} s"
    tracemalloc.start()
    try:
        with pytest.raises(ChatTemplateError):
            render(model_file, template)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < PEAK_BUDGET, f"{name}: {peak:,} bytes allocated"


def test_renders_in_two_threads_keep_their_own_deadlines(model_file: Path) -> None:
    """The limits are per render: a slow hostile render in one thread does not stop a normal one."""
    slow = Tokenizer.from_gguf(model_file, chat_template=HOSTILE["nested ranges"][0])
    normal = Tokenizer.from_gguf(model_file)
    failure: list[BaseException] = []

    def hostile() -> None:
        try:
            slow.apply_chat_template(HI)
        except ChatTemplateError as exc:
            failure.append(exc)

    thread = threading.Thread(target=hostile)
    thread.start()
    time.sleep(0.5)
    assert normal.apply_chat_template(HI).endswith("<|im_start|>assistant\n")
    thread.join(RENDER_BUDGET_S)
    assert len(failure) == 1 and "ran longer than" in str(failure[0])


def test_a_long_conversation_still_renders_and_is_trimmed(model_file: Path) -> None:
    """The output limit leaves room for the messages: a conversation far longer than the context's
    worth of characters renders, and the prompt builder drops its old turns to fit."""
    tok = Tokenizer.from_gguf(model_file)
    long = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} " + "more words " * 12}
        for i in range(801)
    ]
    assert sum(len(m["content"]) for m in long) > 100_000
    assert len(tok.apply_chat_template(long)) > 100_000
    ids, trimmed = PromptBuilder(tok).build(long, 256, InferenceOptions(max_new_tokens=16))
    assert trimmed and len(ids) <= 256
