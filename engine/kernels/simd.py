"""Sixteen-lane vectors for the numba kernels, written as LLVM vector IR (``<16 x float>``,
``<16 x i32>``).

The projection kernels hold one float32 lane per output row (``quant.py``): each loaded weight
vector feeds every activation row of a step, and no value is ever gathered or reduced across lanes.
LLVM's auto-vectorizer cannot be relied on to find that form in scalar loops (it kept accumulators
in memory and mixed packed and scalar code), so the kernels say it explicitly. LLVM lowers the
vectors to what the CPU has: one zmm register per vector with AVX-512, two ymm with AVX2, four xmm
with SSE; the tests read the assembly for AVX2 and AVX-512 targets.

Every function here is an ``@intrinsic``: it exists only inside compiled code. Array arguments are
C-contiguous and indexed by a flat element offset; the caller keeps every access in bounds.
"""

from __future__ import annotations

import operator
from typing import Any

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, overload, register_model

LANES = 16
_F = ir.VectorType(ir.FloatType(), LANES)
_I = ir.VectorType(ir.IntType(32), LANES)
_I32 = ir.IntType(32)


class F32Vector(types.Type):
    def __init__(self) -> None:
        super().__init__(name=f"f32x{LANES}")


class I32Vector(types.Type):
    def __init__(self) -> None:
        super().__init__(name=f"i32x{LANES}")


f32v = F32Vector()
i32v = I32Vector()


@register_model(F32Vector)
class _F32VectorModel(models.PrimitiveModel):
    def __init__(self, dmm: Any, fe_type: Any) -> None:
        super().__init__(dmm, fe_type, _F)


@register_model(I32Vector)
class _I32VectorModel(models.PrimitiveModel):
    def __init__(self, dmm: Any, fe_type: Any) -> None:
        super().__init__(dmm, fe_type, _I)


def _intrinsic(typer: Any) -> Any:
    """``numba.extending.intrinsic``, typed ``Any`` for mypy (called without ``typingctx``)."""
    return intrinsic(typer)


def _pointer(context: Any, builder: Any, sig: Any, args: Any, element: ir.Type, n: int = LANES) -> Any:
    """Address of ``args[0][args[1]:]`` (flat offset; an array or its data pointer) as a pointer to
    ``n`` elements."""
    base = args[0]
    if isinstance(sig.args[0], types.Array):
        base = context.make_array(sig.args[0])(context, builder, args[0]).data
    offset = context.cast(builder, args[1], sig.args[1], types.intp)
    return builder.bitcast(builder.gep(base, [offset]), ir.VectorType(element, n).as_pointer())


def _splat(builder: Any, value: Any, vector: ir.VectorType) -> Any:
    undef = ir.Constant(vector, ir.Undefined)
    one = builder.insert_element(undef, value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(one, undef, ir.Constant(ir.VectorType(_I32, LANES), [0] * LANES))


def _as_vector(context: Any, builder: Any, value: Any, ty: Any, vector: ir.VectorType) -> Any:
    """A vector argument as it is, a scalar broadcast to every lane."""
    if isinstance(ty, (F32Vector, I32Vector)):
        return value
    if vector is _F:
        return _splat(builder, context.cast(builder, value, ty, types.float32), _F)
    return _splat(builder, context.cast(builder, value, ty, types.int32), _I)


def _is_array(ty: Any, *dtypes: Any) -> bool:
    """A C-contiguous array of one of ``dtypes``, or a data pointer (``pointer()``) to one."""
    if isinstance(ty, types.CPointer):
        return ty.dtype in dtypes
    return isinstance(ty, types.Array) and ty.layout == "C" and ty.dtype in dtypes


def _element(ty: Any) -> Any:
    return ty.dtype


@_intrinsic
def pointer(typingctx: Any, array: Any) -> Any:
    """A C-contiguous array's data pointer. Kernels hand pointers, not arrays, to their inlined
    helpers: an array argument is reference-counted (two atomic operations) at every call."""
    if not (isinstance(array, types.Array) and array.layout == "C"):
        return None

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        return context.make_array(sig.args[0])(context, builder, args[0]).data

    return types.CPointer(array.dtype)(array), codegen


@_intrinsic
def keep_alive(typingctx: Any, array: Any) -> Any:
    """A use of ``array`` that compiles to nothing: placed after the last use of a pointer taken from
    it, it keeps numba from freeing the array sooner."""

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        return context.get_dummy_value()

    return types.none(array), codegen


@_intrinsic
def prefetch(typingctx: Any, ptr: Any, offset: Any) -> Any:
    """Ask for the cache line at ``ptr + offset`` (elements) ahead of its use."""
    if not isinstance(ptr, types.CPointer):
        return None

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        offset = context.cast(builder, args[1], sig.args[1], types.intp)
        address = builder.bitcast(builder.gep(args[0], [offset]), ir.IntType(8).as_pointer())
        fnty = ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer(), _I32, _I32, _I32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0i8")
        builder.call(fn, [address, _I32(0), _I32(3), _I32(1)])
        return context.get_dummy_value()

    return types.none(ptr, offset), codegen


@_intrinsic
def item(typingctx: Any, ptr: Any, offset: Any) -> Any:
    """``ptr[offset]`` for a data pointer."""
    if not isinstance(ptr, types.CPointer):
        return None

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        offset = context.cast(builder, args[1], sig.args[1], types.intp)
        return builder.load(builder.gep(args[0], [offset]))

    return ptr.dtype(ptr, offset), codegen


@_intrinsic
def load(typingctx: Any, array: Any, offset: Any) -> Any:
    """16 float32 lanes from ``array`` (float32) at ``offset``."""
    if not _is_array(array, types.float32):
        return None

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        return builder.load(_pointer(context, builder, sig, args, ir.FloatType()), align=4)

    return f32v(array, offset), codegen


@_intrinsic
def store(typingctx: Any, array: Any, offset: Any, value: Any) -> Any:
    """``array[offset:offset + 16] = value`` (float32)."""
    if not _is_array(array, types.float32) or not isinstance(value, F32Vector):
        return None

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        builder.store(args[2], _pointer(context, builder, sig, args, ir.FloatType()), align=4)
        return context.get_dummy_value()

    return types.none(array, offset, value), codegen


@_intrinsic
def load_ints(typingctx: Any, array: Any, offset: Any) -> Any:
    """16 integers as int32 lanes: bytes (uint8 zero-extended, int8 sign-extended), uint16
    (zero-extended) or uint32."""
    widths = {types.uint8: 8, types.int8: 8, types.uint16: 16, types.uint32: 32}
    if not _is_array(array, *widths):
        return None
    bits, signed = widths[_element(array)], _element(array) == types.int8

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        v = builder.load(_pointer(context, builder, sig, args, ir.IntType(bits)), align=bits // 8)
        if bits == 32:
            return v
        return builder.sext(v, _I) if signed else builder.zext(v, _I)

    return i32v(array, offset), codegen


@_intrinsic
def load_scales(typingctx: Any, array: Any, offset: Any) -> Any:
    """16 float32 lanes from float32 values or from float16 bits stored as uint16 (numba has no
    float16): exact for every finite value, subnormals included (exponent and mantissa shifted into
    float32's places and rescaled by 2**112, then the sign)."""
    if not _is_array(array, types.float32, types.uint16):
        return None
    half = _element(array) == types.uint16

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        if not half:
            return builder.load(_pointer(context, builder, sig, args, ir.FloatType()), align=4)
        bits = builder.zext(builder.load(_pointer(context, builder, sig, args, ir.IntType(16)), align=2), _I)

        def const(n: int) -> ir.Constant:
            return ir.Constant(_I, [n] * LANES)

        magnitude = builder.shl(builder.and_(bits, const(0x7FFF)), const(13))
        scaled = builder.fmul(builder.bitcast(magnitude, _F), ir.Constant(_F, [2.0**112] * LANES))
        sign = builder.shl(builder.and_(bits, const(0x8000)), const(16))
        return builder.bitcast(builder.or_(builder.bitcast(scaled, _I), sign), _F)

    return f32v(array, offset), codegen


@_intrinsic
def zeros(typingctx: Any) -> Any:
    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        return ir.Constant(_F, [0.0] * LANES)

    return f32v(), codegen


@_intrinsic
def int_zeros(typingctx: Any) -> Any:
    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        return ir.Constant(_I, [0] * LANES)

    return i32v(), codegen


@_intrinsic
def to_float(typingctx: Any, value: Any) -> Any:
    """int32 lanes -> float32 lanes."""
    if not isinstance(value, I32Vector):
        return None

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        return builder.sitofp(args[0], _F)

    return f32v(value), codegen


@_intrinsic
def fma(typingctx: Any, a: Any, b: Any, c: Any) -> Any:
    """``a * b + c`` lane by lane (one fused instruction where the CPU has FMA); ``a`` or ``b`` may
    be a scalar, broadcast to every lane."""
    if not isinstance(c, F32Vector):
        return None

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        x = _as_vector(context, builder, args[0], sig.args[0], _F)
        y = _as_vector(context, builder, args[1], sig.args[1], _F)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_F, [_F, _F, _F]), f"llvm.fmuladd.v{LANES}f32"
        )
        return builder.call(fn, [x, y, args[2]])

    return f32v(a, b, c), codegen


def _binary(float_op: str | None, int_op: str) -> Any:
    @_intrinsic
    def op(typingctx: Any, a: Any, b: Any) -> Any:
        vector = a if isinstance(a, (F32Vector, I32Vector)) else b
        if isinstance(vector, F32Vector) and float_op is None:
            return None

        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            lanes = _F if isinstance(vector, F32Vector) else _I
            x, y = (_as_vector(context, builder, v, t, lanes) for v, t in zip(args, sig.args, strict=True))
            return getattr(builder, float_op if lanes is _F else int_op)(x, y)  # type: ignore[arg-type]

        return vector(a, b), codegen

    return op


_OPERATORS = {
    operator.add: (_binary("fadd", "add"), (F32Vector, I32Vector)),
    operator.sub: (_binary("fsub", "sub"), (F32Vector, I32Vector)),
    operator.mul: (_binary("fmul", "mul"), (F32Vector, I32Vector)),
    operator.and_: (_binary(None, "and_"), (I32Vector,)),
    operator.or_: (_binary(None, "or_"), (I32Vector,)),
    operator.rshift: (_binary(None, "lshr"), (I32Vector,)),
    operator.lshift: (_binary(None, "shl"), (I32Vector,)),
}


def _register(op: Any, impl: Any, vector_types: tuple[type, ...]) -> None:
    def typer(a, b):  # unannotated: numba compares its parameters with the implementation's
        if isinstance(a, vector_types) or isinstance(b, vector_types):
            return lambda a, b: impl(a, b)
        return None

    overload(op)(typer)


for _op, (_impl, _types) in _OPERATORS.items():
    _register(_op, _impl, _types)
