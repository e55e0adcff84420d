"""Where mlnb's warnings go: stderr as without logging set up, except a routed thread's (the dashboard's worker)."""

from __future__ import annotations

import logging
import threading

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
