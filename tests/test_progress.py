"""Progress that reads well in a log file: plain lines and summaries there, tqdm on a terminal."""

from __future__ import annotations

import io
import re
import subprocess
import sys

from conftest import ROOT, make_organized

from tbcxr.progress import track


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_in_a_file_plain_lines_then_one_summary(capsys):
    batches = [[0] * 8, [0] * 8, [0] * 3]
    assert list(track(batches, "Epoch 1 train", total=19, size=len, every=0)) == batches
    out, err = capsys.readouterr()
    lines = err.splitlines()  # every=0: a line after each batch
    assert [line.split(",")[0] for line in lines] == [
        f"Epoch 1 train: {n} of 19 images ({n / 19:.0%})" for n in (8, 16, 19)
    ]
    assert all(re.fullmatch(r".*, \d+ s, \d+\.\d images/s", line) for line in lines)
    assert re.fullmatch(r"Epoch 1 train: 19 images in \d+\.\d s \(\d+\.\d images/s\)\n", out)
    assert "\r" not in out + err


def test_on_a_terminal_a_tqdm_bar_and_the_summary(capsys, monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    list(track(range(5), "Checking images"))
    assert "Checking images:" in terminal.getvalue() and "\r" in terminal.getvalue()  # tqdm's bar
    assert capsys.readouterr().out.startswith("Checking images: 5 images in ")


def test_ranks_other_than_the_first_print_no_progress(capsys, monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    list(track(range(3), "Caching 32px", every=0, summary=False))
    assert capsys.readouterr() == ("", "")


def test_training_log_in_a_file_has_whole_lines(tmp_path):
    data = make_organized(tmp_path / "data", train=8, test=3, size=32)
    log = tmp_path / "train.log"
    args = ["--data-dir", str(data), "--weights", "none", "--recipe", "original", "--epochs", "2", "--image-size", "32"]
    args += ["--batch-size", "8", "--num-workers", "0", "--checkpoint-dir", str(tmp_path / "ckpt")]
    args += ["--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    with open(log, "w") as out:
        subprocess.run(
            [sys.executable, str(ROOT / "resnet50_tb_full.py"), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            check=True,
            timeout=600,
        )
    text = log.read_text()
    assert "\r" not in text
    for epoch in (1, 2):
        assert re.search(rf"^Epoch {epoch}: Loss=", text, re.MULTILINE)
        assert text.count(f"Epoch {epoch}:") == len(re.findall(rf"^Epoch {epoch}:", text, re.MULTILINE))
    assert re.search(r"^Checking images: 22 images in ", text, re.MULTILINE)
    assert re.search(r"^Leak check: \d+ images in ", text, re.MULTILINE)
