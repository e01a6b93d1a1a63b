"""run_log: the run's INFO lines go to its file, appended, without making a quiet terminal talkative."""
from __future__ import annotations

import io
import logging

from harness.run.runlog import run_log


def test_the_file_gets_info_the_terminal_keeps_its_level_and_everything_is_restored(tmp_path):
    root = logging.getLogger()
    terminal = io.StringIO()
    handler = logging.StreamHandler(terminal)  # like `ptqbench -q`: root at WARNING, handler at NOTSET
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    path = tmp_path / "logs" / "run.log"
    try:
        for attempt in (1, 2):
            with run_log(path) as file_only:
                logging.getLogger("harness.engine").info("block group %d done", attempt)
                logging.getLogger("harness.engine").warning("low memory %d", attempt)
                file_only.info("attempt %d started", attempt)
            logging.getLogger("harness.engine").info("after the run")
        assert root.level == logging.WARNING and handler.level == logging.NOTSET and len(root.handlers) >= 1
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    text = path.read_text()
    for attempt in (1, 2):  # the second attempt appended below the first
        for line in (f"INFO harness.engine: block group {attempt} done", f"WARNING harness.engine: low memory {attempt}",
                     f"INFO ptqbench.run: attempt {attempt} started"):
            assert line in text
    assert text.index("attempt 1 started") < text.index("block group 2 done")
    assert "after the run" not in text
    assert terminal.getvalue().splitlines() == ["low memory 1", "low memory 2"]  # warnings only, no file-only lines


def test_without_a_path_file_only_lines_go_nowhere(capsys):
    with run_log(None) as file_only:
        file_only.error("not for the terminal")
    assert "not for the terminal" not in capsys.readouterr().err
