"""kdcore-transformers (plugins/kdcore-transformers): the ``transformers`` teacher loader and
``KDTrainer``, on tiny random models built from configs (nothing is downloaded).

Losses are checked against plain-torch formulas written here: forward KL over the shifted,
``-100``-masked token positions, the student's cross-entropy, and an SGD step taken by hand.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import kdcore as kd

transformers = pytest.importorskip("transformers")

from kdcore_transformers import KDTrainer  # noqa: E402
from kdcore_transformers.trainer import KD_STATE_FILE  # noqa: E402

from tests.conftest import tiny_llama_from_config  # noqa: E402

VOCAB, LENGTH = 128, 9


def tiny_llama(hidden: int = 32, layers: int = 2, seed: int = 0) -> Any:
    return tiny_llama_from_config(vocab=VOCAB, hidden=hidden, seed=seed, layers=layers)


def examples(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Sequences whose first 1 to 6 labels are -100 (a prompt), so token counts differ."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, LENGTH), generator=generator)
    prompt = torch.randint(1, 7, (n,), generator=generator)
    out = []
    for row, p in zip(ids, prompt.tolist(), strict=True):
        labels = row.clone()
        labels[:p] = -100
        out.append({"input_ids": row, "labels": labels})
    return out


def arguments(tmp_path: Path, **overrides: Any) -> Any:
    settings: dict[str, Any] = {
        "output_dir": str(tmp_path / "run"),
        "max_steps": 1,
        "per_device_train_batch_size": 2,
        "per_device_eval_batch_size": 2,
        "learning_rate": 0.5,
        "optim": "sgd",
        "lr_scheduler_type": "constant",
        "max_grad_norm": 0.0,  # no clipping: the update is lr * gradient
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "disable_tqdm": True,
        "dataloader_pin_memory": False,
        "seed": 0,
    }
    settings.update(overrides)
    return transformers.TrainingArguments(**settings)


def hand_forward_kl_sum(
    student: Any, teacher: Any, batch: list[dict[str, torch.Tensor]], temperature: float
) -> tuple[torch.Tensor, int]:
    """sum over kept positions of T**2 KL(softmax(t/T) || softmax(s/T)), and their number.

    Logit row i predicts token i + 1, so row i counts when labels[i + 1] != -100.
    """
    ids = torch.stack([e["input_ids"] for e in batch])
    labels = torch.stack([e["labels"] for e in batch])
    s = student(ids).logits[:, :-1] / temperature
    with torch.no_grad():
        t = teacher(ids).logits[:, :-1].float() / temperature
    keep = labels[:, 1:] != -100
    log_p, log_q = F.log_softmax(s, -1), F.log_softmax(t, -1)
    per_row = (log_q.exp() * (log_q - log_p)).sum(-1)
    return per_row[keep].sum() * temperature**2, int(keep.sum())


def hand_cross_entropy_sum(student: Any, batch: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    ids = torch.stack([e["input_ids"] for e in batch])
    labels = torch.stack([e["labels"] for e in batch])
    log_p = F.log_softmax(student(ids).logits[:, :-1], -1)
    targets = labels[:, 1:]
    keep = targets != -100
    return -log_p[keep].gather(-1, targets[keep][:, None]).sum()


def safetensors_header(path: Path) -> dict[str, Any]:
    with open(path, "rb") as file:
        return json.loads(file.read(int.from_bytes(file.read(8), "little")))  # type: ignore[no-any-return]


# ====================================================================== the plugin
def test_the_transformers_loader_is_registered_by_the_installed_distribution() -> None:
    host = kd.PluginHost(blocked=())
    provider = host.registries.teacher_loaders.provider("transformers")
    assert (provider.plugin, provider.distribution) == ("transformers", "kdcore-transformers")


def test_without_the_plugin_the_loader_is_unknown_with_a_hint_to_install_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KDCORE_DISABLE_PLUGINS", "transformers")
    spec = {"name": "transformers", "path": "owner/model"}
    with kd.use_host(kd.PluginHost()), pytest.raises(kd.UnknownPluginError) as caught:
        kd.check([("kd_loss", {"teacher_model": spec, "criterion": {"name": "logits"}})])
    message = str(caught.value)
    assert message.startswith(
        "kd_loss.teacher_model.name: unknown teacher loader 'transformers'; registered: cached, callable"
    )
    assert message.endswith(
        "it is provided by 'kdcore-transformers': pip install kdcore-transformers, or from a "
        "checkout of the kdcore repository: pip install -e plugins/kdcore-transformers"
    )


# ====================================================================== the teacher loader
def test_the_loader_loads_a_saved_teacher_in_the_dtype_asked_for(tmp_path: Path) -> None:
    saved = tiny_llama(hidden=64, seed=1)
    saved.save_pretrained(tmp_path / "teacher")
    spec = {"name": "transformers", "path": str(tmp_path / "teacher"), "dtype": "bfloat16"}
    spec["device"] = "cpu"
    model = kd.convert(
        tiny_llama(), [("kd_loss", {"teacher_model": spec, "criterion": {"name": "forward_kl"}})]
    )
    teacher = model.teacher_model
    assert type(teacher) is transformers.LlamaForCausalLM
    assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16}
    assert teacher.device == torch.device("cpu")
    expected = {k: v.to(torch.bfloat16) for k, v in saved.state_dict().items()}
    loaded = teacher.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_the_loader_keeps_the_saved_dtype_by_default(tmp_path: Path) -> None:
    tiny_llama().to(torch.float16).save_pretrained(tmp_path / "teacher")
    teacher = kd.registries().teacher_loaders.get("transformers")(path=str(tmp_path / "teacher"))
    assert next(teacher.parameters()).dtype == torch.float16


def test_kd_restore_rebuilds_the_teacher_from_the_recorded_loader_spec(tmp_path: Path) -> None:
    tiny_llama(hidden=64, seed=1).save_pretrained(tmp_path / "teacher")
    spec = {"name": "transformers", "path": str(tmp_path / "teacher"), "dtype": "bfloat16"}
    config = {"teacher_model": spec, "criterion": {"name": "forward_kl"}}
    model = kd.convert(tiny_llama(), [("kd_loss", config)])
    kd.save(model, tmp_path / "run.safetensors")  # records the spec, not the teacher's weights
    assert not any("teacher" in key for key in safetensors_header(tmp_path / "run.safetensors"))
    restored = kd.restore(tiny_llama(seed=2), tmp_path / "run.safetensors")
    teacher = restored.teacher_model
    assert type(teacher) is transformers.LlamaForCausalLM and teacher.dtype == torch.bfloat16
    assert torch.equal(teacher.lm_head.weight, model.teacher_model.lm_head.weight)
    assert torch.equal(restored.lm_head.weight, model.lm_head.weight)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"dtype": "bf16"},
            "dtype 'bf16' is not one of auto, float32, float16, bfloat16, "
            "float64; did you mean 'bfloat16'?",
        ),
        (
            {"path": "./no/such/folder"},
            "path './no/such/folder': no such folder, and not a hub id ('owner/name')",
        ),
        (
            {"device": "gpu0"},
            "device 'gpu0' is not a torch device (such as 'cpu', 'cuda', 'cuda:1')",
        ),
        (
            {"auto_class": "AutoModelForCasualLM"},
            "auto_class 'AutoModelForCasualLM' is not a "
            "transformers AutoModel class; did you mean 'AutoModelForCausalLM'?",
        ),
        (
            {"from_pretrained_kwargs": {"trust_remote_code": True}},
            "from_pretrained_kwargs['trust_remote_code'] is refused: it runs code downloaded",
        ),
        (
            {"from_pretrained_kwargs": {"torch_dtype": "float16"}},
            "from_pretrained_kwargs['torch_dtype']: use the loader's own 'dtype' key instead",
        ),
        ({"dtyp": "float16"}, "kd_loss.teacher_model.dtyp: unknown key; did you mean 'dtype'?"),
    ],
)
def test_the_loader_refuses_a_bad_value_naming_it(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    tiny_llama().save_pretrained(tmp_path / "teacher")
    spec = {"name": "transformers", "path": str(tmp_path / "teacher"), **change}
    config = {"teacher_model": spec, "criterion": {"name": "forward_kl"}}
    for attempt in (
        lambda: kd.check([("kd_loss", config)]),  # validates without loading
        lambda: kd.convert(tiny_llama(), [("kd_loss", config)]),
    ):
        with pytest.raises(kd.ConfigError) as caught:
            attempt()
        assert str(caught.value).startswith("kd_loss.teacher_model")
        assert message in str(caught.value)


def test_the_loader_refuses_a_folder_that_save_pretrained_did_not_write(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    spec = {"name": "transformers", "path": str(tmp_path / "empty")}
    with pytest.raises(kd.ConfigError, match=r"has no config.json: not a folder save_pretrained"):
        kd.check([("kd_loss", {"teacher_model": spec, "criterion": {"name": "logits"}})])


# ====================================================================== KDTrainer: the loss
@pytest.mark.parametrize(
    "criterion",
    [
        {("", ""): {"name": "forward_kl", "temperature": 2.0}},
        # the fused loss never holds the logits: it works from the lm heads' inputs
        {("lm_head:input", "lm_head:input"): {"name": "fused_logits", "temperature": 2.0}},
    ],
    ids=["forward_kl", "fused_logits"],
)
def test_a_step_with_gradient_accumulation_descends_the_token_mean_forward_kl(
    tmp_path: Path, criterion: dict[Any, Any]
) -> None:
    student, teacher = tiny_llama(), tiny_llama(hidden=64, seed=1)
    reference = copy.deepcopy(student)
    data = examples(4, seed=2)  # one optimiser step: 2 micro-batches of 2 sequences
    trainer = KDTrainer(
        model=student,
        args=arguments(tmp_path, gradient_accumulation_steps=2),
        kd_config={"teacher_model": teacher, "criterion": criterion},
        train_dataset=data,
    )
    result = trainer.train()

    kl_sum, tokens = hand_forward_kl_sum(reference, teacher, data, temperature=2.0)
    expected = kl_sum / tokens  # the mean over the step's tokens, however it was split
    assert result.training_loss == pytest.approx(expected.item(), rel=1e-5)
    expected.backward()
    trained = dict(student.named_parameters())
    for name, parameter in reference.named_parameters():
        assert torch.allclose(trained[name], parameter - 0.5 * parameter.grad, atol=1e-6), name


def test_layer_pairs_and_a_balancer_combine_kd_losses_with_the_student_cross_entropy(
    tmp_path: Path,
) -> None:
    student, teacher = tiny_llama(), tiny_llama(layers=3, seed=1)
    reference = copy.deepcopy(student)
    data = examples(4, seed=3)
    trainer = KDTrainer(
        model=student,
        args=arguments(tmp_path, per_device_train_batch_size=4),
        kd_config={
            "teacher_model": teacher,
            "criterion": {
                ("", ""): {"name": "forward_kl"},
                ("model.layers.1", "model.layers.2"): {"name": "mse"},
            },
            "loss_balancer": {"name": "static", "kd_loss_weight": [0.5, 0.3]},
        },
        train_dataset=data,
    )
    result = trainer.train()

    ids = torch.stack([e["input_ids"] for e in data])
    captured: dict[str, torch.Tensor] = {}
    reference.model.layers[1].register_forward_hook(lambda m, a, out: captured.update(s=out))
    teacher.model.layers[2].register_forward_hook(lambda m, a, out: captured.update(t=out))
    kl_sum, tokens = hand_forward_kl_sum(reference, teacher, data, temperature=1.0)
    ce_sum = hand_cross_entropy_sum(reference, data)
    reference(ids)
    with torch.no_grad():
        teacher(ids)
    mse = ((captured["s"] - captured["t"]) ** 2).mean()
    expected = 0.5 * kl_sum / tokens + 0.3 * mse + 0.2 * ce_sum / tokens
    assert result.training_loss == pytest.approx(expected.item(), rel=1e-5)


def test_eval_loss_is_the_kd_loss_and_the_student_cross_entropy_is_a_separate_metric(
    tmp_path: Path,
) -> None:
    student, teacher = tiny_llama(), tiny_llama(hidden=64, seed=1)
    data = examples(5, seed=4)  # batches of 2, 2 and 1 sequences, with different token counts
    trainer = KDTrainer(
        model=student,
        args=arguments(tmp_path),
        kd_config={"teacher_model": teacher, "criterion": {"name": "forward_kl"}},
        eval_dataset=data,
    )
    metrics = trainer.evaluate()

    with torch.no_grad():
        kl_sum, tokens = hand_forward_kl_sum(student, teacher, data, temperature=1.0)
        ce_sum = hand_cross_entropy_sum(student, data)
    assert metrics["eval_loss"] == pytest.approx((kl_sum / tokens).item(), rel=1e-5)
    assert metrics["eval_student_loss"] == pytest.approx((ce_sum / tokens).item(), rel=1e-5)


# ====================================================================== KDTrainer: saving
def test_checkpoints_hold_the_student_alone_and_the_exported_student_reloads(
    tmp_path: Path,
) -> None:
    student = tiny_llama()
    student_keys = set(student.state_dict())
    config = {
        "teacher_model": tiny_llama(hidden=64, seed=1),
        "criterion": {
            ("", ""): {"name": "forward_kl"},
            ("model.norm", "model.norm"): {
                "name": "fitnet",
                "student_width": 32,
                "teacher_width": 64,
            },
        },
        "loss_balancer": {"name": "static", "kd_loss_weight": [0.5, 0.5]},
    }
    args = arguments(tmp_path, max_steps=2, save_strategy="steps", save_steps=1)
    trainer = KDTrainer(model=student, args=args, kd_config=config, train_dataset=examples(4, 5))
    trainer.train()

    checkpoint = tmp_path / "run" / "checkpoint-1"
    header = safetensors_header(checkpoint / "model.safetensors")
    assert set(header) - {"__metadata__"} == student_keys  # no teacher, no loss modules
    kd_state = kd_state_of(checkpoint)
    assert set(kd_state) == {"_loss_modules.1.projection.weight", "_loss_modules.1.projection.bias"}
    from_checkpoint = transformers.AutoModelForCausalLM.from_pretrained(checkpoint)
    assert type(from_checkpoint) is transformers.LlamaForCausalLM

    exported = trainer.export_student(str(tmp_path / "student"))
    assert type(exported) is transformers.LlamaForCausalLM and exported is student
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    ids = torch.stack([e["input_ids"] for e in examples(3, seed=6)])
    exported.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, exported(ids).logits)
    with pytest.raises(kd.DistillationStateError, match="export_student"):
        trainer.train()


def kd_state_of(checkpoint: Path) -> dict[str, torch.Tensor]:
    import safetensors.torch

    return safetensors.torch.load_file(checkpoint / KD_STATE_FILE)


def test_resuming_from_a_checkpoint_continues_with_the_loss_modules_weights(
    tmp_path: Path,
) -> None:
    def make(steps: int, folder: str) -> Any:
        config = {
            "teacher_model": tiny_llama(hidden=64, seed=1),
            "criterion": {
                ("model.norm", "model.norm"): {
                    "name": "fitnet",
                    "student_width": 32,
                    "teacher_width": 64,
                }
            },
        }
        args = arguments(
            tmp_path,
            output_dir=str(tmp_path / folder),
            max_steps=steps,
            save_strategy="steps",
            save_steps=1,
        )
        return KDTrainer(
            model=tiny_llama(), args=args, kd_config=config, train_dataset=examples(4, 7)
        )

    straight = make(2, "straight")
    straight.train()
    make(1, "stopped").train()
    resumed = make(2, "stopped")  # a fresh projection until the checkpoint's is loaded
    resumed.train(resume_from_checkpoint=str(tmp_path / "stopped" / "checkpoint-1"))

    projections = [t.model.loss_modules[0].projection.weight for t in (straight, resumed)]
    assert torch.allclose(*projections, atol=1e-6)
    assert torch.allclose(straight.model.lm_head.weight, resumed.model.lm_head.weight, atol=1e-6)


def test_resuming_with_loss_modules_that_do_not_fit_the_checkpoint_names_the_file(
    tmp_path: Path,
) -> None:
    def make(teacher_width: int, steps: int) -> Any:
        config = {
            "teacher_model": tiny_llama(hidden=teacher_width, seed=1),
            "criterion": {
                ("model.norm", "model.norm"): {
                    "name": "fitnet",
                    "student_width": 32,
                    "teacher_width": teacher_width,
                }
            },
        }
        args = arguments(tmp_path, max_steps=steps, save_strategy="steps", save_steps=1)
        return KDTrainer(
            model=tiny_llama(), args=args, kd_config=config, train_dataset=examples(4, 7)
        )

    make(64, 1).train()
    checkpoint = tmp_path / "run" / "checkpoint-1"
    with pytest.raises(kd.CheckpointMismatchError, match=r"(?s)kdcore_distillation.*size mismatch"):
        make(48, 2).train(resume_from_checkpoint=str(checkpoint))


# ====================================================================== KDTrainer: refusals
def test_kdtrainer_refuses_a_plain_model_without_a_kd_config(tmp_path: Path) -> None:
    with pytest.raises(
        kd.ConfigError, match=r"KDTrainer got a plain LlamaForCausalLM and no kd_config"
    ):
        KDTrainer(model=tiny_llama(), args=arguments(tmp_path))


def test_kdtrainer_refuses_label_smoothing(tmp_path: Path) -> None:
    with pytest.raises(kd.ConfigError, match=r"label_smoothing_factor=0.1: "):
        KDTrainer(
            model=tiny_llama(),
            args=arguments(tmp_path, label_smoothing_factor=0.1),
            kd_config={"teacher_model": tiny_llama(seed=1), "criterion": {"name": "logits"}},
        )


def test_kdtrainer_needs_labels_in_every_batch(tmp_path: Path) -> None:
    data = [{"input_ids": e["input_ids"]} for e in examples(2, seed=8)]
    trainer = KDTrainer(
        model=tiny_llama(),
        args=arguments(tmp_path),
        kd_config={"teacher_model": tiny_llama(seed=1), "criterion": {"name": "forward_kl"}},
        train_dataset=data,
    )
    with pytest.raises(
        kd.DistillationStateError, match=r"the batch has no 'labels' \(it has input_ids\)"
    ):
        trainer.train()
