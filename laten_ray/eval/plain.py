"""Plain data over a pipe, for the judge's two processes (judge.py): None, bool, int of any size,
float (exactly), complex, str, bytes, list, tuple, set, frozenset, dict, the exact types kept
apart. A format of our own, never pickle or marshal: decoding builds fresh built-in objects from
bytes and runs no code of whoever wrote them. Stdlib only.

A message: an 8-byte length, then one value: a tag byte, then its content (lengths and counts
as 8-byte unsigned, int as signed big-endian bytes, float as IEEE double).
"""
import os
import struct

MAX_MESSAGE = 64 << 20  # bytes of one message
MAX_DEPTH = 100         # nesting of a value (a cycle reaches it too)


class NotPlainData(BaseException):
    """A value that cannot travel, or a malformed message. A BaseException, so a test's
    `except Exception` lets it through."""


class ChannelClosed(BaseException):
    """The other end of the channel closed."""


PLAIN = (bool, int, float, complex, str, bytes, list, tuple, set, frozenset, dict)  # bool before int
_NONE, _TRUE, _FALSE, _INT, _FLOAT, _COMPLEX, _STR, _BYTES = b"NTFIDCSB"
_LIST, _TUPLE, _SET, _FROZENSET, _DICT, _RECORD = b"LUEZMR"
_TAGS = {list: _LIST, tuple: _TUPLE, set: _SET, frozenset: _FROZENSET}
_COUNT, _DOUBLE, _DOUBLE2 = struct.Struct("!Q"), struct.Struct("!d"), struct.Struct("!dd")
HEADER = _COUNT


def encode(value, records: dict | None = None, lenient: bool = False) -> bytes:
    """`value` as bytes. `records`: class -> name, for the objects of the item's classes the
    tests may pass. `lenient` (the solution's side): a subclass of a plain type travels as that
    type (a namedtuple as a tuple, an IntEnum as an int, a Counter as a dict)."""
    out = bytearray()

    def put(x, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise NotPlainData(f"a value nested deeper than {MAX_DEPTH} levels (or a cycle)")
        t = type(x)
        if x is None:
            out.append(_NONE)
        elif t is bool:
            out.append(_TRUE if x else _FALSE)
        elif t is int:
            raw = x.to_bytes((x.bit_length() + 8) // 8, "big", signed=True)
            out.append(_INT)
            out.extend(_COUNT.pack(len(raw)) + raw)
        elif t is float:
            out.append(_FLOAT)
            out.extend(_DOUBLE.pack(x))
        elif t is complex:
            out.append(_COMPLEX)
            out.extend(_DOUBLE2.pack(x.real, x.imag))
        elif t is str or t is bytes:
            raw = x.encode("utf-8", "surrogatepass") if t is str else x
            out.append(_STR if t is str else _BYTES)
            out.extend(_COUNT.pack(len(raw)) + raw)
        elif t in _TAGS:
            out.append(_TAGS[t])
            out.extend(_COUNT.pack(len(x)))
            for item in x:
                put(item, depth + 1)
        elif t is dict:
            out.append(_DICT)
            out.extend(_COUNT.pack(len(x)))
            for k, v in x.items():
                put(k, depth + 1)
                put(v, depth + 1)
        elif records and t in records:
            out.append(_RECORD)
            put(records[t], depth + 1)
            put(dict(vars(x)), depth + 1)
        elif lenient and (base := next((b for b in PLAIN if isinstance(x, b)), None)):
            put(base(x), depth)
        else:
            raise NotPlainData(f"a {t.__name__}")
        if len(out) > MAX_MESSAGE:
            raise NotPlainData(f"a value over {MAX_MESSAGE >> 20} MB")

    put(value, 0)
    return bytes(out)


def decode(data: bytes, make_record=None):
    """The value `data` encodes, as fresh plain objects; NotPlainData if it is malformed.
    `make_record(name, fields)` builds a record (the solution's side); elsewhere a record is refused."""
    view, end = memoryview(data), len(data)

    def take(pos: int, n: int) -> int:
        if n < 0 or pos + n > end:
            raise NotPlainData("a truncated message")
        return pos + n

    def count(pos: int) -> tuple[int, int]:
        (n,) = _COUNT.unpack_from(view, take(pos, 8) - 8)
        if n > end:  # every item takes a byte at least
            raise NotPlainData("a malformed message (a count past its end)")
        return n, pos + 8

    def get(pos: int, depth: int):
        if depth > MAX_DEPTH:
            raise NotPlainData(f"a value nested deeper than {MAX_DEPTH} levels")
        tag = view[take(pos, 1) - 1]
        pos += 1
        if tag == _NONE:
            return None, pos
        if tag in (_TRUE, _FALSE):
            return tag == _TRUE, pos
        if tag == _FLOAT:
            return _DOUBLE.unpack_from(view, take(pos, 8) - 8)[0], pos + 8
        if tag == _COMPLEX:
            real, imag = _DOUBLE2.unpack_from(view, take(pos, 16) - 16)
            return complex(real, imag), pos + 16
        if tag in (_INT, _STR, _BYTES):
            n, pos = count(pos)
            raw = bytes(view[pos:take(pos, n)])
            value = int.from_bytes(raw, "big", signed=True) if tag == _INT else \
                raw.decode("utf-8", "surrogatepass") if tag == _STR else raw
            return value, pos + n
        if tag in (_LIST, _TUPLE, _SET, _FROZENSET, _DICT):
            n, pos = count(pos)
            items = []
            for _ in range(2 * n if tag == _DICT else n):
                item, pos = get(pos, depth + 1)
                items.append(item)
            try:
                if tag == _DICT:
                    return dict(zip(items[::2], items[1::2])), pos
                return (list if tag == _LIST else tuple if tag == _TUPLE else set if tag == _SET
                        else frozenset)(items), pos
            except TypeError:  # an unhashable key or member
                raise NotPlainData("a malformed message (an unhashable key)") from None
        if tag == _RECORD and make_record is not None:
            name, pos = get(pos, depth + 1)
            fields, pos = get(pos, depth + 1)
            return make_record(name, fields), pos
        raise NotPlainData(f"a malformed message (tag {tag!r})")

    value, pos = get(0, 0)
    if pos != end:
        raise NotPlainData("a malformed message (bytes after its value)")
    return value


def send(fd: int, value, **how) -> None:
    data = encode(value, **how)
    view = memoryview(HEADER.pack(len(data)) + data)
    while view:
        view = view[os.write(fd, view):]


def receive(fd: int, **how):
    """The next message; ChannelClosed when the other end closed."""
    def exactly(n: int) -> bytes:
        chunks = []
        while n:
            chunk = os.read(fd, min(n, 1 << 20))
            if not chunk:
                raise ChannelClosed("the channel closed")
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)
    (size,) = HEADER.unpack(exactly(HEADER.size))
    if size > MAX_MESSAGE:
        raise NotPlainData(f"a message of {size} bytes, over {MAX_MESSAGE >> 20} MB")
    return decode(exactly(size), **how)
