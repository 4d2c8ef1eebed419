"""Pure-numpy reading and writing of Hugging Face safetensors checkpoints.

Covers what DeepSeek V2/V3/V3.1/R1 checkpoints need: BF16 weights (V2), FP8 e4m3 weights with
per-block ``*_scale_inv`` tensors (V3/R1, F32 scales; V3.1 ``ue8m0`` scales as F32 or F8_E8M0),
sharded folders with ``model.safetensors.index.json``, and tensor-parallel slicing.

numpy has no bfloat16 / float8 dtypes, so those tensors are kept as raw integer codes on disk
and decoded with bit tricks (BF16) or 256-entry lookup tables (FP8).

Memory model: a file is memory-mapped only when a tensor is first read. Every read converts
the requested region chunk by chunk into a fresh array and then drops the mapped source pages
(``MADV_DONTNEED``), so loading a whole model keeps roughly "final arrays + one chunk" resident
instead of "final arrays + every mapped file". No returned array ever aliases the file.
"""
from __future__ import annotations

import json
import logging
import math
import mmap
import os
import struct
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

__all__ = [
    "CheckpointError",
    "SafetensorsFile",
    "CheckpointReader",
    "write_safetensors",
    "fp8_block_quantize",
    "dequantize_fp8_blocks",
    "bf16_to_float32",
    "float32_to_bf16",
    "e4m3_to_float32",
    "float32_to_e4m3",
    "e8m0_to_float32",
    "float32_to_e8m0",
    "E4M3_LUT",
    "E5M2_LUT",
    "E8M0_LUT",
    "SAFETENSORS_DTYPES",
    "SCALE_INV_SUFFIX",
    "INDEX_FILE",
    "SINGLE_FILE",
]


class CheckpointError(ValueError):
    """A checkpoint file or folder is malformed, or a requested tensor cannot be produced.

    Messages always start with the offending file (or folder) and name the tensor when one is
    involved, so a failure deep inside a 160-shard load is actionable.
    """


# Same limit as the reference Rust implementation: real headers are a few MB at most, so a
# larger length means a corrupt or non-safetensors file and we must not try to allocate it.
MAX_HEADER_BYTES = 100_000_000

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SCALE_INV_SUFFIX = "_scale_inv"
FP8_MAX = 448.0

# safetensors dtype -> little-endian numpy storage dtype. BF16 and the 8-bit floats are stored
# as their raw bit patterns and decoded on read.
SAFETENSORS_DTYPES: Dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "F8_E4M3": np.dtype("u1"),
    "F8_E5M2": np.dtype("u1"),
    "F8_E8M0": np.dtype("u1"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_INTEGER_DTYPES = frozenset({"I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8", "BOOL"})
_FP8_DTYPES = frozenset({"F8_E4M3", "F8_E5M2"})

_NATIVE_TO_SAFETENSORS = {
    np.dtype("float64"): "F64",
    np.dtype("float32"): "F32",
    np.dtype("float16"): "F16",
    np.dtype("int64"): "I64",
    np.dtype("int32"): "I32",
    np.dtype("int16"): "I16",
    np.dtype("int8"): "I8",
    np.dtype("uint64"): "U64",
    np.dtype("uint32"): "U32",
    np.dtype("uint16"): "U16",
    np.dtype("uint8"): "U8",
    np.dtype("bool"): "BOOL",
}
# ml_dtypes / jax arrays carry these dtype names; they can be written bit-for-bit.
_EXTENSION_DTYPE_NAMES = {
    "bfloat16": "BF16",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
    "float8_e8m0fnu": "F8_E8M0",
}

# Source elements converted per step. Bounds the transient memory of a read (the uint8 -> intp
# index temporary of a LUT lookup is 8 bytes per element, i.e. 16 MB here).
_CHUNK_ELEMS = 1 << 21


# --------------------------------------------------------------------------------------------
# Element codecs
# --------------------------------------------------------------------------------------------

def _build_e4m3_lut() -> np.ndarray:
    # e4m3fn: 1 sign, 4 exponent bits (bias 7), 3 mantissa bits; exponent 0 is subnormal
    # (m/8 * 2**-6); there are no infinities and only S.1111.111 encodes NaN.
    codes = np.arange(256, dtype=np.int64)
    sign = np.where(codes & 0x80, -1.0, 1.0)
    exp = (codes >> 3) & 0xF
    man = (codes & 0x7).astype(np.float64)
    normal = (1.0 + man / 8.0) * np.exp2(exp - 7.0)
    subnormal = (man / 8.0) * 2.0 ** -6
    values = sign * np.where(exp == 0, subnormal, normal)
    nan = (codes & 0x7F) == 0x7F
    values[nan] = np.copysign(np.nan, sign[nan])  # keep the sign bit, as hardware casts do
    return values.astype(np.float32)


def _build_e5m2_lut() -> np.ndarray:
    # e5m2 is exactly the upper byte of an IEEE float16, so the table is just a reinterpretation.
    return (np.arange(256, dtype=np.uint16) << 8).view(np.float16).astype(np.float32)


def _build_e8m0_lut() -> np.ndarray:
    # Unsigned power-of-two scale: value 2**(e - 127); 0xFF is NaN. 2**-127 is a float32
    # subnormal and 2**127 is finite, so every code is exact.
    values = np.ldexp(np.float64(1.0), np.arange(256) - 127)
    values[255] = np.nan
    return values.astype(np.float32)


E4M3_LUT = _build_e4m3_lut()
E5M2_LUT = _build_e5m2_lut()
E8M0_LUT = _build_e8m0_lut()
for _lut in (E4M3_LUT, E5M2_LUT, E8M0_LUT):
    _lut.setflags(write=False)
del _lut

_LUTS = {"F8_E4M3": E4M3_LUT, "F8_E5M2": E5M2_LUT, "F8_E8M0": E8M0_LUT}


def _c_contiguous(a: np.ndarray) -> np.ndarray:
    # Unlike np.ascontiguousarray this keeps 0-d arrays 0-d.
    return a if a.flags.c_contiguous else a.copy(order="C")


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """Decode raw bfloat16 bit patterns (uint16) to float32. Exact: bf16 is the top half of f32."""
    bits = np.asarray(bits)
    out = np.empty(bits.shape, dtype=np.uint32)
    out[...] = bits
    out <<= 16
    return out.view(np.float32)


def float32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Encode to bfloat16 bit patterns (uint16) with round-to-nearest-even; NaN stays NaN."""
    bits = _c_contiguous(np.asarray(x, dtype=np.float32)).view(np.uint32)
    # Adding 0x7FFF plus the lowest kept bit rounds half-way cases towards an even result.
    # Finite inputs cannot overflow uint32 here (largest finite magnitude + bias < 2**32) and
    # values that round past the largest bf16 become inf, as IEEE rounding requires.
    rounded = (bits + (np.uint32(0x7FFF) + ((bits >> 16) & 1))) >> 16
    nan = np.isnan(bits.view(np.float32))
    # A NaN whose payload lives only in the dropped bits would otherwise become inf.
    quiet_nan = (bits >> 16) | 0x0040
    return np.where(nan, quiet_nan, rounded).astype(np.uint16)


def _lut_decode(codes: np.ndarray, lut: np.ndarray) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.dtype != np.uint8:
        raise TypeError("8-bit float codes must be uint8, got %s" % codes.dtype)
    out = np.empty(codes.shape, dtype=np.float32)
    if codes.ndim == 0:
        out[...] = lut[int(codes)]
        return out
    _lut_decode_into(codes, lut, out)
    return out


def _lut_decode_into(codes: np.ndarray, lut: np.ndarray, out: np.ndarray) -> None:
    # np.take converts the index array to intp (8 bytes per element), so go in chunks.
    row_elems = max(1, int(np.prod(codes.shape[1:], dtype=np.int64)))
    step = max(1, _CHUNK_ELEMS // row_elems)
    for r0 in range(0, codes.shape[0], step):
        np.take(lut, codes[r0:r0 + step], out=out[r0:r0 + step])


def e4m3_to_float32(codes: np.ndarray) -> np.ndarray:
    """Decode float8 e4m3fn codes (uint8) to float32."""
    return _lut_decode(codes, E4M3_LUT)


def e8m0_to_float32(codes: np.ndarray) -> np.ndarray:
    """Decode float8 e8m0 (unsigned biased exponent, uint8) to float32 powers of two."""
    return _lut_decode(codes, E8M0_LUT)


def float32_to_e4m3(x: np.ndarray) -> np.ndarray:
    """Encode to float8 e4m3fn codes (uint8): round-to-nearest-even, saturating to +-448.

    Infinities saturate to +-448 as well; NaN becomes 0x7F / 0xFF.
    """
    x = np.asarray(x, dtype=np.float64)
    mag = np.abs(x)
    # Positive e4m3 codes are monotonic in value and evenly spaced inside each binade, so the
    # code is (binade index * 8 + rounded mantissa step); a mantissa that rounds up to 8
    # carries into the exponent by plain addition. Subnormals continue the same spacing.
    with np.errstate(divide="ignore", invalid="ignore"):
        frac, exp2 = np.frexp(mag)  # mag = frac * 2**exp2, frac in [0.5, 1)
        unbiased = exp2.astype(np.int64) - 1
        normal_code = (unbiased + 7) * 8 + np.rint((frac * 2.0 - 1.0) * 8.0)
        subnormal_code = np.rint(mag * 2.0 ** 9)
    code = np.where(mag < 2.0 ** -6, subnormal_code, normal_code)
    code = np.where(np.isfinite(mag), code, 0x7E)
    code = np.minimum(code, 0x7E).astype(np.uint8)
    code |= np.where(np.signbit(x), 0x80, 0).astype(np.uint8)
    return np.where(np.isnan(x), code | 0x7F, code).astype(np.uint8)


def float32_to_e8m0(x: np.ndarray) -> np.ndarray:
    """Encode exact powers of two in [2**-127, 2**127] (or NaN) to e8m0 codes (uint8).

    Anything else raises ValueError: e8m0 scales are meant to be exact, so rounding here
    would silently change a checkpoint.
    """
    x = np.asarray(x, dtype=np.float64)
    nan = np.isnan(x)
    with np.errstate(divide="ignore", invalid="ignore"):
        frac, exp2 = np.frexp(np.where(nan, 1.0, x))
    exponent = exp2.astype(np.int64) - 1 + 127
    ok = nan | ((frac == 0.5) & (exponent >= 0) & (exponent <= 254))
    if not np.all(ok):
        bad = x[~ok].ravel()[:4]
        raise ValueError("F8_E8M0 can only hold powers of two in [2**-127, 2**127]; got %s"
                         % bad.tolist())
    return np.where(nan, 255, exponent).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# FP8 block scaling
# --------------------------------------------------------------------------------------------

def _block_scale_shape(shape: Sequence[int], block: Tuple[int, int]) -> Tuple[int, int]:
    return (-(-shape[0] // block[0]), -(-shape[1] // block[1]))


def _apply_block_scales(values: np.ndarray, scale: np.ndarray, block: Tuple[int, int],
                        row0: int = 0, col0: int = 0) -> None:
    """Multiply `values` (a [rows, cols] window of the full weight starting at (row0, col0))
    in place by its per-block scales. Goes one block-row at a time so the only temporary is one
    row of expanded scales, never a full-size scale matrix."""
    if scale.size == 1 and scale.ndim <= 2:
        values *= np.float32(scale.reshape(()))
        return
    rows, cols = values.shape
    if rows == 0 or cols == 0:
        return
    bo, bi = block
    col_scale_idx = np.arange(col0, col0 + cols) // bi
    first_block, last_block = row0 // bo, (row0 + rows - 1) // bo
    for b in range(first_block, last_block + 1):
        r0 = max(row0, b * bo) - row0
        r1 = min(row0 + rows, (b + 1) * bo) - row0
        values[r0:r1] *= scale[b, col_scale_idx]


def dequantize_fp8_blocks(codes: np.ndarray, scale_inv: np.ndarray,
                          block_size: Tuple[int, int] = (128, 128)) -> np.ndarray:
    """In-memory block dequantisation of a 2-D e4m3 weight: codes (uint8) * scale per block.

    `scale_inv` has shape [ceil(rows/bo), ceil(cols/bi)] (or is a single per-tensor scale);
    partial last blocks use the scale of the block they fall in.
    """
    codes = np.asarray(codes)
    scale = np.asarray(scale_inv, dtype=np.float32)
    if codes.ndim != 2:
        raise ValueError("block dequantisation needs a 2-D weight, got shape %s" % (codes.shape,))
    block = (int(block_size[0]), int(block_size[1]))
    if scale.size != 1 and scale.shape != _block_scale_shape(codes.shape, block):
        raise ValueError("scale shape %s does not match weight %s with blocks %s"
                         % (scale.shape, codes.shape, block))
    values = e4m3_to_float32(codes)
    _apply_block_scales(values, scale, block)
    return values


def fp8_block_quantize(w: np.ndarray, block: Tuple[int, int] = (128, 128),
                       scale_fmt: Optional[str] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Quantise a 2-D float weight the way DeepSeek V3 checkpoints are stored.

    Returns (uint8 e4m3 codes, float32 scale_inv) with w ~= decode(codes) * scale_inv per block.
    ``scale_fmt="ue8m0"`` rounds every scale up to a power of two (V3.1 style) so the block
    maximum still fits in +-448. Meant for building test checkpoints, not for production.
    """
    if scale_fmt not in (None, "ue8m0"):
        raise ValueError("scale_fmt must be None or 'ue8m0', got %r" % (scale_fmt,))
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError("fp8_block_quantize needs a 2-D weight, got shape %s" % (w.shape,))
    bo, bi = int(block[0]), int(block[1])
    rows, cols = w.shape
    if rows == 0 or cols == 0:
        return (np.zeros(w.shape, np.uint8),
                np.ones(_block_scale_shape(w.shape, (bo, bi)), np.float32))
    amax = np.abs(w)
    amax = np.maximum.reduceat(amax, np.arange(0, rows, bo), axis=0)
    amax = np.maximum.reduceat(amax, np.arange(0, cols, bi), axis=1)
    scale = amax / np.float32(FP8_MAX)
    # An all-zero block would otherwise divide by zero; any positive scale reproduces zeros.
    scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
    if scale_fmt == "ue8m0":
        scale = np.exp2(np.ceil(np.log2(scale))).astype(np.float32)
    expanded = np.repeat(np.repeat(scale, bo, axis=0), bi, axis=1)[:rows, :cols]
    codes = float32_to_e4m3(w / expanded)
    return codes, scale


# --------------------------------------------------------------------------------------------
# Single file
# --------------------------------------------------------------------------------------------

class _TensorInfo:
    __slots__ = ("dtype", "shape", "begin", "end")

    def __init__(self, dtype: str, shape: Tuple[int, ...], begin: int, end: int):
        self.dtype = dtype
        self.shape = shape
        self.begin = begin
        self.end = end


def _reject_duplicate_keys(what: str, path: str):
    def hook(pairs):
        seen = {}
        for key, value in pairs:
            if key in seen:
                raise CheckpointError("%s: duplicate %s %r" % (path, what, key))
            seen[key] = value
        return seen
    return hook


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class SafetensorsFile:
    """One ``.safetensors`` file: validated header up front, tensor data on demand.

    The header is read and fully checked in the constructor; the data section is memory-mapped
    on the first read. Use as a context manager or call close() to unmap.
    """

    def __init__(self, path: PathLike):
        self.path = os.fspath(path)
        self._mm: Optional[mmap.mmap] = None
        self._metadata: Dict[str, str] = {}
        self._tensors: Dict[str, _TensorInfo] = {}
        self._parse_header()

    # -- header --------------------------------------------------------------------------

    def _fail(self, msg: str, tensor: Optional[str] = None) -> CheckpointError:
        where = self.path if tensor is None else "%s: tensor %r" % (self.path, tensor)
        return CheckpointError("%s: %s" % (where, msg))

    def _parse_header(self) -> None:
        try:
            with open(self.path, "rb") as f:
                self._file_size = os.fstat(f.fileno()).st_size
                if self._file_size < 8:
                    raise self._fail("file is %d bytes, shorter than the 8-byte header length "
                                     "(truncated or not a safetensors file)" % self._file_size)
                (header_len,) = struct.unpack("<Q", f.read(8))
                if header_len > MAX_HEADER_BYTES:
                    raise self._fail("header length %d exceeds the %d-byte limit (corrupt or "
                                     "not a safetensors file)" % (header_len, MAX_HEADER_BYTES))
                if 8 + header_len > self._file_size:
                    raise self._fail("header length %d exceeds the file size %d (file truncated "
                                     "or not a safetensors file)" % (header_len, self._file_size))
                raw_header = f.read(header_len)
        except OSError as exc:
            raise CheckpointError("%s: cannot read: %s" % (self.path, exc)) from exc
        self._data_start = 8 + header_len

        try:
            text = raw_header.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self._fail("header is not valid UTF-8 (%s)" % exc) from exc
        try:
            header = json.loads(text, object_pairs_hook=_reject_duplicate_keys("key", self.path))
        except ValueError as exc:
            if isinstance(exc, CheckpointError):
                raise
            raise self._fail("header is not valid JSON (%s)" % exc) from exc
        if not isinstance(header, dict):
            raise self._fail("header must be a JSON object, got %s" % type(header).__name__)

        metadata = header.pop("__metadata__", None)
        if metadata is not None:
            if not isinstance(metadata, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
                raise self._fail("__metadata__ must be an object of string to string")
            self._metadata = metadata

        data_size = self._file_size - self._data_start
        for name, entry in header.items():
            self._tensors[name] = self._parse_entry(name, entry, data_size)
        self._check_overlaps()

    def _parse_entry(self, name: str, entry: Any, data_size: int) -> _TensorInfo:
        if not isinstance(entry, dict):
            raise self._fail("header entry must be an object", name)
        for key in ("dtype", "shape", "data_offsets"):
            if key not in entry:
                raise self._fail("header entry has no %r" % key, name)
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in SAFETENSORS_DTYPES:
            raise self._fail("unknown dtype %r (supported: %s)"
                             % (dtype, ", ".join(sorted(SAFETENSORS_DTYPES))), name)
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise self._fail("shape must be a list of non-negative integers, got %r" % (shape,),
                             name)
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(_is_int(o) and o >= 0 for o in offsets) or offsets[0] > offsets[1]):
            raise self._fail("data_offsets must be [begin, end] with 0 <= begin <= end, got %r"
                             % (offsets,), name)
        begin, end = offsets
        expected = math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize
        if end - begin != expected:
            raise self._fail("data_offsets %r span %d bytes but %s %s needs %d"
                             % (offsets, end - begin, dtype, shape, expected), name)
        if end > data_size:
            raise self._fail("data ends at byte %d of the data section but only %d bytes are "
                             "present (file truncated)" % (end, data_size), name)
        return _TensorInfo(dtype, tuple(shape), begin, end)

    def _check_overlaps(self) -> None:
        spans = sorted((t.begin, t.end, n) for n, t in self._tensors.items() if t.end > t.begin)
        for (_, prev_end, prev_name), (begin, _, name) in zip(spans, spans[1:]):
            if begin < prev_end:
                raise self._fail("data overlaps tensor %r" % prev_name, name)

    # -- introspection -------------------------------------------------------------------

    def keys(self) -> List[str]:
        return list(self._tensors)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def __len__(self) -> int:
        return len(self._tensors)

    def _info(self, name: str) -> _TensorInfo:
        try:
            return self._tensors[name]
        except KeyError:
            raise self._fail("no such tensor in this file", name) from None

    def dtype(self, name: str) -> str:
        """The safetensors dtype string, e.g. "BF16" or "F8_E4M3"."""
        return self._info(name).dtype

    def shape(self, name: str) -> Tuple[int, ...]:
        return self._info(name).shape

    def nbytes(self, name: str) -> int:
        info = self._info(name)
        return info.end - info.begin

    def metadata(self) -> Dict[str, str]:
        return dict(self._metadata)

    # -- data ----------------------------------------------------------------------------

    def _mapping(self) -> mmap.mmap:
        if self._mm is None:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size != self._file_size:
                    raise self._fail("file size changed from %d to %d since its header was read"
                                     % (self._file_size, size))
                # mmap keeps its own descriptor, so the file object can be closed right away.
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            logger.debug("mapped %s (%d bytes)", self.path, self._file_size)
        return self._mm

    def _release(self, start: int, stop: int) -> None:
        """Drop mapped pages of [start, stop) from this process: the data has been converted
        into a private array already, and the mapped copy would otherwise stay resident."""
        madvise = getattr(self._mm, "madvise", None)
        dontneed = getattr(mmap, "MADV_DONTNEED", None)
        if madvise is None or dontneed is None or stop <= start:
            return
        page_start = start - start % mmap.PAGESIZE
        try:
            madvise(dontneed, page_start, stop - page_start)
        except (OSError, ValueError):  # purely an optimisation
            pass

    def get(self, name: str, dtype: Any = np.float32) -> np.ndarray:
        """Read a whole tensor.

        ``dtype`` is the numpy dtype of the result; float targets decode BF16/FP8/E8M0 and cast
        anything numeric, integer/bool targets accept integer/bool tensors only. ``dtype=None``
        returns a copy of the raw storage (uint16 for BF16, uint8 for the 8-bit floats).
        """
        info = self._info(name)
        return self._read(name, info, 0, 0, info.shape[0] if info.shape else 1, dtype)

    def get_slice(self, name: str, axis: int, start: int, stop: int,
                  dtype: Any = np.float32) -> np.ndarray:
        """Read ``tensor[..., start:stop, ...]`` along ``axis`` without materialising the rest.

        Only the pages holding the requested rows (axis 0) or row segments (other axes) are
        touched, so each tensor-parallel rank pays for its own shard only.
        """
        info = self._info(name)
        ndim = len(info.shape)
        if not _is_int(axis) or not -ndim <= axis < ndim:
            raise self._fail("axis %r out of range for shape %s" % (axis, info.shape), name)
        axis %= ndim
        if not (_is_int(start) and _is_int(stop) and 0 <= start <= stop <= info.shape[axis]):
            raise self._fail("slice [%r:%r] out of range for axis %d of shape %s"
                             % (start, stop, axis, info.shape), name)
        return self._read(name, info, axis, start, stop, dtype)

    def _read(self, name: str, info: _TensorInfo, axis: int, start: int, stop: int,
              dtype: Any) -> np.ndarray:
        target = self._target_dtype(name, info, dtype)
        storage = SAFETENSORS_DTYPES[info.dtype]
        shape = info.shape
        out_shape = list(shape)
        if shape:
            out_shape[axis] = stop - start
        out = np.empty(tuple(out_shape), dtype=target)
        if out.size == 0:
            return out

        mm = self._mapping()
        offset = self._data_start + info.begin
        numel = math.prod(shape)
        src = np.frombuffer(mm, dtype=storage, count=numel, offset=offset).reshape(shape)
        try:
            if not shape:
                self._convert_into(src, info.dtype, out)
                return out
            row_elems = math.prod(shape[1:])
            row_bytes = row_elems * storage.itemsize
            # Walk the leading axis in bounded chunks; for axis 0 only the requested rows.
            rows = range(start, stop) if axis == 0 else range(0, shape[0])
            step = max(1, _CHUNK_ELEMS // max(1, row_elems))
            inner = (slice(None),) * (axis - 1) + (slice(start, stop),) if axis else ()
            for r0 in range(rows.start, rows.stop, step):
                r1 = min(r0 + step, rows.stop)
                o0 = r0 - rows.start
                self._convert_into(src[(slice(r0, r1),) + inner], info.dtype,
                                   out[o0:o0 + (r1 - r0)])
                self._release(offset + r0 * row_bytes, offset + r1 * row_bytes)
        finally:
            # Drop our view of the mapping so close() can unmap it.
            del src
        return out

    def _target_dtype(self, name: str, info: _TensorInfo, dtype: Any) -> np.dtype:
        if dtype is None:
            return SAFETENSORS_DTYPES[info.dtype].newbyteorder("=")
        try:
            target = np.dtype(dtype)
        except TypeError as exc:
            raise self._fail("unsupported target dtype %r" % (dtype,), name) from exc
        if target.kind == "f":
            return target
        if target.kind in "iub":
            if info.dtype not in _INTEGER_DTYPES:
                raise self._fail("cannot read %s data as %s" % (info.dtype, target), name)
            return target
        raise self._fail("unsupported target dtype %s" % target, name)

    @staticmethod
    def _convert_into(src: np.ndarray, st_dtype: str, out: np.ndarray) -> None:
        needs_decode = st_dtype == "BF16" or st_dtype in _LUTS
        if out.dtype.kind != "f" or not needs_decode:
            out[...] = src  # plain numpy cast (or raw copy when out has the storage dtype)
            return
        if st_dtype == "BF16":
            if out.dtype == np.float32:
                bits = out.view(np.uint32)
                bits[...] = src
                bits <<= 16
            else:
                out[...] = bf16_to_float32(src)
            return
        lut = _LUTS[st_dtype]
        if out.dtype == np.float32 and src.ndim > 0:
            _lut_decode_into(src, lut, out)
        else:
            out[...] = _lut_decode(np.array(src), lut)

    # -- lifetime ------------------------------------------------------------------------

    def close(self) -> None:
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                # Someone still holds a view (only possible through an exception traceback);
                # leave unmapping to the garbage collector.
                logger.debug("%s: mapping still referenced, not closed", self.path)
            self._mm = None

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return "SafetensorsFile(%r, %d tensors)" % (self.path, len(self._tensors))


# --------------------------------------------------------------------------------------------
# Folder
# --------------------------------------------------------------------------------------------

class CheckpointReader:
    """A Hugging Face checkpoint folder (or a single .safetensors file), tensor by tensor.

    File selection: ``model.safetensors.index.json`` if present (its weight_map is
    authoritative), else ``model.safetensors``, else every ``*.safetensors`` in sorted order.
    All headers are read and cross-checked in the constructor; no tensor data is read until
    asked for.
    """

    def __init__(self, folder: PathLike):
        self.folder = os.fspath(folder)
        self._files: Dict[str, SafetensorsFile] = {}
        self._where: Dict[str, SafetensorsFile] = {}
        try:
            if os.path.isfile(self.folder):
                self._open_file_list([self.folder])
            elif not os.path.isdir(self.folder):
                raise CheckpointError("%s: no such checkpoint folder" % self.folder)
            elif os.path.isfile(os.path.join(self.folder, INDEX_FILE)):
                self._open_index(os.path.join(self.folder, INDEX_FILE))
            elif os.path.isfile(os.path.join(self.folder, SINGLE_FILE)):
                self._open_file_list([os.path.join(self.folder, SINGLE_FILE)])
            else:
                paths = sorted(os.path.join(self.folder, n) for n in os.listdir(self.folder)
                               if n.endswith(".safetensors"))
                if not paths:
                    raise CheckpointError("%s: folder contains no .safetensors files"
                                          % self.folder)
                self._open_file_list(paths)
        except BaseException:
            self.close()
            raise
        logger.debug("opened %s: %d tensors in %d files", self.folder, len(self._where),
                     len(self._files))

    def _open(self, path: str) -> SafetensorsFile:
        if path not in self._files:
            self._files[path] = SafetensorsFile(path)
        return self._files[path]

    def _open_file_list(self, paths: Iterable[str]) -> None:
        for path in paths:
            st = self._open(path)
            for name in st.keys():
                other = self._where.get(name)
                if other is not None:
                    raise CheckpointError("%s: tensor %r is also stored in %s"
                                          % (path, name, other.path))
                self._where[name] = st

    def _open_index(self, index_path: str) -> None:
        try:
            with open(index_path, "rb") as f:
                index = json.loads(f.read().decode("utf-8"),
                                   object_pairs_hook=_reject_duplicate_keys("entry", index_path))
        except CheckpointError:
            raise
        except (OSError, ValueError) as exc:
            raise CheckpointError("%s: cannot parse index (%s)" % (index_path, exc)) from exc
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(
                isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError("%s: index has no 'weight_map' object of tensor -> file"
                                  % index_path)
        for name, fname in weight_map.items():
            path = os.path.join(self.folder, fname)
            if path not in self._files and not os.path.isfile(path):
                raise CheckpointError("%s: tensor %r is mapped to %s, which does not exist"
                                      % (index_path, name, path))
            st = self._open(path)
            if name not in st:
                raise CheckpointError("%s: tensor %r is listed in %s but missing from the file"
                                      % (path, name, index_path))
            self._where[name] = st

    # -- introspection -------------------------------------------------------------------

    def names(self) -> List[str]:
        """Every tensor name, sorted, including ``*_scale_inv`` companions."""
        return sorted(self._where)

    def logical_names(self) -> List[str]:
        """Tensor names without the ``<name>_scale_inv`` companions of other tensors."""
        return [n for n in self.names()
                if not (n.endswith(SCALE_INV_SUFFIX)
                        and n[:-len(SCALE_INV_SUFFIX)] in self._where)]

    def files(self) -> List[str]:
        """Paths of the safetensors files in use, sorted."""
        return sorted(self._files)

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def __len__(self) -> int:
        return len(self._where)

    def _file(self, name: str) -> SafetensorsFile:
        try:
            return self._where[name]
        except KeyError:
            raise CheckpointError("%s: tensor %r not found in the checkpoint"
                                  % (self.folder, name)) from None

    def file_of(self, name: str) -> str:
        """Path of the file holding `name` (for error messages and file-ordered loading)."""
        return self._file(name).path

    def dtype(self, name: str) -> str:
        return self._file(name).dtype(name)

    def shape(self, name: str) -> Tuple[int, ...]:
        return self._file(name).shape(name)

    def nbytes(self, name: str) -> int:
        return self._file(name).nbytes(name)

    def is_fp8(self, name: str) -> bool:
        return self.dtype(name) in _FP8_DTYPES

    # -- data ----------------------------------------------------------------------------

    def read(self, name: str, dtype: Any = np.float32) -> np.ndarray:
        """Read a tensor as stored (see SafetensorsFile.get); FP8 is decoded but NOT scaled."""
        return self._file(name).get(name, dtype)

    def read_slice(self, name: str, axis: int, start: int, stop: int,
                   dtype: Any = np.float32) -> np.ndarray:
        return self._file(name).get_slice(name, axis, start, stop, dtype)

    def read_dequantized(self, name: str, block_size: Tuple[int, int] = (128, 128),
                         slice: Optional[Tuple[int, int, int]] = None) -> np.ndarray:
        """Read a tensor as float32, applying ``<name>_scale_inv`` block scales to FP8 weights.

        ``slice=(axis, start, stop)`` reads only that part; for FP8 only the matching codes are
        decoded and only the matching blocks' scales are applied (partial blocks included).
        Non-FP8 tensors are simply converted to float32.
        """
        st = self._file(name)
        if slice is None:
            values = st.get(name, np.float32)
            axis, start = 0, 0
        else:
            if len(slice) != 3:
                raise CheckpointError("%s: tensor %r: slice must be (axis, start, stop), got %r"
                                      % (st.path, name, slice))
            axis, start, stop = slice
            values = st.get_slice(name, axis, start, stop, np.float32)
        if not self.is_fp8(name):
            return values

        scale_name = name + SCALE_INV_SUFFIX
        if scale_name not in self._where:
            raise CheckpointError("%s: tensor %r is %s but has no %r companion to dequantize it"
                                  % (st.path, name, st.dtype(name), scale_name))
        scale_st = self._where[scale_name]
        scale = scale_st.get(scale_name, np.float32)
        shape = st.shape(name)
        block = (int(block_size[0]), int(block_size[1]))
        if scale.size != 1:
            if len(shape) != 2:
                raise CheckpointError("%s: tensor %r: block dequantisation needs a 2-D weight, "
                                      "got shape %s" % (st.path, name, shape))
            expected = _block_scale_shape(shape, block)
            if scale.shape != expected:
                raise CheckpointError(
                    "%s: tensor %r: scale shape %s does not match weight shape %s with %s blocks"
                    " (expected %s)" % (scale_st.path, scale_name, scale.shape, shape, block,
                                        expected))
        if len(shape) == 2:
            axis %= 2
            row0, col0 = (start, 0) if axis == 0 else (0, start)
            _apply_block_scales(values, scale, block, row0, col0)
        else:
            values *= np.float32(scale.reshape(()))
        return values

    # -- lifetime ------------------------------------------------------------------------

    def close(self) -> None:
        for st in self._files.values():
            st.close()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return "CheckpointReader(%r, %d tensors, %d files)" % (
            self.folder, len(self._where), len(self._files))


# --------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------

def _encode_for_write(path: str, name: str, arr: np.ndarray,
                      requested: str) -> Tuple[str, np.ndarray]:
    """Return (safetensors dtype, little-endian contiguous storage array) for one tensor."""
    arr = np.asarray(arr)
    storage = SAFETENSORS_DTYPES[requested]
    ext = _EXTENSION_DTYPE_NAMES.get(arr.dtype.name)
    if ext == requested or (requested in ("BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0")
                            and arr.dtype == storage):
        # Already raw codes of the requested type.
        return requested, _c_contiguous(arr).view(storage)
    try:
        if requested == "BF16":
            data = float32_to_bf16(arr)
        elif requested == "F8_E4M3":
            data = float32_to_e4m3(arr)
        elif requested == "F8_E8M0":
            data = float32_to_e8m0(arr)
        elif requested == "F8_E5M2":
            raise ValueError("encoding to F8_E5M2 is not implemented; pass raw uint8 codes")
        elif requested in _INTEGER_DTYPES and requested != "BOOL":
            if arr.dtype.kind not in "iub":
                raise ValueError("refusing to cast %s data to integer %s" % (arr.dtype, requested))
            info = np.iinfo(storage)
            if arr.size and (arr.min() < info.min or arr.max() > info.max):
                raise ValueError("values out of range for %s" % requested)
            data = arr.astype(storage)
        else:
            data = arr.astype(storage)
    except ValueError as exc:
        raise ValueError("%s: tensor %r: %s" % (path, name, exc)) from exc
    return requested, _c_contiguous(data)


def write_safetensors(path: PathLike, tensors: Mapping[str, np.ndarray],
                      dtypes: Optional[Mapping[str, str]] = None,
                      metadata: Optional[Mapping[str, str]] = None) -> None:
    """Write `tensors` to a safetensors file readable by the Hugging Face library.

    ``dtypes`` maps names to a safetensors dtype to store ("BF16", "F16", "F32", "F8_E4M3",
    "F8_E8M0", integer types...); float arrays are rounded to nearest-even (FP8 saturates to
    +-448). Unlisted tensors keep their own dtype. Layout follows the reference writer: the
    header is space-padded to a multiple of 8 and tensors are laid out by decreasing element
    size, then name, so every tensor is aligned to its element size. Tensors are encoded and
    written one at a time, and the file appears atomically (written beside, then renamed).
    """
    path = os.fspath(path)
    dtypes = dict(dtypes or {})
    unknown = set(dtypes) - set(tensors)
    if unknown:
        raise ValueError("%s: dtypes given for unknown tensors %s" % (path, sorted(unknown)))
    if metadata is not None and not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError("%s: metadata must map str to str" % path)
    for name in tensors:
        if not isinstance(name, str) or name == "__metadata__":
            raise ValueError("%s: invalid tensor name %r" % (path, name))

    # Decide dtypes and sizes without converting data yet, so only one converted tensor is
    # alive at a time during the write.
    plan = []
    for name, arr in tensors.items():
        arr = np.asarray(arr)
        st = dtypes.get(name)
        if st is None:
            st = _EXTENSION_DTYPE_NAMES.get(arr.dtype.name) or _NATIVE_TO_SAFETENSORS.get(
                arr.dtype.newbyteorder("="))
            if st is None:
                raise ValueError("%s: tensor %r has dtype %s, which safetensors cannot store"
                                 % (path, name, arr.dtype))
        elif st not in SAFETENSORS_DTYPES:
            raise ValueError("%s: tensor %r: unknown safetensors dtype %r" % (path, name, st))
        plan.append((name, st, tuple(int(d) for d in arr.shape)))
    plan.sort(key=lambda p: (-SAFETENSORS_DTYPES[p[1]].itemsize, p[0]))

    header: Dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    entries = {}
    for name, st, shape in plan:
        nbytes = math.prod(shape) * SAFETENSORS_DTYPES[st].itemsize
        entries[name] = {"dtype": st, "shape": list(shape),
                         "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    for name in sorted(entries):
        header[name] = entries[name]
    header_bytes = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)

    tmp_path = path + ".tmp-%d" % os.getpid()
    try:
        with open(tmp_path, "wb") as f:
            f.write(struct.pack("<Q", len(header_bytes)))
            f.write(header_bytes)
            for name, st, shape in plan:
                written_st, data = _encode_for_write(path, name, tensors[name], st)
                if written_st != st or data.shape != shape:
                    raise RuntimeError("%s: tensor %r changed while being written" % (path, name))
                if data.size:
                    f.write(memoryview(data.reshape(-1).view(np.uint8)))
                del data
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise
