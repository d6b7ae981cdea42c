"""On-policy distillation: the cost of a ``KDTrainer`` step with generation against one without.

Two tiny Llamas built from configs (the student ``--hidden`` wide, the teacher twice as wide and
twice as deep) and one batch shape: ``--batch`` rows of a ``--prompt``-token prompt followed by
``--max-new-tokens`` tokens. The off-policy step trains on that text; the on-policy step
(``on_policy_fraction=1``) first samples a completion of each prompt from the student
(``kdcore.llm.generate_completions``, KV cache, no EOS in the vocabulary's reach, so every
completion is ``--max-new-tokens`` long and both steps train on the same number of tokens).

Each variant runs ``--steps`` optimiser steps of ``KDTrainer.train()`` per round, the variants
alternating (ABBA) over ``--rounds``; a step is the wall time between two ``on_step_end``
callbacks (the first step of each run is left out: warm-up). Printed: the median step of each
variant, the median of the per-round ratios, and where the time of a step goes (generation,
teacher forward, student forward + loss, backward, the rest: optimiser, data, callbacks),
from timers around ``KDTrainer``'s methods and hooks on the teacher. Nothing is asserted.

    python benchmarks/onpolicy.py [--hidden 64] [--batch 8] [--max-new-tokens 32] [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import defaultdict
from typing import Any

import torch
import transformers
from kdcore_transformers import KDTrainer

PHASES = ("data + generation", "teacher forward", "student forward + loss", "backward", "rest")


def llama(vocab: int, hidden: int, layers: int, seed: int) -> Any:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=vocab,  # outside the vocabulary: completions run to max_new_tokens
    )
    return transformers.LlamaForCausalLM(config)


class TimedKDTrainer(KDTrainer):  # type: ignore[misc]
    """``KDTrainer`` with timers: seconds per phase and the wall time of each step."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seconds: dict[str, float] = defaultdict(float)
        self.steps: list[float] = []
        teacher = self.distillation_model().teacher_model
        self._started: dict[str, float] = {}
        self.hooks = [
            teacher.register_forward_pre_hook(lambda *_: self._start("teacher")),
            teacher.register_forward_hook(self._teacher_done),
        ]
        trainer = self

        class StepTimes(transformers.TrainerCallback):  # type: ignore[misc]
            def on_step_end(self, *args: Any, **kwargs: Any) -> None:
                now = trainer._now()
                if "step" in trainer._started:
                    trainer.steps.append(now - trainer._started["step"])
                else:
                    trainer.seconds.clear()  # the first step is warm-up
                trainer._started["step"] = now

        self.add_callback(StepTimes())

    def _teacher_done(self, *_: Any) -> None:  # returns None: the output stays the teacher's
        self._stop("teacher", "teacher forward")

    def _now(self) -> float:
        if self.args.device.type == "cuda":  # the kernels launched so far belong to the phase
            torch.cuda.synchronize()
        return time.perf_counter()

    def _start(self, what: str) -> None:
        self._started[what] = self._now()

    def _stop(self, what: str, phase: str) -> float:
        elapsed = self._now() - self._started[what]
        self.seconds[phase] += elapsed
        return elapsed

    def get_batch_samples(self, *args: Any, **kwargs: Any) -> Any:
        self._start("batch")
        try:
            return super().get_batch_samples(*args, **kwargs)
        finally:
            self._stop("batch", "data + generation")

    def compute_loss(self, *args: Any, **kwargs: Any) -> Any:
        self._start("loss")
        teacher_before = self.seconds["teacher forward"]
        try:
            return super().compute_loss(*args, **kwargs)
        finally:
            elapsed = self._stop("loss", "student forward + loss")
            teacher = self.seconds["teacher forward"] - teacher_before
            self.seconds["student forward + loss"] -= teacher
            self.seconds["backward"] -= elapsed  # training_step's total minus the loss

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        self._start("training_step")
        try:
            return super().training_step(*args, **kwargs)
        finally:
            self._stop("training_step", "backward")


def run(options: argparse.Namespace, on_policy: bool, student: Any, teacher: Any) -> Any:
    generator = torch.Generator().manual_seed(0)
    length = options.prompt + options.max_new_tokens
    examples = []
    for _ in range(options.batch * options.steps):
        ids = torch.randint(options.vocab, (length,), generator=generator)
        labels = ids.clone()
        labels[: options.prompt] = -100
        examples.append({"input_ids": ids, "labels": labels})
    with tempfile.TemporaryDirectory() as folder:
        args = transformers.TrainingArguments(
            folder,
            max_steps=options.steps,
            per_device_train_batch_size=options.batch,
            learning_rate=1e-4,
            save_strategy="no",
            logging_strategy="no",
            report_to=[],
            use_cpu=options.device == "cpu",
            disable_tqdm=True,
            dataloader_pin_memory=False,
        )
        trainer = TimedKDTrainer(
            model=student,
            args=args,
            kd_config={"teacher_model": teacher, "criterion": {"name": options.criterion}},
            train_dataset=examples,
            on_policy_fraction=1.0 if on_policy else 0.0,
            max_new_tokens=options.max_new_tokens if on_policy else None,
        )
        trainer.remove_callback(transformers.PrinterCallback)
        trainer.train()
        for hook in trainer.hooks:
            hook.remove()
        trainer.export_student()
        return trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=64, help="the student's; teacher 2x")
    parser.add_argument("--layers", type=int, default=2, help="the student's; teacher 2x")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--criterion", default="reverse_kl")
    parser.add_argument("--steps", type=int, default=6, help="per run (the first is warm-up)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1, help="0: torch's default")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    options = parser.parse_args()
    if options.threads:
        torch.set_num_threads(options.threads)
    transformers.logging.set_verbosity_error()
    student = llama(options.vocab, options.hidden, options.layers, seed=0)
    teacher = llama(options.vocab, 2 * options.hidden, 2 * options.layers, seed=1)
    print(
        f"student {sum(p.numel() for p in student.parameters()) / 1e6:.2f}M parameters, teacher "
        f"{sum(p.numel() for p in teacher.parameters()) / 1e6:.2f}M; batch {options.batch} x "
        f"({options.prompt} prompt + {options.max_new_tokens} new) tokens, vocabulary "
        f"{options.vocab}, {options.criterion}, {options.device}, "
        f"{torch.get_num_threads()} thread(s)"
    )
    steps: dict[bool, list[float]] = {False: [], True: []}
    phases: dict[bool, dict[str, list[float]]] = {False: defaultdict(list), True: defaultdict(list)}
    ratios = []
    for round_ in range(options.rounds):
        medians = {}
        for on_policy in (False, True) if round_ % 2 == 0 else (True, False):
            trainer = run(options, on_policy, student, teacher)
            steps[on_policy] += trainer.steps
            medians[on_policy] = statistics.median(trainer.steps)
            timed = len(trainer.steps)
            accounted = sum(trainer.seconds.values())
            for phase in PHASES[:-1]:
                phases[on_policy][phase].append(trainer.seconds[phase] / timed)
            phases[on_policy]["rest"].append((sum(trainer.steps) - accounted) / timed)
        ratios.append(medians[True] / medians[False])
    off, on = (statistics.median(steps[v]) for v in (False, True))
    print(
        f"\noff-policy step {1e3 * off:.1f} ms, on-policy step {1e3 * on:.1f} ms (medians of "
        f"{len(steps[False])} steps each); on / off {on / off:.2f} (median of {len(ratios)} "
        f"per-round ratios: {statistics.median(ratios):.2f})\n"
    )
    print("| phase (ms per step, median over rounds) | off-policy | on-policy |")
    print("|---|---:|---:|")
    for phase in PHASES:
        cells = [1e3 * statistics.median(phases[v][phase]) for v in (False, True)]
        print(f"| {phase} | {cells[0]:.1f} | {cells[1]:.1f} |")
    generation = statistics.median(phases[True]["data + generation"])
    print(
        f"\ngeneration: {1e3 * generation / options.max_new_tokens:.2f} ms per new token "
        f"(one student forward of {options.batch} rows with the KV cache, and the sampling)"
    )


if __name__ == "__main__":
    main()
