"""The Jinja2 sandbox chat templates render in, bounded in time and in what a render can make.

Jinja's ``ImmutableSandboxedEnvironment`` keeps a template away from Python internals, but not from
the machine: ``{{ 'a' * 10**9 }}``, ``'a'|center(10**9)`` or two nested ``range(100000)`` loops run
as asked. Here every render has ``RenderLimits``: a deadline and a most-characters count. They are
checked cooperatively, never by killing a thread: at every loop iteration (each ``for`` loop's
iterable is wrapped when the template is parsed), every call, attribute and item lookup, every
intercepted operator, every ``~`` (rewritten at parse time too), every filter and every piece of
output. What can make a value much larger
than its inputs is priced before it runs (``*`` and ``**``, ``%`` and ``format`` widths,
``center``/``ljust``/``rjust``/``zfill``, ``replace``, ``join``, ``indent``, ``expandtabs``,
``wordwrap``), and every value a call, filter, operator or ``namespace`` assignment makes is checked
after. Past a limit, ``TemplateLimitError`` says which.
"""

from __future__ import annotations

import contextlib
import functools
import re
import string
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

MAX_RENDER_S = 1.0  # a render running longer stops
MAX_RANGE = 100_000  # items of one range()
MAX_INT_BITS = 1 << 16  # ints a template computes (``**``, ``*``): a 64k-bit number is plenty
_LOOP_FILTER = "smallmind_loop_guard"  # wraps every for loop's iterable (see _parse)
_CONCAT_FILTER = "smallmind_concat"  # replaces every ~ (see _parse)
_SIZED = (str, list, tuple, dict)
_FORMAT_NUMBER = re.compile(r"\d+")
_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")


class TemplateLimitError(Exception):
    """A render went past one of its limits (the message says which, without the template's name)."""


@dataclass(frozen=True, slots=True)
class RenderLimits:
    deadline: float  # time.perf_counter() past which the render stops
    max_chars: int  # of the output, and of any one string or list the template makes
    max_render_s: float = MAX_RENDER_S


_limits: ContextVar[RenderLimits | None] = ContextVar("smallmind_render_limits", default=None)


@contextlib.contextmanager
def render_limits(max_chars: int, max_render_s: float = MAX_RENDER_S) -> Iterator[RenderLimits]:
    """The limits of the render(s) run inside this block (per thread: renders may run concurrently)."""
    limits = RenderLimits(time.perf_counter() + max_render_s, max_chars, max_render_s)
    token = _limits.set(limits)
    try:
        yield limits
    finally:
        _limits.reset(token)


def tick() -> RenderLimits | None:
    """Stop a render past its deadline; the current limits (None outside a render)."""
    limits = _limits.get()
    if limits is not None and time.perf_counter() > limits.deadline:
        raise TemplateLimitError(f"it ran longer than {limits.max_render_s:g} s")
    return limits


def check_size(value: Any, limits: RenderLimits | None = None) -> Any:
    """``value`` if it is no longer than the render allows (strings, lists, dicts...)."""
    limits = limits or _limits.get()
    sized = isinstance(value, str | bytes | list | tuple | dict | set)
    if limits is not None and sized and len(value) > limits.max_chars:
        raise TemplateLimitError(
            f"it made a value of {len(value):,} items, more than the {limits.max_chars:,} allowed"
        )
    return value


def _check_estimate(n: int | float, what: str, limits: RenderLimits | None) -> None:
    if limits is not None and n > limits.max_chars:
        raise TemplateLimitError(
            f"{what} would make {int(n):,} characters, more than the {limits.max_chars:,} allowed"
        )


def _check_format(fmt: str, limits: RenderLimits | None, percent: bool) -> None:
    """Widths and precisions in a format string: none larger than the output allowed, none from args."""
    if limits is None:
        return
    if percent:
        specs = [width or "" for spec in _PERCENT_SPEC.findall(fmt) for width in spec]
    else:
        try:
            specs = [spec or "" for _, _, spec, _ in string.Formatter().parse(fmt)]
        except ValueError:
            return  # str.format raises on it (mapped to the template's error)
    for spec in specs:
        if "*" in spec or "{" in spec:
            raise TemplateLimitError("a format width taken from the arguments (*) is not allowed")
        for number in _FORMAT_NUMBER.findall(spec):
            _check_estimate(int(number), "a format width", limits)


def _check_int_bits(bits: int, limits: RenderLimits | None) -> None:
    if limits is not None and bits > MAX_INT_BITS:
        raise TemplateLimitError(f"it would compute a number of {bits:,} bits, more than {MAX_INT_BITS:,}")


def _length(value: Any) -> int:
    return len(value) if isinstance(value, str | bytes | list | tuple | dict) else 0


def _check_call(
    func: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any], limits: RenderLimits | None
) -> None:
    """Price the str methods that can make far more than they take."""
    owner, name = getattr(func, "__self__", None), getattr(func, "__name__", "")
    if not isinstance(owner, str):
        return
    n = len(owner)
    if name in ("center", "ljust", "rjust", "zfill") and args and isinstance(args[0], int):
        _check_estimate(args[0], f"str.{name}", limits)
    elif name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        hits = owner.count(args[0]) if args[0] else n + 1
        _check_estimate(n + hits * max(0, len(args[1]) - len(args[0])), "str.replace", limits)
    elif name == "expandtabs":
        size = args[0] if args else kwargs.get("tabsize", 8)
        _check_estimate(n + owner.count("\t") * (size if isinstance(size, int) else 8), "expandtabs", limits)
    elif name == "translate":
        table = args[0] if args else None
        widest = max((_length(v) for v in table.values()), default=1) if isinstance(table, dict) else 1
        _check_estimate(n * max(widest, 1), "str.translate", limits)


def _join_estimate(separator: str, items: list[Any]) -> int:
    return sum(len(x) if isinstance(x, str) else 16 for x in items) + len(separator) * max(0, len(items) - 1)


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox with the checks of the module docstring."""

    intercepted_binops = frozenset(["*", "**", "%", "+", "//"])

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.globals["range"] = _bounded_range
        self.globals["namespace"] = BoundedNamespace
        self.filters = {name: guarded_filter(name, f) for name, f in self.filters.items()}
        self.filters[_LOOP_FILTER] = jinja2.pass_context(lambda _, iterable: _loop_guard(iterable))
        self.filters[_CONCAT_FILTER] = jinja2.pass_context(lambda _, parts: _concat(parts))

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        """Every for loop iterates through ``_loop_guard`` (each iteration checks the deadline), and
        every ``a ~ b`` is ``_concat`` (its length is priced before it is joined)."""
        tree = super()._parse(source, name, filename)
        for loop in tree.find_all(nodes.For):
            loop.iter = nodes.Filter(loop.iter, _LOOP_FILTER, [], [], None, None, lineno=loop.lineno)
        for parent in tree.find_all(nodes.Node):
            for field in parent.fields:
                value = getattr(parent, field, None)
                if isinstance(value, nodes.Concat):
                    setattr(parent, field, _priced_concat(value))
                elif isinstance(value, list):
                    value[:] = [_priced_concat(v) if isinstance(v, nodes.Concat) else v for v in value]
        return tree

    def call_binop(self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any) -> Any:
        limits = _limits.get()
        if limits is None:
            return self.binop_table[operator](left, right)
        if time.perf_counter() > limits.deadline:
            tick()  # raises
        if operator == "+":  # the common one (message text put together): only its result is checked
            result = self.binop_table["+"](left, right)
            if isinstance(result, _SIZED) and len(result) > limits.max_chars:
                check_size(result, limits)  # raises
            return result
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(times, int) and isinstance(seq, str | bytes | list | tuple):
                    _check_estimate(len(seq) * times, "a repetition with *", limits)
            if isinstance(left, int) and isinstance(right, int):
                _check_int_bits(left.bit_length() + right.bit_length(), limits)
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0:
            _check_int_bits(max(1, left.bit_length()) * right, limits)
        elif operator == "%" and isinstance(left, str):
            _check_format(left, limits, percent=True)
        return check_size(super().call_binop(context, operator, left, right), limits)

    def call(__self, __context: jinja2.runtime.Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        limits = tick()
        for value in (*args, *kwargs.values()):
            check_size(value, limits)
        _check_call(__obj, args, kwargs, limits)
        if getattr(__obj, "__name__", "") == "join" and isinstance(getattr(__obj, "__self__", None), str):
            items = list(args[0]) if args and isinstance(args[0], Iterable) else []
            _check_estimate(_join_estimate(__obj.__self__, items), "str.join", limits)
            args = (items, *args[1:])
        return check_size(super().call(__context, __obj, *args, **kwargs), limits)

    def getattr(self, obj: Any, attribute: str) -> Any:
        tick()
        return super().getattr(obj, attribute)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        """``'...'.format`` / ``format_map`` looked up: its widths are priced here, before any call."""
        owner = getattr(value, "__self__", None)
        if isinstance(owner, str) and getattr(value, "__name__", "") in ("format", "format_map"):
            _check_format(owner, _limits.get(), percent=False)
        return super().wrap_str_format(value)

    def getitem(self, obj: Any, argument: Any) -> Any:
        tick()
        return super().getitem(obj, argument)


class BoundedNamespace(Namespace):
    """``namespace()``: what a template assigns to it is checked (a loop doubling a string stops)."""

    def __setitem__(self, name: str, value: Any) -> None:
        tick()
        super().__setitem__(name, check_size(value))


def _bounded_range(*args: int) -> range:
    """range(), at most MAX_RANGE items (iterating it is bounded by the deadline, like every loop)."""
    tick()
    numbers = range(*args)
    if len(numbers) > MAX_RANGE:
        raise TemplateLimitError(f"range() of {len(numbers):,} items is more than {MAX_RANGE:,}")
    return numbers


def _priced_concat(node: nodes.Concat) -> nodes.Filter:
    return nodes.Filter(nodes.List(node.nodes, lineno=node.lineno), _CONCAT_FILTER, [], [], None, None,
                        lineno=node.lineno)  # fmt: skip


def _concat(parts: list[Any]) -> str:
    """``a ~ b ~ c``: Jinja's str_join, its length priced first (straight-line ``{% set a = a ~ a %}``
    statements would double a string with no call, loop or operator hook in between)."""
    limits = tick()
    texts = [str(part) for part in parts]
    _check_estimate(sum(map(len, texts)), "a ~ concatenation", limits)
    return "".join(texts)


def _loop_guard(iterable: Any) -> Iterator[Any]:
    limits = tick()
    if isinstance(iterable, str | list | tuple | dict):
        check_size(iterable, limits)
    for item in iterable:
        tick()
        yield item


# Filters whose output can be much larger than their input, priced before they run.
def _price_filter(
    name: str, value: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any], limits: RenderLimits
) -> None:
    text = value if isinstance(value, str) else ""
    lines = text.count("\n") + 1
    if name == "center":
        width = args[0] if args else kwargs.get("width", 80)
        _check_estimate(width if isinstance(width, int | float) else 0, "center", limits)
    elif name == "indent":
        width = args[0] if args else kwargs.get("width", 4)
        per_line = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
        _check_estimate(len(text) + lines * per_line, "indent", limits)
    elif name == "wordwrap":
        width = args[0] if args else kwargs.get("width", 79)
        wrap = args[2] if len(args) > 2 else kwargs.get("wrapstring") or "\n"
        n_lines = len(text) // max(1, width if isinstance(width, int) else 1) + lines
        _check_estimate(len(text) + n_lines * _length(wrap), "wordwrap", limits)
    elif name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        hits = text.count(args[0]) if args[0] else len(text) + 1
        _check_estimate(len(text) + hits * max(0, len(args[1]) - len(args[0])), "replace", limits)
    elif name == "format":
        _check_format(text, limits, percent=True)
    elif name == "tojson":
        indent = args[1] if len(args) > 1 else kwargs.get("indent")
        _check_estimate((indent if isinstance(indent, int) else 0) * 1000, "tojson's indent", limits)


def guarded_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    """``func`` run under the render's limits; marked to receive the context, so Jinja's optimizer
    never runs it while compiling (outside any limits)."""
    pass_arg = getattr(func, "jinja_pass_arg", None)

    @jinja2.pass_context
    @functools.wraps(func)
    def guarded(context: jinja2.runtime.Context, value: Any, *args: Any, **kwargs: Any) -> Any:
        limits = tick()
        if limits is not None:
            check_size(value, limits)
            _price_filter(name, value, args, kwargs, limits)
            if name == "join":
                value = list(value)
                separator = args[0] if args else kwargs.get("d", "")
                _check_estimate(_join_estimate(str(separator), value), "join", limits)
        first = {"context": (context,), "eval_context": (context.eval_ctx,),
                 "environment": (context.environment,)}.get(getattr(pass_arg, "name", ""), ())  # fmt: skip
        return check_size(func(*first, value, *args, **kwargs), limits)

    return guarded
