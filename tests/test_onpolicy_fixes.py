"""What a new user's trial of on-policy distillation found: ``llm.generate_completions`` on a
model ``kd.convert`` made samples from the student alone, and ``KDTrainer`` warns of on-policy
settings that do nothing or train on something else than meant."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import kdcore as kd
from kdcore import llm

transformers = pytest.importorskip("transformers")

from kdcore_transformers import KDTrainer  # noqa: E402

from tests.conftest import exit_torchrun_worker, tiny_llama_from_config  # noqa: E402
from tests.test_onpolicy import prompt_examples, training_arguments  # noqa: E402

VOCAB, EOS = 23, 2
PROMPTS = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])


def tiny_llama(seed: int = 0, hidden: int = 16) -> Any:
    return tiny_llama_from_config(vocab=VOCAB, hidden=hidden, seed=seed)


def generate(model: Any) -> torch.Tensor:
    """Near-greedy completions: tiny random models are near uniform, so samples at temperature 1
    hardly tell one model from another."""
    generator = torch.Generator().manual_seed(0)
    batch = llm.generate_completions(
        model, PROMPTS, max_new_tokens=5, temperature=1e-3, eos_token_id=EOS, generator=generator
    )
    return batch["input_ids"]


def converted(student: Any, teacher: Any) -> Any:
    return kd.convert(
        student, [("kd_loss", {"teacher_model": teacher, "criterion": {"name": "reverse_kl"}})]
    )


# ====================================================== generate_completions on kd.convert's model
@pytest.mark.parametrize("teacher_hidden", [32, 16])
def test_a_converted_model_samples_what_its_student_alone_samples(teacher_hidden: int) -> None:
    student = tiny_llama()
    alone = generate(copy.deepcopy(student))
    teacher = tiny_llama(seed=1, hidden=teacher_hidden)
    assert not torch.equal(generate(teacher), alone)
    teacher_calls: list[int] = []
    teacher.register_forward_hook(lambda *_: teacher_calls.append(1))
    model = converted(student, teacher)
    assert torch.equal(generate(model), alone)
    assert torch.equal(generate(student), alone)  # convert converted the student in place
    assert not teacher_calls  # no teacher forward a token


def test_the_teacher_samples_when_the_caller_chose_it() -> None:
    teacher = tiny_llama(seed=1, hidden=32)
    alone = generate(copy.deepcopy(teacher))
    model = converted(tiny_llama(), teacher)
    with model.only_teacher_forward():
        assert torch.equal(generate(model), alone)
    with model.only_student_forward():
        assert not torch.equal(generate(model), alone)


def test_a_converted_model_trains_on_what_it_sampled() -> None:
    model = converted(tiny_llama(), tiny_llama(seed=1, hidden=32))
    batch = llm.generate_completions(model, PROMPTS, max_new_tokens=5, eos_token_id=EOS)
    assert model.training
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    loss = model.compute_kd_loss(labels=llm.shift_labels(batch["labels"]))
    loss.backward()
    assert torch.isfinite(loss)
    assert model.lm_head.weight.grad is not None


# ================================================================ KDTrainer's warnings
def trainer(tmp_path: Path, criterion: str = "forward_kl", **options: Any) -> Any:
    args = transformers.TrainingArguments(
        str(tmp_path / "run"), max_steps=1, report_to=[], use_cpu=True, disable_tqdm=True
    )
    return KDTrainer(
        model=tiny_llama(),
        args=args,
        kd_config={"teacher_model": tiny_llama(seed=1), "criterion": {"name": criterion}},
        **options,
    )


@pytest.mark.parametrize(
    "options",
    [{}, {"teacher_generated_fraction": 1.0, "max_new_tokens": 2}],
    ids=["dataset tokens", "teacher tokens"],
)
def test_sampled_reverse_kl_without_on_policy_steps_warns(
    tmp_path: Path, options: dict[str, Any]
) -> None:
    with pytest.warns(UserWarning, match="sampled_reverse_kl .*on_policy_fraction=0"):
        trainer(tmp_path, "sampled_reverse_kl", **options)


@pytest.mark.parametrize(
    "options", [{"generation_temperature": 0.7}, {"top_p": 0.9}], ids=["tempered", "top-p"]
)
def test_sampled_reverse_kl_on_tempered_or_truncated_samples_warns(
    tmp_path: Path, options: dict[str, Any]
) -> None:
    with pytest.warns(UserWarning, match="sampled_reverse_kl .*tempered or truncated"):
        trainer(tmp_path, "sampled_reverse_kl", on_policy_fraction=1.0, max_new_tokens=2, **options)


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"max_new_tokens": 4}, "max_new_tokens"),
        ({"generation_temperature": 0.7}, "generation_temperature"),
        ({"top_p": 0.9, "max_new_tokens": 4}, "max_new_tokens, top_p"),
    ],
)
def test_generation_settings_without_generation_warn_that_they_are_ignored(
    tmp_path: Path, options: dict[str, Any], named: str
) -> None:
    with pytest.warns(UserWarning, match=f"{named} ignored"):
        trainer(tmp_path, **options)


@pytest.mark.parametrize(
    ("criterion", "options"),
    [
        ("forward_kl", {}),
        ("sampled_reverse_kl", {"on_policy_fraction": 0.5, "max_new_tokens": 2}),
        ("forward_kl", {"teacher_generated_fraction": 0.5, "max_new_tokens": 2, "top_p": 0.9}),
    ],
)
def test_meant_set_ups_warn_nothing(
    tmp_path: Path, criterion: str, options: dict[str, Any]
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer(tmp_path, criterion, **options)


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"generation_temperature": 0.0}, "generation_temperature must be finite and > 0"),
        ({"generation_temperature": "hot"}, "generation_temperature must be a number"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \[0, 1\]"),
    ],
)
def test_bad_generation_settings_name_the_argument_given(
    tmp_path: Path, options: dict[str, Any], named: str
) -> None:
    with pytest.raises(kd.ConfigError, match=named):
        trainer(tmp_path, on_policy_fraction=1.0, max_new_tokens=2, **options)


# ======================================================================== sampling under DDP
ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"


class ForwardCountingTrainer(KDTrainer):  # type: ignore[misc]
    """Counts, while each step's batches are made (where on-policy steps sample), the forwards
    of the model the Trainer trains (the DDP wrapper) and of the meta-model inside it."""

    calls = {"wrapper": 0, "meta": 0}
    wrapper_type = ""

    def get_batch_samples(self, *args: Any, **kwargs: Any) -> Any:
        calls, wrapper = self.calls, self.model_wrapped
        type(self).wrapper_type = type(wrapper).__name__
        hooks = [
            module.register_forward_pre_hook(
                lambda *_, key=key: calls.update({key: calls[key] + 1})
            )
            for key, module in (("wrapper", wrapper), ("meta", self.distillation_model()))
        ]
        try:
            return super().get_batch_samples(*args, **kwargs)
        finally:
            for hook in hooks:
                hook.remove()


@pytest.mark.slow  # two processes importing transformers: ~10 s
def test_under_ddp_the_student_samples_through_the_unwrapped_model(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "OUT": str(tmp_path)}
    command = [TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", __name__]
    result = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert seen["wrapper_type"] == "DistributedDataParallel"
        assert seen["calls"]["wrapper"] == 0  # not through DDP's forward (no gradient sync)
        assert seen["calls"]["meta"] >= 1  # the meta-model's forward sampled


def main() -> None:

    out = Path(os.environ["OUT"])
    trainer = ForwardCountingTrainer(
        model=tiny_llama(),
        args=training_arguments(out, max_steps=1),
        kd_config={"teacher_model": tiny_llama(seed=1, hidden=32), "criterion": {"name": "jsd"}},
        train_dataset=prompt_examples(8),
        on_policy_fraction=1.0,
        max_new_tokens=3,
    )
    trainer.train()
    seen = {"calls": trainer.calls, "wrapper_type": trainer.wrapper_type}
    (out / f"rank{os.environ['RANK']}.json").write_text(json.dumps(seen))
    exit_torchrun_worker()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
