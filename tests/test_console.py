"""The console: a Ray worker's progress bar is written as whole lines (Ray forwards worker output by line)."""

from __future__ import annotations

import io

from tqdm import tqdm

from pipeline.console import LineStream, ProgressBar


def test_line_stream_writes_each_redraw_as_one_line():
    out = io.StringIO()
    bar = tqdm(desc="epoch 1/2", total=4, unit="step", file=LineStream(out), mininterval=0, miniters=1)
    for i in range(4):
        bar.set_postfix_str(f"loss {1.0 / (i + 1):.3g}", refresh=False)
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and all(lines), lines
    assert len(lines) >= 4  # one line per redraw: the initial 0/4 and the updates
    assert lines[-1].startswith("epoch 1/2: 100%") and "4/4" in lines[-1] and "loss 0.25" in lines[-1]


def test_driver_bar_takes_postfix_metrics(capsys):
    bar = ProgressBar("eval", total=2, unit="batch")
    bar.update(1, top1=0.5, samples=8)
    bar.update(1, top1=0.75, samples=16)
    bar.close()
    err = capsys.readouterr().err
    assert "top1 0.75 samples 16" in err and "2/2" in err
