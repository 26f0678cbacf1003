"""Memory-ordering primitives for numba kernels (a seqlock needs them).

Numba has no atomics for host code, and a plain load of a version counter in
a retry loop may be hoisted or merged by LLVM. These intrinsics emit LLVM
atomic loads/stores and fences on a uint64 array element, so the optimistic
version protocol in ``server.table.cuckoo`` holds under the C++/LLVM memory model,
not just by luck of x86's strong ordering (on x86 they compile to plain moves
plus compiler barriers: no cost on the lookup path).

Two more intrinsics the kernels need and numba lacks: ``prefetch`` (a cache
hint) and ``f32_from_bits`` (a float32 from its bit pattern, to decode the
fp16 and int8 row types of server.table.quantize).
"""

import llvmlite.binding
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic


HOST_HAS_F16C = bool(llvmlite.binding.get_host_cpu_features().get("f16c"))  # x86's half <-> float conversions


def _element_pointer(context, builder, arr_type, arr_value, index_type, index_value):
    array = context.make_array(arr_type)(context, builder, arr_value)
    index = context.cast(builder, index_value, index_type, types.intp)
    return cgutils.get_item_pointer(context, builder, arr_type, array, [index])


def _is_u64_vector(arr) -> bool:
    return isinstance(arr, types.Array) and arr.dtype == types.uint64 and arr.ndim == 1


def _atomic_load(ordering: str, doc: str):
    def load(typingctx, arr, index):
        if not _is_u64_vector(arr):
            return None
        sig = types.uint64(arr, index)

        def codegen(context, builder, signature, args):
            ptr = _element_pointer(context, builder, signature.args[0], args[0], signature.args[1], args[1])
            return builder.load_atomic(ptr, ordering, 8)

        return sig, codegen

    load.__doc__ = doc
    return intrinsic(load)


def _atomic_store(ordering: str, doc: str):
    def store(typingctx, arr, index, value):
        if not _is_u64_vector(arr):
            return None
        sig = types.void(arr, index, types.uint64)

        def codegen(context, builder, signature, args):
            ptr = _element_pointer(context, builder, signature.args[0], args[0], signature.args[1], args[1])
            val = context.cast(builder, args[2], signature.args[2], types.uint64)
            builder.store_atomic(val, ptr, ordering, 8)
            return context.get_dummy_value()

        return sig, codegen

    store.__doc__ = doc
    return intrinsic(store)


def _fence(ordering: str, doc: str):
    def fence(typingctx):
        def codegen(context, builder, signature, args):
            builder.fence(ordering)
            return context.get_dummy_value()

        return types.void(), codegen

    fence.__doc__ = doc
    return intrinsic(fence)


load_acquire = _atomic_load("acquire", "``arr[index]`` as an acquire load: later memory reads stay after it.")
load_relaxed = _atomic_load("monotonic", "``arr[index]`` as a monotonic atomic load: never merged with another.")
store_release = _atomic_store("release", "``arr[index] = value`` as a release store: earlier writes are visible first.")
store_relaxed = _atomic_store("monotonic", "``arr[index] = value`` as a monotonic atomic store.")
fence_acquire = _fence("acquire", "Earlier loads complete before any later load or store.")
fence_release = _fence("release", "Earlier loads and stores complete before any later store.")


@intrinsic
def prefetch(typingctx, arr, index):
    """Hint the cache to fetch ``arr[index]`` (read, high locality); no effect on results."""
    if not isinstance(arr, types.Array):
        return None
    sig = types.void(arr, index)

    def codegen(context, builder, signature, args):
        ptr = _element_pointer(context, builder, signature.args[0], args[0], signature.args[1], args[1])
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), "llvm.prefetch.p0i8"
        )
        builder.call(fn, [builder.bitcast(ptr, i8p), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def f32_from_bits(typingctx, bits):
    """The float32 whose IEEE-754 bit pattern is the low 32 bits of the integer ``bits`` (a bit cast, no rounding)."""
    if not isinstance(bits, types.Integer):
        return None
    sig = types.float32(bits)

    def codegen(context, builder, signature, args):
        word = context.cast(builder, args[0], signature.args[0], types.uint32)
        return builder.bitcast(word, ir.FloatType())

    return sig, codegen


@intrinsic
def prefetch_row(typingctx, arr, index):
    """Hint the cache to fetch the whole of row ``arr[index]`` of a 2-D C-contiguous array: the 64-byte line of
    its first byte, and of its last where that is another (an int8 row of 20 bytes straddles two lines 19 times
    in 64; the second prefetch took int8 lookups from 0.77x fp32's rate to 1.0x, 4M keys)."""
    if not isinstance(arr, types.Array) or arr.ndim != 2 or arr.layout != "C":
        return None
    sig = types.void(arr, index)

    def codegen(context, builder, signature, args):
        arr_type = signature.args[0]
        ptr = _element_pointer(context, builder, arr_type, args[0], signature.args[1], args[1])
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        array = context.make_array(arr_type)(context, builder, args[0])
        width = builder.extract_value(array.shape, 1)
        itemsize = context.get_constant(types.intp, context.get_abi_sizeof(context.get_data_type(arr_type.dtype)))
        last = builder.sub(builder.mul(width, itemsize), context.get_constant(types.intp, 1))
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), "llvm.prefetch.p0i8"
        )
        start = builder.bitcast(ptr, i8p)
        end = builder.gep(start, [last])
        builder.call(fn, [start, i32(0), i32(3), i32(1)])
        line = context.get_constant(types.uintp, 6)
        first_line = builder.lshr(builder.ptrtoint(start, ir.IntType(64)), line)
        last_line = builder.lshr(builder.ptrtoint(end, ir.IntType(64)), line)
        with builder.if_then(builder.icmp_unsigned("!=", first_line, last_line), likely=False):
            builder.call(fn, [end, i32(0), i32(3), i32(1)])  # only for a row that straddles two lines
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def f32_from_f16_bits(typingctx, bits):
    """The float32 value of the IEEE-754 half whose bits are the low 16 of ``bits`` (exact: every half is a float32).
    One vcvtph2ps on a CPU with F16C; use only where ``HOST_HAS_F16C`` (without it LLVM would call a runtime
    helper that numba's JIT does not link)."""
    if not isinstance(bits, types.Integer):
        return None
    sig = types.float32(bits)

    def codegen(context, builder, signature, args):
        word = builder.trunc(context.cast(builder, args[0], signature.args[0], types.uint32), ir.IntType(16))
        return builder.fpext(builder.bitcast(word, ir.HalfType()), ir.FloatType())

    return sig, codegen
