"""pipeline.progress: a tqdm bar on a terminal, plain periodic lines elsewhere, silence off rank 0."""
from __future__ import annotations

import io

import pytest

from pipeline.progress import progress


class TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture(autouse=True)
def auto_mode(monkeypatch):
    monkeypatch.delenv("PVEN_PROGRESS", raising=False)
    monkeypatch.delenv("PVEN_PROGRESS_INTERVAL", raising=False)


def test_plain_mode_prints_periodic_lines_with_counts_postfix_and_a_final_line():
    out, clock = io.StringIO(), Clock()
    p = progress(total=360, desc="train", unit="batch", stream=out, interval=30, clock=clock)
    assert p.mode == "plain"
    for _ in range(120):
        clock.t += 0.1  # 12 s in all: under the interval, nothing printed yet
        p.update()
    assert out.getvalue() == ""
    p.set_postfix(loss=3.21438, epoch=2)
    clock.t += 20.0
    p.update(0)
    p.update(0)  # the interval has not elapsed again
    clock.t += 10.0
    p.update(240)
    p.close()
    p.close()  # idempotent
    lines = out.getvalue().splitlines()
    assert lines[0] == "train: 120/360 batch (33%) 3.75 batch/s loss=3.214 epoch=2"
    assert lines[1] == "train: 360/360 batch (100%) 8.57 batch/s loss=3.214 epoch=2 done in 42.0s"
    assert len(lines) == 2  # the last update came 10 s after the last line: only the final one
    assert "\r" not in out.getvalue()


def test_plain_iteration_with_interval_zero_prints_every_item_and_yields_them_unchanged():
    out = io.StringIO()
    items = ["a", "b", "c"]
    assert list(progress(items, desc="render", stream=out, interval=0)) == items
    lines = out.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["1/3", "2/3", "3/3", "3/3"]
    assert "(100%)" in lines[2] and lines[-1].startswith("render: 3/3 it (100%)")
    assert "done in" in lines[-1] and "\r" not in out.getvalue()


def test_unknown_total_counts_without_percent():
    out = io.StringIO()
    assert list(progress(iter(range(5)), desc="shard", unit="sample", stream=out, interval=0)) \
        == list(range(5))
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("shard: 1 sample")
    assert lines[-1].startswith("shard: 5 sample") and "done in" in lines[-1]
    assert "%" not in out.getvalue() and "/5" not in out.getvalue()


def test_disabled_prints_nothing_but_still_yields_all_items():
    for stream in (io.StringIO(), TTY()):
        p = progress(range(50), desc="embed", enabled=False, stream=stream, interval=0)
        with p:
            assert list(p) == list(range(50))
            p.set_postfix(loss=1.0)
            p.write("epoch 1: loss 1.0")
            p.update(3)
        assert p.mode == "off" and p.n == 53
        assert stream.getvalue() == ""


def test_tty_uses_a_tqdm_bar_with_desc_and_total():
    out = TTY()
    with progress(total=360, desc="masks", unit="img", stream=out) as p:
        assert p.mode == "bar"
        p.update(120)
        p.set_postfix(loss=0.123456)
    text = out.getvalue()
    assert "masks" in text and "/360" in text and "img" in text
    assert "\r" in text  # tqdm redraws in place on a terminal


def test_write_lines_appear_in_both_modes():
    plain = io.StringIO()
    with progress(range(3), desc="train", stream=plain, interval=1e9) as p:
        for i in p:
            if i == 1:
                p.write("epoch 1: loss=2.5 mAP=0.31")
    lines = plain.getvalue().splitlines()
    assert lines[0] == "epoch 1: loss=2.5 mAP=0.31" and lines[1].startswith("train: 3/3 it")

    tty = TTY()
    with progress(total=3, desc="train", stream=tty) as p:
        p.update()
        p.write("epoch 1: loss=2.5 mAP=0.31")
    assert "epoch 1: loss=2.5 mAP=0.31\n" in tty.getvalue()


def test_env_forces_off_and_plain(monkeypatch):
    monkeypatch.setenv("PVEN_PROGRESS", "off")
    tty = TTY()
    assert list(progress([1, 2], desc="x", stream=tty)) == [1, 2]
    assert tty.getvalue() == ""

    monkeypatch.setenv("PVEN_PROGRESS", "plain")
    tty = TTY()
    assert list(progress([1, 2], desc="x", stream=tty, interval=0)) == [1, 2]
    assert tty.getvalue().startswith("x: 1/2 it (50%)") and "\r" not in tty.getvalue()

    monkeypatch.setenv("PVEN_PROGRESS", "bar")
    out = io.StringIO()
    assert progress(total=2, desc="x", stream=out, enabled=False).mode == "off"  # never a rank != 0
    with progress(total=2, desc="x", stream=out) as p:
        assert p.mode == "bar"

    monkeypatch.setenv("PVEN_PROGRESS", "loud")
    with pytest.raises(ValueError, match="PVEN_PROGRESS"):
        progress(total=2, desc="x", stream=io.StringIO())


def test_env_sets_the_default_plain_interval(monkeypatch):
    monkeypatch.setenv("PVEN_PROGRESS_INTERVAL", "0")
    out = io.StringIO()
    list(progress(range(4), desc="x", stream=out))
    assert len(out.getvalue().splitlines()) == 5


def test_default_stream_is_stderr_and_an_early_break_gets_one_final_line(capsys):
    with progress(range(10), desc="extract", interval=1e9) as p:
        for i in p:
            if i == 3:
                break
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("extract: 3/10 it (30%)")
