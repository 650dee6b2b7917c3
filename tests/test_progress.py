"""What cnnc run's progress bar counts: the run's steps, so that its ETA is the time to the run's end,
also when --steps ends the run inside an epoch."""
from __future__ import annotations

import numpy as np
import tqdm
from click.testing import CliRunner

from cnnc.cli import main

TINY = """network tiny
input data: 1x4x4
input labels: label(3)
train { batch = 4 }
fc3 = fc(data, outputs=3)
probs = softmax(fc3)
cost = logreg(labels, probs)
"""


class Bar:
    """Stands in for tqdm.tqdm: records how each bar is made and how far it gets."""
    made: list["Bar"] = []

    def __init__(self, total=None, initial=0, **kwargs):
        self.total, self.initial, self.n, self.desc = total, initial, initial, kwargs.get("desc")
        Bar.made.append(self)

    def update(self, n=1):
        self.n += n

    def set_postfix(self, **kwargs):
        pass

    def close(self):
        pass


def test_every_bar_counts_the_whole_run(tmp_path, monkeypatch):
    source = tmp_path / "tiny.cnn"
    source.write_text(TINY)
    rng = np.random.default_rng(0)
    data = tmp_path / "data.npz"
    np.savez(data, train_x=rng.random((16, 1, 4, 4), np.float32), train_y=np.arange(16) % 3,
             test_x=rng.random((4, 1, 4, 4), np.float32), test_y=np.arange(4) % 3)
    runner = CliRunner()
    assert runner.invoke(main, ["compile", str(source), "-o", str(tmp_path / "b"), "--no-nvcc"]).exit_code == 0
    monkeypatch.setattr(tqdm, "tqdm", Bar)
    Bar.made = []
    result = runner.invoke(main, ["run", str(tmp_path / "b"), "--backend", "reference", "--data", str(data),
                                  "--epochs", "3", "--steps", "10", "--save-dir", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert [(b.desc, b.total, b.initial, b.n) for b in Bar.made] == [
        ("epoch 1/3", 10, 0, 4), ("epoch 2/3", 10, 4, 8), ("epoch 3/3", 10, 8, 10)]
