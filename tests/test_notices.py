"""hgrn_cupy.notices on the CPU: a warning is attributed to the first frame outside the library and the
frameworks that call back into it, so the printed line is the caller's; functions compiled with the globals
of such modules stand in for their frames."""
import _thread
import inspect
import os
import threading
import warnings

from hgrn_cupy import checks, dispatch, notices


def framed(module, source):
    """The function defined by ``source``, its frames reporting ``module`` as theirs."""
    space = {"__name__": module, "notices": notices}
    exec(compile(source, f"<{module}>", "exec"), space)
    return space[source.split("def ", 1)[1].split("(", 1)[0]]


def caught(call):
    """The warnings ``call()`` issues, every one recorded."""
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        call()
    return got


def here(offset):
    """(this file, the caller's line number + offset)."""
    return os.path.abspath(__file__), inspect.currentframe().f_back.f_lineno + offset


def test_library_and_framework_frames_are_skipped():
    """The library's front end, torch's machinery, the library again: the test's own line is named."""
    inner = framed("hgrn_cupy.engines.fake", "def inner():\n    notices.warn('from inside', RuntimeWarning)\n")
    autograd = framed("torch.autograd.fake", "def apply(fn):\n    fn()\n")
    entry = framed("hgrn_cupy.fake_front", "def entry(relay, fn):\n    relay(fn)\n")
    where = here(1)
    (w,) = caught(lambda: entry(autograd, inner))
    assert (os.path.abspath(w.filename), w.lineno) == where and w.category is RuntimeWarning


def test_a_context_managers_frames_are_skipped():
    manager = framed("hgrn_cupy.fake", "import contextlib\n@contextlib.contextmanager\ndef manager():\n"
                                       "    notices.warn('on entry', UserWarning)\n    yield\n")

    def enter():
        with manager():  # the first line of the body: the line the warning names
            pass
    (w,) = caught(enter)
    assert (os.path.abspath(w.filename), w.lineno) == (os.path.abspath(__file__), enter.__code__.co_firstlineno + 1)


def test_a_stack_with_no_frame_outside_still_warns():
    """A thread started from C whose every frame is the library's, as where a framework calls back from its
    own threads: the walk runs off the stack and the warning is still issued."""
    worker = framed("hgrn_cupy.fake", "def worker(done):\n    try:\n        notices.warn('no caller', UserWarning)\n"
                                      "    finally:\n        done.set()\n")
    done = threading.Event()

    def start():
        _thread.start_new_thread(worker, (done,))
        assert done.wait(10)
    (w,) = caught(start)
    assert str(w.message) == "no caller" and w.category is UserWarning


def test_the_untuned_warning_names_the_callers_line(tmp_path, monkeypatch):
    """Through the dispatch and the tuner's default path, as a captured or traced call reaches it."""
    from hgrn_cupy import tuning

    monkeypatch.setenv("HGRN_CUPY_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(dispatch.config, "engine", "auto")
    monkeypatch.setattr(dispatch.config, "tune", True)
    tuning.forget()
    call = checks.Call(None, 2, 4096, 2048, 2, ("bfloat16", "bfloat16"), "float32", False, True)
    try:
        where = here(1)
        (w,) = caught(lambda: dispatch.choose("auto", call, 0, False, "Fake GPU|sm_90|notices test", None, False))
    finally:
        tuning.forget()
    assert (os.path.abspath(w.filename), w.lineno) == where and w.category is dispatch.UntunedWarning
