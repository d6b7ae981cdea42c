"""The demo's labelled images and its batch order come from independent random streams."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from kdcore.training.demo import run_demo

FIRST_EPOCH = 1300 // 64 + 1  # batches of 64 over the 1,300 training images


def test_the_first_epoch_mixes_labelled_and_unlabelled_images(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second thread only synchronises
    try:
        run_demo(teacher_steps=20, student_steps=FIRST_EPOCH, output=tmp_path, log=None)
    finally:
        torch.set_num_threads(threads)
    lines = (tmp_path / "distilled" / "metrics.jsonl").read_text().splitlines()
    losses = [record["student_loss"] for record in map(json.loads, lines) if "loss" in record]
    # 100 labels among 1,300 images: about 5 a batch. Drawn from the training seed, they were
    # the first two batches, and student_loss was exactly 0 for the rest of the epoch.
    without_labels = sum(loss == 0.0 for loss in losses)
    assert len(losses) == FIRST_EPOCH and without_labels <= 2, losses
