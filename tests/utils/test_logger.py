"""Progress bars written to a Slurm log (a file, not a terminal) stay ASCII and quiet."""

from __future__ import annotations

import io

from megdet_hpc.utils.logger import progress_bar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bar_in_a_log_file_is_ascii_and_rarely_redrawn() -> None:
    log = io.StringIO()
    bar = progress_bar(500, "train", True, file=log)
    for i in range(500):
        bar.update(1)
        bar.set_postfix(loss=f"{i:.3f}", refresh=False)
    bar.close()
    text = log.getvalue()
    assert text.isascii()
    assert text.count("\r") <= 3, text  # first draw, final draw; no redraw per step within 30 s
    assert "500/500" in text


def test_bar_on_a_terminal_keeps_tqdm_defaults() -> None:
    term = _Terminal()
    bar = progress_bar(50, "train", True, file=term, mininterval=0)
    for _ in range(50):
        bar.update(1)
    bar.close()
    assert term.getvalue().count("\r") > 10 and not term.getvalue().isascii()


def test_disabled_bar_writes_nothing() -> None:
    log = io.StringIO()
    bar = progress_bar(10, "train", False, file=log)
    bar.update(10)
    bar.close()
    assert log.getvalue() == ""
