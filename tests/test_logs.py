"""Where mlnb's warnings go: stderr as without logging set up, except a routed thread's (the dashboard's worker)."""

from __future__ import annotations

import logging
import threading
import warnings

from mlnb.logs import install, routed


def test_a_routed_thread_s_warnings_go_to_its_sink_and_the_others_to_stderr(monkeypatch, capsys):
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # as in a kernel: no logging set up (pytest adds one)
    install()
    install()  # once
    assert sum(type(h).__name__ == "_Handler" for h in logging.getLogger("mlnb").handlers) == 1
    log = logging.getLogger("mlnb.pipeline.managed")
    notes: list[str] = []

    def worker():
        with routed(notes.append):
            log.warning("plan for %s: resident", "3.0 GiB")
            log.info("not shown: below warning")
        log.warning("after the route")  # the route ends with the block

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    log.warning("from the main thread")
    err = capsys.readouterr().err
    assert notes == ["plan for 3.0 GiB: resident"]
    assert "from the main thread\n" in err and "after the route\n" in err and "plan for" not in err


def test_with_logging_set_up_mlnb_writes_nothing_itself(monkeypatch, capsys):
    """The root logger's handlers show mlnb's lines then (once, not twice)."""
    install()
    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    monkeypatch.setattr(logging.getLogger(), "handlers", [Collect()])
    logging.getLogger("mlnb.x").warning("once")
    assert seen == ["once"] and "once" not in capsys.readouterr().err


def test_a_routed_thread_s_library_notices_go_to_its_sink_too(capsys):
    """transformers and diffusers log through handlers of their own (to stderr): from the dashboard's thread, a
    notice such as the missing-torchvision one landed in whichever cell ran."""
    import io

    stream = io.StringIO()
    library = logging.getLogger("transformers")
    handler = logging.StreamHandler(stream)
    library.addHandler(handler)
    library.addHandler(logging.NullHandler())  # a second handler: each record still reaches the sink once
    try:
        notes: list[str] = []

        def worker():
            with routed(notes.append):
                logging.getLogger("transformers.models.clip").warning("requires torchvision")
            logging.getLogger("transformers.models.clip").warning("after the route")

        thread = threading.Thread(target=worker)
        thread.start()
        thread.join()
        logging.getLogger("transformers.models.clip").warning("main thread")
    finally:
        library.removeHandler(handler)
        library.removeHandler(library.handlers[-1])
    assert notes == ["requires torchvision"]
    assert stream.getvalue().splitlines() == ["after the route", "main thread"]
    assert handler.filters == []  # removed with the route


def test_library_notices_can_go_to_a_sink_of_their_own():
    import io

    library = logging.getLogger("diffusers")
    handler = logging.StreamHandler(io.StringIO())
    library.addHandler(handler)
    mine: list[str] = []
    theirs: list[str] = []
    try:
        with routed(mine.append, libraries=theirs.append):
            logging.getLogger("diffusers.pipelines").warning("deprecated")
    finally:
        library.removeHandler(handler)
    assert theirs == ["deprecated"] and mine == []


def _collect_shown(shown: list[str]):
    """A showwarning of the user's (or IPython's): the one Python calls for every warning that passes the filters."""

    def showwarning(message, category, filename, lineno, file=None, line=None):
        shown.append(f"{category.__name__}: {message}")

    return showwarning


def test_a_routed_thread_s_python_warnings_go_to_its_sink():
    """diffusers and transformers call warnings.warn (FutureWarning, UserWarning) while loading: from the dashboard's
    thread, Python printed them into whichever cell ran. The filters still apply; other threads' warnings are shown
    as before, and the user's showwarning is back once the route ends."""
    shown: list[str] = []
    with warnings.catch_warnings():  # restores the filters and showwarning
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", message="filtered out")
        warnings.filterwarnings("once", message="said once")
        users = warnings.showwarning = _collect_shown(shown)
        notes: list[str] = []
        library: list[str] = []
        inside, done = threading.Event(), threading.Event()

        def worker():
            with routed(notes.append, libraries=library.append):
                warnings.warn("slicing is deprecated", FutureWarning)
                warnings.warn("filtered out", UserWarning)
                warnings.warn("said once", UserWarning)
                warnings.warn("said once", UserWarning)
                inside.set()
                done.wait(5)
            warnings.warn("after the route", UserWarning)

        thread = threading.Thread(target=worker)
        thread.start()
        assert inside.wait(5)
        warnings.warn("main thread meanwhile", UserWarning)
        done.set()
        thread.join()
        assert warnings.showwarning is users
    assert library == ["FutureWarning: slicing is deprecated", "UserWarning: said once"] and notes == []
    assert shown == ["UserWarning: main thread meanwhile", "UserWarning: after the route"]


def test_two_routed_threads_keep_their_own_sinks_and_the_last_route_restores_showwarning():
    shown: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        users = warnings.showwarning = _collect_shown(shown)
        first: list[str] = []
        second: list[str] = []
        started, first_done = threading.Event(), threading.Event()

        def one():
            with routed(first.append):
                assert started.wait(5)
                warnings.warn("from one")
            first_done.set()

        def two():
            with routed(second.append):
                started.set()
                assert first_done.wait(5)
                warnings.warn("from two after one's route ended")
                assert warnings.showwarning is not users  # still routed
            warnings.warn("two, unrouted")

        threads = [threading.Thread(target=one), threading.Thread(target=two)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert warnings.showwarning is users
    assert first == ["UserWarning: from one"] and second == ["UserWarning: from two after one's route ended"]
    assert shown == ["UserWarning: two, unrouted"]


def test_a_showwarning_replaced_during_a_route_is_kept():
    """A user (or a library) that sets warnings.showwarning while the dashboard generates keeps theirs: the route's
    end does not put the old one back over it. A later route goes over theirs, and hands them other threads'."""
    shown: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        notes: list[str] = []
        with routed(notes.append):
            users = warnings.showwarning = _collect_shown(shown)
        assert warnings.showwarning is users
        warnings.warn("after the first route")
        with routed(notes.append):
            warnings.warn("second route")
            other = threading.Thread(target=warnings.warn, args=("another thread",))
            other.start()
            other.join()
        assert warnings.showwarning is users
    assert shown == ["UserWarning: after the first route", "UserWarning: another thread"]
    assert notes == ["UserWarning: second route"]


def test_a_failing_sink_leaves_the_warning_shown_as_without_the_route():
    shown: list[str] = []

    def broken(message):
        raise RuntimeError("panel gone")

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = _collect_shown(shown)
        with routed(broken):
            warnings.warn("still shown", FutureWarning)
    assert shown == ["FutureWarning: still shown"]
