"""kd.save / kd.restore: the whole distillation state back from one pickle-free file."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

import kdcore as kd
from tests.conftest import TinyNet, crafted_manifest, disk_full_after, make_teacher, write_raw

LABELS = torch.tensor([0, 1, 2, 0, 1])


class Projected(nn.Module):
    """A learnable loss that keeps its constructor arguments, so it can be recorded."""

    def __init__(self, student_width: int, teacher_width: int) -> None:
        super().__init__()
        self.student_width, self.teacher_width = student_width, teacher_width
        self.proj = nn.Linear(student_width, teacher_width)

    def forward(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(self.proj(s), t)


class WideNet(TinyNet):
    """A teacher that keeps its constructor argument (so an instance can be recorded)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__(width=width)
        self.width = width


def config(**overrides: Any) -> dict[str, Any]:
    return {
        "teacher_model": make_teacher,
        "criterion": {("", ""): kd.LogitsDistillationLoss(2.0), ("fc1", "fc1"): Projected(8, 16)},
        "loss_balancer": kd.StaticLossBalancer([0.3, 0.3]),
        **overrides,
    }


def step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor) -> float:
    output = model(x)
    loss = model.compute_kd_loss(student_loss=F.cross_entropy(output, LABELS))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def trained(batch: torch.Tensor, **overrides: Any) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = kd.convert(TinyNet(), [("kd_loss", config(**overrides))])
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(3):
        step(model, optimizer, batch)
    return model, optimizer


def manifest_of(path: Path) -> dict[str, Any]:
    with safe_open(str(path), "pt") as file:
        return json.loads(file.metadata()["kdcore"])  # type: ignore[no-any-return]


# ------------------------------------------------------------------ round trips
def test_restore_rebuilds_the_distillation_model_bit_identically(
    tmp_path: Path, batch: torch.Tensor
) -> None:
    model, optimizer = trained(batch)
    kd.save(model, tmp_path / "run.safetensors", optimizer=optimizer)

    restored = kd.restore(TinyNet(), tmp_path / "run.safetensors")
    assert isinstance(restored, kd.DistillationModel) and isinstance(restored, TinyNet)
    assert torch.equal(restored(batch), model(batch))
    assert torch.equal(
        restored.compute_kd_loss(student_loss=torch.tensor(1.0)),
        model.compute_kd_loss(student_loss=torch.tensor(1.0)),
    )
    assert torch.equal(restored.loss_modules[1].proj.weight, model.loss_modules[1].proj.weight)


def test_training_resumes_exactly_with_the_optimizer(tmp_path: Path, batch: torch.Tensor) -> None:
    model, optimizer = trained(batch)
    kd.save(model, tmp_path / "run.safetensors", optimizer=optimizer)
    restored = kd.restore(TinyNet(), tmp_path / "run.safetensors")
    restored_optimizer = torch.optim.Adam(restored.parameters(), lr=0.01)
    kd.restore(restored, tmp_path / "run.safetensors", optimizer=restored_optimizer)
    uninterrupted = [step(model, optimizer, batch) for _ in range(3)]
    resumed = [step(restored, restored_optimizer, batch) for _ in range(3)]
    assert resumed == uninterrupted


def test_checkpoint_is_one_safetensors_file_with_a_manifest(
    tmp_path: Path, batch: torch.Tensor
) -> None:
    model, _ = trained(batch)
    path = kd.save(model, tmp_path / "run.safetensors")
    assert list(tmp_path.iterdir()) == [path]
    with safe_open(str(path), "pt") as file:  # the reference library reads it as it is
        keys = set(file.keys())
        assert file.metadata()["format"] == "pt"
    assert "fc1.weight" in keys and "_loss_modules.1.proj.weight" in keys
    assert not any(key.startswith("_teacher_model.") for key in keys)  # rebuilt from its spec
    manifest = manifest_of(path)
    assert manifest["format_version"] == 1 and manifest["kdcore_version"] == kd.__version__
    assert manifest["modes"][0]["config"]["criterion"][0]["loss"] == {
        "name": "logits",
        "temperature": 2.0,
        "reduction": "mean",
    }
    assert manifest["modes"][0]["config"]["criterion"][1]["loss"] == {
        "name": "tests.test_checkpoint:Projected",
        "student_width": 8,
        "teacher_width": 16,
    }
    assert manifest["modes"][0]["config"]["loss_balancer"] == {
        "name": "static",
        "kd_loss_weight": [0.3, 0.3],
    }
    assert (
        manifest["modes"][0]["config"]["teacher_model"]["target"] == "tests.conftest:make_teacher"
    )


def test_full_state_dict_keeps_the_teacher_in_the_file(tmp_path: Path, batch: torch.Tensor) -> None:
    model, _ = trained(batch, expose_minimal_state_dict=False)
    path = kd.save(model, tmp_path / "run.safetensors")
    with safe_open(str(path), "pt") as file:
        assert "_teacher_model.fc1.weight" in set(file.keys())
    assert torch.equal(kd.restore(TinyNet(), path)(batch), model(batch))


def test_recordable_teacher_instance_is_rebuilt_and_its_weights_loaded(
    tmp_path: Path, batch: torch.Tensor
) -> None:
    teacher = WideNet(16)
    model, _ = trained(batch, teacher_model=teacher)
    path = kd.save(model, tmp_path / "run.safetensors")
    restored = kd.restore(TinyNet(), path)
    assert isinstance(restored.teacher_model, WideNet)
    assert torch.equal(restored.teacher_model.fc1.weight, teacher.fc1.weight)


def test_unrecordable_teacher_warns_at_save_and_restore_asks_for_it(
    tmp_path: Path, batch: torch.Tensor
) -> None:
    teacher = TinyNet(width=16)  # keeps no 'width' attribute: its constructor call is unknown
    model = kd.convert(TinyNet(), [("kd_loss", config(teacher_model=teacher))])
    model(batch)
    with pytest.warns(
        kd.NotRecordableWarning, match=r"kd_loss\.teacher_model: the teacher was passed"
    ):
        path = kd.save(model, tmp_path / "run.safetensors")
    with pytest.raises(
        kd.CheckpointError,
        match=r"run\.safetensors: kd_loss\.teacher_model could not be recorded.*teacher_model=",
    ):
        kd.restore(TinyNet(), path)
    restored = kd.restore(TinyNet(), path, teacher_model=TinyNet(width=16))
    assert torch.equal(restored.teacher_model.fc2.weight, teacher.fc2.weight)


def test_lambda_teacher_warns_at_save_and_its_weights_are_saved(tmp_path: Path) -> None:
    model = kd.convert(TinyNet(), [("kd_loss", config(teacher_model=lambda: TinyNet(16)))])
    with pytest.warns(kd.NotRecordableWarning, match="lambda"):
        path = kd.save(model, tmp_path / "run.safetensors")
    with safe_open(str(path), "pt") as file:
        assert "_teacher_model.fc1.weight" in set(file.keys())


def test_unrecordable_loss_is_reported_and_restore_into_a_converted_model_works(
    tmp_path: Path, batch: torch.Tensor
) -> None:
    def local_loss(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(s, t)

    model = kd.convert(TinyNet(), [("kd_loss", config(criterion=local_loss, loss_balancer=None))])
    with pytest.warns(kd.NotRecordableWarning, match=r"criterion\[0\]\.loss"):
        path = kd.save(model, tmp_path / "run.safetensors")
    with pytest.raises(kd.CheckpointError, match=r"criterion\[0\]\.loss could not be recorded"):
        kd.restore(TinyNet(), path)
    again = kd.convert(TinyNet(), [("kd_loss", config(criterion=local_loss, loss_balancer=None))])
    kd.restore(again, path)
    assert torch.equal(again(batch), model(batch))


def test_exported_student_comes_back_as_its_own_class(tmp_path: Path, batch: torch.Tensor) -> None:
    model, _ = trained(batch)
    student = kd.export(model)
    path = kd.save(student, tmp_path / "student.safetensors")
    restored = kd.restore(TinyNet(), path)
    assert type(restored) is TinyNet
    assert torch.equal(restored(batch), student(batch))
    with safe_open(str(path), "pt") as file:
        assert set(file.keys()) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}


def test_tied_weights_are_stored_once_and_stay_tied(tmp_path: Path) -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(5, 4)
            self.head = nn.Linear(4, 5, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.embed(x))

    source = Tied()
    path = kd.save(source, tmp_path / "tied.safetensors")
    with safe_open(str(path), "pt") as file:
        assert set(file.keys()) == {"embed.weight"}
    restored = kd.restore(Tied(), path)
    assert torch.equal(restored.head.weight, source.embed.weight)
    assert restored.head.weight is restored.embed.weight


def test_saving_overwrites_atomically_and_leaves_no_temporary_files(
    tmp_path: Path, batch: torch.Tensor
) -> None:
    model, _ = trained(batch)
    path = tmp_path / "run.safetensors"
    kd.save(model, path)
    kd.save(model, path)
    assert list(tmp_path.iterdir()) == [path]


# ------------------------------------------------------------------ trust
def test_untrusted_callable_is_refused_with_how_to_trust_it(
    tmp_path: Path, batch: torch.Tensor
) -> None:
    model, _ = trained(batch, teacher_model=(untrusted_teacher, (), {"width": 16}))
    path = kd.save(model, tmp_path / "run.safetensors")
    student = TinyNet()
    with pytest.raises(
        kd.UntrustedReferenceError,
        match=r"run\.safetensors.*'tests\.test_checkpoint:untrusted_teacher'.*trust=",
    ):
        kd.restore(student, path)
    assert type(student) is TinyNet
    assert (
        type(kd.restore(TinyNet(), path, trust=["tests.test_checkpoint:untrusted_teacher"]))
        is not TinyNet
    )
    assert isinstance(kd.restore(TinyNet(), path, trust=[untrusted_teacher]), kd.DistillationModel)


def untrusted_teacher(width: int) -> TinyNet:
    return TinyNet(width=width)


@pytest.mark.parametrize(
    "target",
    [
        "os:system",
        "builtins:eval",
        "subprocess:Popen",
        "pathlib:Path.write_text",
        "importlib:import_module",
    ],
)
def test_non_model_callables_named_by_a_file_never_run(tmp_path: Path, target: str) -> None:
    path = tmp_path / "evil.safetensors"
    manifest = crafted_manifest(
        teacher={"name": "callable", "target": target, "args": ["echo pwned"]}
    )
    write_raw(path, TinyNet().state_dict(), {"kdcore": json.dumps(manifest)})
    with pytest.raises(kd.UntrustedReferenceError, match=target.split(":")[1]):
        kd.restore(TinyNet(), path)


def test_a_module_the_file_names_is_not_imported(tmp_path: Path) -> None:
    path = tmp_path / "evil.safetensors"
    manifest = crafted_manifest(teacher={"name": "callable", "target": "antigravity:fly"})
    write_raw(path, TinyNet().state_dict(), {"kdcore": json.dumps(manifest)})
    with pytest.raises(kd.UntrustedReferenceError, match="'antigravity' is not imported"):
        kd.restore(TinyNet(), path)
    assert "antigravity" not in sys.modules


# ------------------------------------------------------------------ bad files
def assert_refused(path: Path, error: type[Exception], match: str) -> None:
    student = TinyNet()
    before = {name: value.clone() for name, value in student.state_dict().items()}
    with pytest.raises(error, match=match) as info:
        kd.restore(student, path)
    assert str(path) in str(info.value)
    assert type(student) is TinyNet
    assert all(torch.equal(before[n], v) for n, v in student.state_dict().items())


@pytest.mark.parametrize("keep", [0, 5, 8, 9, 40, -100, -1])
def test_truncated_file_is_refused(tmp_path: Path, batch: torch.Tensor, keep: int) -> None:
    model, _ = trained(batch)
    path = kd.save(model, tmp_path / "run.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    assert_refused(
        path,
        kd.CheckpointFormatError,
        r"too short|larger than the file|truncated|not a checkpoint|not valid JSON",
    )


def test_header_length_larger_than_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes((10**12).to_bytes(8, "little") + b'{"a": 1}')
    assert_refused(
        path, kd.CheckpointFormatError, "header length 1000000000000 is larger than the file"
    )


def test_pickle_files_are_never_unpickled(tmp_path: Path) -> None:
    class Boom:
        def __reduce__(self) -> Any:
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    raw = tmp_path / "model.safetensors"
    raw.write_bytes(pickle.dumps(Boom(), protocol=4))
    assert_refused(raw, kd.CheckpointFormatError, "pickle file; kdcore never unpickles")
    zipped = tmp_path / "model.pt"
    torch.save({"x": torch.ones(2)}, zipped)
    assert_refused(zipped, kd.CheckpointFormatError, "zip archive")
    assert not (tmp_path / "pwned").exists()


def test_safetensors_file_without_a_manifest(tmp_path: Path) -> None:
    path = tmp_path / "plain.safetensors"
    write_raw(path, TinyNet().state_dict(), {"format": "pt"})
    assert_refused(path, kd.CheckpointFormatError, "without a kdcore manifest")


def test_manifest_from_a_newer_format_version(tmp_path: Path) -> None:
    path = tmp_path / "future.safetensors"
    write_raw(
        path, TinyNet().state_dict(), {"kdcore": json.dumps(crafted_manifest(format_version=99))}
    )
    assert_refused(path, kd.CheckpointVersionError, "checkpoint format 99.*upgrade kdcore")


def test_registered_name_no_longer_installed(tmp_path: Path) -> None:
    manifest = crafted_manifest()
    manifest["modes"][0]["config"]["criterion"][0]["loss"] = {"name": "cosine_plus"}
    path = tmp_path / "old.safetensors"
    write_raw(path, TinyNet().state_dict(), {"kdcore": json.dumps(manifest)})
    assert_refused(
        path,
        kd.UnknownPluginError,
        r"kd_loss\.criterion\[0\]\.loss\.name: unknown criterion 'cosine_plus'",
    )


def test_tensor_whose_shape_does_not_match_is_named(tmp_path: Path, batch: torch.Tensor) -> None:
    model, _ = trained(batch)
    path = kd.save(model, tmp_path / "run.safetensors")
    student = TinyNet(width=9)
    with pytest.raises(
        kd.CheckpointMismatchError,
        match=r"tensor 'fc1\.weight' has shape \[8, 4\] in the file but \[9, 4\]",
    ):
        kd.restore(student, path)
    assert type(student) is TinyNet


def test_wrong_metadata_types_and_invalid_json(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    write_raw(path, TinyNet().state_dict(), {"kdcore": "{not json"})
    assert_refused(path, kd.CheckpointFormatError, "manifest is not valid JSON")
    write_raw(
        path, TinyNet().state_dict(), {"kdcore": json.dumps(crafted_manifest(modes={"a": 1}))}
    )
    assert_refused(path, kd.CheckpointFormatError, "manifest 'modes' has the wrong type")


def test_duplicate_tensor_names_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "dup.safetensors"
    header = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}'
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    assert_refused(path, kd.CheckpointFormatError, "duplicate tensor name 'a'")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file"):
        kd.restore(TinyNet(), tmp_path / "nope.safetensors")


def test_optimizer_of_another_shape_is_refused_before_anything_changes(
    tmp_path: Path, batch: torch.Tensor
) -> None:
    model, optimizer = trained(batch)
    path = kd.save(model, tmp_path / "run.safetensors", optimizer=optimizer)
    student = TinyNet()
    small = torch.optim.SGD([student.fc1.weight], lr=0.1)
    with pytest.raises(kd.CheckpointMismatchError, match="optimizer parameter groups hold"):
        kd.restore(student, path, optimizer=small)
    assert type(student) is TinyNet


# ------------------------------------------------------------------ faults while saving
def test_a_failed_write_leaves_the_previous_checkpoint(tmp_path: Path, batch: torch.Tensor) -> None:
    model, _ = trained(batch)
    path = kd.save(model, tmp_path / "run.safetensors")
    previous = path.read_bytes()
    with (
        disk_full_after(7),
        pytest.raises(kd.CheckpointWriteError, match="the disk is full.*unchanged"),
    ):
        kd.save(model, path)
    assert path.read_bytes() == previous
    assert list(tmp_path.iterdir()) == [path]


def test_killing_a_process_in_the_middle_of_save_keeps_a_loadable_checkpoint(
    tmp_path: Path,
) -> None:
    path = tmp_path / "run.safetensors"
    script = textwrap.dedent(
        f"""
        import sys, torch, kdcore as kd
        sys.path.insert(0, {str(Path(__file__).parent.parent)!r})
        from tests.conftest import TinyNet
        model = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(24)])
        for i in range(1000):
            with torch.no_grad():
                model[0].bias.fill_(i)
            kd.save(model, {str(path)!r})
            print(i, flush=True)
        """
    )
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    for _ in range(3):  # let a few saves complete, then kill mid-way through a later one
        process.stdout.readline()
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stdout.close()
    model = nn.Sequential(*[nn.Linear(512, 512) for _ in range(24)])
    kd.restore(model, path)
    assert float(model[0].bias[0].detach()) >= 2
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == [path.name]


def named_loss_function(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(s, t)


def test_a_named_loss_function_is_recorded_and_used_as_it_is(
    tmp_path: Path, batch: torch.Tensor
) -> None:
    model = kd.convert(
        TinyNet(), [("kd_loss", config(criterion=named_loss_function, loss_balancer=None))]
    )
    path = kd.save(model, tmp_path / "fn.safetensors")
    assert manifest_of(path)["modes"][0]["config"]["criterion"][0]["loss"] == {
        "name": "tests.test_checkpoint:named_loss_function"
    }
    with pytest.raises(kd.UntrustedReferenceError, match="named_loss_function"):
        kd.restore(TinyNet(), path)  # a plain function is not trusted by default
    restored = kd.restore(TinyNet(), path, trust=[named_loss_function])
    restored(batch)
    model(batch)
    assert torch.equal(restored.compute_kd_loss(), model.compute_kd_loss())


def test_a_teacher_taking_star_args_is_not_recordable(tmp_path: Path) -> None:
    model = kd.convert(
        TinyNet(),
        [
            (
                "kd_loss",
                config(
                    teacher_model=nn.Sequential(nn.Linear(4, 3)),
                    criterion=kd.MSELoss(),
                    loss_balancer=None,
                ),
            )
        ],
    )
    with pytest.warns(kd.NotRecordableWarning, match=r"Sequential takes \*args"):
        kd.save(model, tmp_path / "run.safetensors")


def test_a_third_party_modes_config_is_recorded_and_replayed(
    tmp_path: Path, batch: torch.Tensor
) -> None:
    import attrs

    from kdcore import PluginHost

    @attrs.define
    class ScaleConfig:
        factor: float = 1.0

    class ScaleTeacherMode:
        """Converts with kd_loss, then scales the teacher's last layer (a mode keeping no record)."""

        config_class = ScaleConfig

        def convert(self, model: nn.Module, cfg: ScaleConfig, *, path: str) -> nn.Module:
            with torch.no_grad():
                model.teacher_model.fc2.weight.mul_(cfg.factor)
            return model

        def describe(self, cfg: ScaleConfig, *, path: str, student: nn.Module | None) -> list[str]:
            return [f"{path}: scale by {cfg.factor}"]

    class Plugin:
        @staticmethod
        @kd.hookimpl
        def kdcore_register_modes(registry: Any) -> None:
            registry.add("scale_teacher", ScaleTeacherMode())

    with kd.use_host(PluginHost(plugins=[("scale", Plugin())], blocked=())):
        model = kd.convert(TinyNet(), [("kd_loss", config()), ("scale_teacher", {"factor": 2.0})])
        assert [record.name for record in model.mode_records] == ["kd_loss", "scale_teacher"]
        path = kd.save(model, tmp_path / "modes.safetensors")
        assert [mode["name"] for mode in manifest_of(path)["modes"]] == ["kd_loss", "scale_teacher"]
        restored = kd.restore(TinyNet(), path)
        assert torch.equal(restored.teacher_model.fc2.weight, model.teacher_model.fc2.weight)


def test_inspect_summarises_the_manifest_and_tensor_groups(
    tmp_path: Path, batch: torch.Tensor
) -> None:
    from kdcore.plugin import inspect_checkpoint

    model, optimizer = trained(batch, expose_minimal_state_dict=False)
    path = kd.save(model, tmp_path / "run.safetensors", optimizer=optimizer)
    summary = inspect_checkpoint(path)
    groups = summary["tensor_groups"]
    assert set(groups) == {"student", "teacher", "loss modules", "optimizer"}
    assert groups["student"] == {"tensors": 4, "parameters": 4 * 8 + 8 + 8 * 3 + 3, "bytes": 4 * 67}
    assert summary["manifest"]["modes"][0]["name"] == "kd_loss"
