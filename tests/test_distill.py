"""``kdcore distill``: the demo, config jobs, checks before building, resume, Ctrl-C, export."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import torch
from torch.utils.data import TensorDataset

import kdcore as kd
from kdcore import cli
from kdcore.training import TrainConfig, load_job, train
from kdcore.training.demo import load_digits, run_demo
from tests.conftest import TinyNet

BUILT: list[str] = []


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    # Tiny models: a second intra-op thread only adds synchronisation, and on a busy 2-core
    # machine it made the demo 50x slower (2 s became 100 s and more). The numbers are the same.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_data() -> tuple[TensorDataset, TensorDataset]:
    """The test data factory: 3 classes of points in 4 dimensions, fixed seed."""
    BUILT.append("data")
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(96, 4, generator=generator)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return TensorDataset(x[:72], y[:72]), TensorDataset(x[72:], y[72:])


def tiny_student() -> TinyNet:
    BUILT.append("student")
    return TinyNet()


JOB = """
[train]
student = "tests.test_distill:tiny_student"
data = "tests.test_distill:tiny_data"
optimizer = "adam"
learning_rate = 0.01
steps = {steps}
batch_size = 16
grad_accumulation = 2
output = "{output}"
checkpoint_every = {every}
log_every = 2
seed = 3

[kd_loss]
teacher_model = {{ name = "callable", target = "tests.conftest:make_teacher" }}
loss_balancer = {{ name = "static", kd_loss_weight = 0.5 }}
[[kd_loss.criterion]]
student = ""
teacher = ""
loss = {{ name = "logits", temperature = 2.0 }}
"""


def write_job(folder: Path, *, steps: int = 6, every: int = 3, name: str = "job") -> Path:
    path = folder / f"{name}.toml"
    output = (folder / f"{name}-out").as_posix()
    path.write_text(JOB.format(steps=steps, output=output, every=every), encoding="utf-8")
    return path


def test_load_digits_is_the_uci_set() -> None:
    x, y = load_digits()
    assert x.shape == (1797, 64) and y.shape == (1797,)
    assert float(x.min()) >= 0.0 and float(x.max()) == 1.0
    assert sorted(set(y.tolist())) == list(range(10))


def test_demo_runs_quick(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["distill", "--quick"]) == 0
    out = capsys.readouterr().out
    for row in ("teacher (1,300 labels)", "student alone", "student distilled", "wall time"):
        assert row in out


def test_demo_distillation_helps() -> None:
    result = run_demo(log=None)  # the full demo: about 2 s on one thread
    (_, teacher, big, _), (_, alone, small, _), (_, distilled, same, _) = result["rows"]
    assert small == same < big
    assert teacher > 0.9 and distilled > alone


def test_config_job_runs_checkpoints_and_exports(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = write_job(tmp_path)
    assert cli.main(["distill", str(job)]) == 0
    out = capsys.readouterr().out
    assert "step 2/6  loss " in out and "student_loss" in out and "examples/s" in out
    assert "validation accuracy" in out
    assert "(no plot: matplotlib is not installed" in out or "plot of losses" in out
    folder = tmp_path / "job-out"
    assert (folder / "step-3.safetensors").exists() and (folder / "step-6.json").exists()
    state = json.loads((folder / "step-6.json").read_text())
    assert state["step"] == 6 and len(state["rng"]) == len(torch.get_rng_state())

    fresh = kd.restore(TinyNet(), folder / "student.safetensors")
    assert type(fresh) is TinyNet and not hasattr(fresh, "_kd")
    whole = kd.restore(TinyNet(), folder / "step-6.safetensors")
    assert torch.equal(fresh.fc1.weight, kd.export(whole).fc1.weight)


@pytest.mark.parametrize(
    ("line", "replacement", "message"),
    [
        (
            "learning_rate = 0.01",
            "lerning_rate = 0.01",
            "train.lerning_rate: unknown key; did you mean 'learning_rate'?",
        ),
        ('optimizer = "adam"', 'optimizer = "adamm"', "train.optimizer: expected one of"),
        ("batch_size = 16", 'batch_size = "16"', "train.batch_size: expected int"),
        ("steps = 6", "steps = 6\nepochs = 2", "train.steps: give epochs or steps, not both"),
        ("temperature = 2.0", "temprature = 2.0", "kd_loss.criterion[0].loss.temprature"),
    ],
)
def test_bad_config_fails_with_path_and_builds_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], line: str, replacement: str, message: str
) -> None:
    job = write_job(tmp_path)
    text = job.read_text()
    assert line in text
    job.write_text(text.replace(line, replacement))
    BUILT.clear()
    assert cli.main(["distill", str(job)]) == 1
    err = capsys.readouterr().err
    assert str(job) in err and message in err
    assert BUILT == [] and not (tmp_path / "job-out").exists()


def test_missing_train_table_is_refused(tmp_path: Path) -> None:
    job = write_job(tmp_path)
    job.write_text(job.read_text().replace("[train]", "[trian]"))
    with pytest.raises(kd.ConfigError):
        load_job(job)


def test_a_job_loss_is_what_compute_kd_loss_returns(tmp_path: Path) -> None:
    modes, config = load_job(write_job(tmp_path, steps=2, every=0))
    steps: list[dict[str, float]] = []
    train(modes, config, log=None, save=False, on_step=lambda _, parts: steps.append(parts))
    for parts in steps:  # the static balancer, weight 0.5, over the step's two micro-batches
        kd_part = parts["LogitsDistillationLoss_0"]
        assert parts["loss"] == pytest.approx(0.5 * kd_part + 0.5 * parts["student_loss"])

    without_balancer = [(name, {k: v for k, v in table.items() if k != "loss_balancer"})
                        for name, table in modes]  # fmt: skip
    steps.clear()
    train(without_balancer, config, log=None, save=False, on_step=lambda _, p: steps.append(p))
    for parts in steps:  # the single KD loss alone; the student loss is shown, not trained
        assert list(parts) == ["loss", "student_loss", "LogitsDistillationLoss_0"]
        assert parts["loss"] == pytest.approx(parts["LogitsDistillationLoss_0"])


def test_resume_equals_uninterrupted(tmp_path: Path) -> None:
    whole_modes, whole = load_job(write_job(tmp_path, steps=8, every=4, name="whole"))
    straight = train(whole_modes, whole, log=None)

    modes, first = load_job(write_job(tmp_path, steps=4, every=0, name="half"))
    head = train(modes, first, log=None)
    second = attrs.evolve(first, steps=8)  # the same job, asked for 8 steps in all
    tail = train(modes, second, resume=head.checkpoint, log=None)

    assert head.checkpoint is not None and head.checkpoint.name == "step-4.safetensors"
    assert tail.steps == 8
    assert head.losses + tail.losses == straight.losses
    assert torch.equal(tail.student.fc1.weight, straight.student.fc1.weight)


def test_keyboard_interrupt_saves_a_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import kdcore.training.loop as loop

    real_train = loop.train

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        def on_step(step: int, losses: dict[str, float]) -> None:
            if step == 5:
                raise KeyboardInterrupt

        return real_train(*args, on_step=on_step, **kwargs)

    monkeypatch.setattr("kdcore.training.train", interrupted)
    job = write_job(tmp_path, steps=8, every=0)
    assert cli.main(["distill", str(job)]) == 130
    captured = capsys.readouterr()
    assert "interrupted; checkpoint saved" in captured.out and "interrupted" in captured.err
    saved = tmp_path / "job-out" / "step-5.safetensors"
    assert saved.exists()
    assert json.loads(saved.with_suffix(".json").read_text())["step"] == 5

    monkeypatch.undo()
    assert cli.main(["distill", str(job), "--resume", str(saved)]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert (tmp_path / "job-out" / "step-8.safetensors").exists()


def test_resume_without_config_is_a_usage_error() -> None:
    assert cli.main(["distill", "--resume", "x.safetensors"]) == 2


def test_bf16_autocast_and_epochs(tmp_path: Path) -> None:
    config = TrainConfig(
        student="tests.test_distill:tiny_student",
        data="tests.test_distill:tiny_data",
        epochs=2,
        batch_size=16,
        precision="bf16",
        output=str(tmp_path / "out"),
    )
    result = train([], config, log=None)
    assert result.steps == 2 * 5  # 72 examples in batches of 16: 5 a epoch
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert result.validation_accuracy is not None


def bad_data() -> TensorDataset:
    return tiny_data()[0]


def test_json_job_and_the_data_contract(tmp_path: Path) -> None:
    import tomllib

    table = tomllib.loads(write_job(tmp_path).read_text())
    table["train"]["data"] = "tests.test_distill:bad_data"
    job = tmp_path / "job.json"
    job.write_text(json.dumps(table))
    modes, config = load_job(job)
    assert config.data == "tests.test_distill:bad_data" and modes[0][0] == "kd_loss"
    with pytest.raises(kd.ConfigTypeError, match=r"train\.data: must return \(train, validation\)"):
        train(modes, config, log=None)


# ---------------------------------------------------------------- progress, metrics, plot
class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_elsewhere_prints_every_n_steps_and_the_last() -> None:
    import io

    from kdcore.training.progress import Progress

    screen, clock, said = io.StringIO(), FakeClock(), []
    progress = Progress(
        total=5, start=0, every=2, say=said.append, stream=screen, tty=False, clock=clock
    )
    for step in range(1, 6):
        clock.now += 1.0
        progress.update(step, {"loss": 0.5, "student_loss": 0.25}, examples=4)
    assert screen.getvalue() == ""
    assert said == [
        "step 2/5  loss 0.5000  student_loss 0.2500  4 examples/s  ETA 0:00:03",
        "step 4/5  loss 0.5000  student_loss 0.2500  4 examples/s  ETA 0:00:01",
        "step 5/5  loss 0.5000  student_loss 0.2500  4 examples/s  ETA 0:00:00",
    ]


def test_metrics_file_holds_every_step_and_each_evaluation(tmp_path: Path) -> None:
    from kdcore.training.metrics import read_metrics

    modes, config = load_job(write_job(tmp_path, steps=6, every=0))
    config = attrs.evolve(config, eval_every=4)
    result = train(modes, config, log=None)
    records = read_metrics(tmp_path / "job-out" / "metrics.jsonl")
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in steps] == result.losses
    assert set(steps[0]) == {
        "step",
        "loss",
        "student_loss",
        "LogitsDistillationLoss_0",
        "lr",
        "examples",
        "examples_per_second",
    }
    assert steps[0]["lr"] == config.learning_rate and steps[0]["examples_per_second"] > 0
    assert [(r["step"], r["validation_accuracy"]) for r in records if "loss" not in r] == [
        (4, result.validation[0][1]),
        (6, result.validation_accuracy),
    ]


def test_a_resumed_run_keeps_the_history_up_to_its_step(tmp_path: Path) -> None:
    from kdcore.training.metrics import read_metrics

    modes, config = load_job(write_job(tmp_path, steps=6, every=3))
    straight = train(modes, config, log=None)
    metrics = tmp_path / "job-out" / "metrics.jsonl"
    before = read_metrics(metrics)
    train(modes, config, resume=tmp_path / "job-out" / "step-3.safetensors", log=None)
    after = read_metrics(metrics)
    assert [r["step"] for r in after if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in after if "loss" in r] == straight.losses
    assert len(after) == len(before)


def test_without_matplotlib_the_plot_is_skipped_with_a_note(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib fails
    modes, config = load_job(write_job(tmp_path, steps=2, every=0))
    said: list[str] = []
    result = train(modes, config, log=said.append)
    assert result.plot is None and not (tmp_path / "job-out" / "metrics.png").exists()
    assert said[-1] == "(no plot: matplotlib is not installed; pip install 'kdcore[plot]')"


def test_with_matplotlib_the_losses_and_accuracy_are_plotted(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    modes, config = load_job(write_job(tmp_path, steps=4, every=0))
    result = train(modes, config, log=None)
    assert result.plot == tmp_path / "job-out" / "metrics.png"
    assert result.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summary_names_each_loss_and_the_best_accuracy() -> None:
    from kdcore.training.progress import summary

    lines = summary(
        steps=10,
        seconds=75.0,
        examples_per_second=1234.0,
        first={"loss": 2.0, "student_loss": 1.5},
        last={"loss": 0.5, "student_loss": 0.25},
        validation=[(5, 0.8), (10, 0.75)],
    )
    assert lines == [
        "done: 10 steps in 0:01:15 (75.0 s), 1,234 examples/s",
        "  loss          2.0000 -> 0.5000",
        "  student_loss  1.5000 -> 0.2500",
        "  validation accuracy 0.7500 at step 10 (best 0.8000 at step 5)",
    ]


def test_eval_every_below_zero_names_its_path(tmp_path: Path) -> None:
    job = write_job(tmp_path)
    job.write_text(job.read_text().replace("seed = 3", "seed = 3\neval_every = -1"))
    with pytest.raises(
        kd.ConfigError, match=r"train\.eval_every: must be 0 \(only at the end\) or more, got -1"
    ):
        load_job(job)
