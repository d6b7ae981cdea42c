"""``KDTrainer``: a ``transformers.Trainer`` that distils the student it is given.

The loss of one micro-batch ``m`` (of ``n_m`` counted tokens, in a step of ``N`` tokens over all
gradient-accumulation micro-batches and, with ``average_tokens_across_devices``, all ranks) is

    loss_m = total_m * n_m / N

where ``total_m`` is what ``model.compute_kd_loss`` returns for the micro-batch: the KD loss, or
the balancer's combination of the KD losses with the student's cross-entropy (a mean over the
micro-batch's tokens). The logit divergences and the cross-entropy are token means, so the step
backwards exactly their mean over the step's tokens, however the batch was split; a loss that
is not per token (an MSE between hidden states, say) gets each micro-batch's value weighted by
its share of the tokens. The balancer always sees per-micro-batch means, whatever the
accumulation, so a balancer that compares magnitudes sees the same values either way.

Tokens are counted after the causal shift (``causal_shift=True``): logit row ``i`` predicts
``labels[i + 1]``, and a row whose label is ``-100`` is left out of every loss.

On-policy steps (``on_policy_fraction > 0``) replace the step's micro-batches by the student's
own completions of their prompts before the tokens are counted, so the normalisation above holds
for generated batches as it does for fixed text; sequence-level KD steps
(``teacher_generated_fraction > 0``) by the teacher's.
"""

from __future__ import annotations

import inspect
import json
import os
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers.trainer_utils import EvalLoopOutput

import kdcore as kd
from kdcore import ConfigError, DistillationModel, DistillationStateError, llm
from kdcore.plugin import TeacherCache, is_distillation_model
from kdcore.validation import check_positive_int, check_temperature, check_unit_interval

#: Where checkpoints keep the loss modules' weights and balancer buffers (for resuming): not in
#: the model's weights file, which holds the student alone.
KD_STATE_FILE = "kdcore_distillation.safetensors"
#: The checkpoint backend that writes and reads it (atomically; the reader checks the file).
KD_STATE_BACKEND = "safetensors"
KD_STATE_MANIFEST = '{"format": "kdcore-distillation-state"}'
LABELS = "labels"


class KDTrainer(transformers.Trainer):
    """A ``Trainer`` that distils: give it the student and a ``kd_loss`` config.

    ::

        trainer = KDTrainer(
            model=student,
            args=TrainingArguments("out", max_steps=100),
            kd_config={"teacher_model": {"name": "transformers", "path": "teacher/"},
                       "criterion": {"name": "forward_kl"}},
            train_dataset=train, eval_dataset=valid,
        )
        trainer.train()
        trainer.export_student("student/")   # loads with AutoModelForCausalLM.from_pretrained

    :param model: the student (a ``PreTrainedModel``), converted in place with
        ``kd.convert(model, [("kd_loss", kd_config)])``; or a model ``kd.convert`` already made,
        with ``kd_config=None``.
    :param kd_config: the ``kd_loss`` config: a mapping or a ``kd.KDLossConfig`` (teacher,
        criterion, balancer), as in ``kd.convert``.
    :param causal_shift: compare logit row ``i`` with ``labels[i + 1]`` (causal LMs); ``False``
        when labels are already aligned with the logits.
    :param on_policy_fraction: the fraction of optimiser steps whose completions the student
        generates itself (on-policy distillation, GKD's ``lmbda``); ``0`` (the default) trains on
        the dataset's text only. Each step draws, seeded by ``args.seed`` and the step, whether it
        is on-policy; its micro-batches are then replaced by :func:`kdcore.llm.generate_completions`
        of the student from each row's prompt (its leading ``-100`` labels): ``input_ids``,
        ``attention_mask`` and ``labels`` covering the completion only. The loss is then
        computed as on any batch.
    :param teacher_generated_fraction: the fraction of optimiser steps whose completions the
        teacher generates (sequence-level KD, TRL's ``seq_kd``), sampled as the student's are
        (eval mode, no gradients, its KV cache, the same seeds) and trained on with the same
        masks. One draw a step picks the student with probability ``on_policy_fraction``, else
        the teacher with probability ``teacher_generated_fraction``, else the dataset's text, so
        the two fractions may add up to 1 at most; TRL's ``seq_kd=True, lmbda=l`` is
        ``on_policy_fraction=l, teacher_generated_fraction=1 - l``. ``0`` (the default) leaves
        every draw as it was.
    :param max_new_tokens: the longest completion (needed when either fraction is above 0).
    :param generation_temperature: ``top_p``: how the completions are sampled (temperature 1
        and top-p 1 sample from the model itself); sampling stops at the generating model's
        ``eos_token_id`` (its generation config's, else its config's). Under
        ``torch.distributed`` every rank samples until every rank's rows have stopped, so a
        model whose forward gathers its parameters (FSDP2's ``fully_shard``) runs as often on
        each rank. Setting ``max_new_tokens``, a temperature or a top-p other than 1 with both
        fractions 0 warns (nothing is generated), as does the ``sampled_reverse_kl`` criterion
        with ``on_policy_fraction=0`` (its estimates hold on the student's own samples only).

    Every batch needs ``labels`` (input ids, ``-100`` where no loss counts). ``labels=`` reaches
    the criteria whose ``forward`` takes it, shifted, so the logit divergences skip masked rows.
    Evaluation reports ``eval_loss`` (the distillation loss training minimises, a mean over the
    evaluation tokens) and ``eval_student_loss`` (the student's cross-entropy alone), leaving out
    the examples accelerate repeats to even out the last batch over the ranks.
    Checkpoints hold the student's weights only (``from_pretrained`` loads them), plus
    ``kdcore_distillation.safetensors`` with the loss modules' weights, for resuming (and, with a
    cached teacher, what the cache was written from: resuming from another teacher's cache is
    refused). Other keyword arguments go to ``transformers.Trainer``.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        args: transformers.TrainingArguments | None = None,
        *,
        kd_config: Mapping[str, Any] | kd.KDLossConfig | None = None,
        causal_shift: bool = True,
        on_policy_fraction: float = 0.0,
        teacher_generated_fraction: float = 0.0,
        max_new_tokens: int | None = None,
        generation_temperature: float = 1.0,
        top_p: float = 1.0,
        **kwargs: Any,
    ) -> None:
        for refused, why in (
            ("model_init", "the student is converted once, so pass model="),
            ("compute_loss_func", "KDTrainer computes the loss with model.compute_kd_loss"),
        ):
            if kwargs.get(refused) is not None:
                raise ConfigError(f"KDTrainer does not take {refused}= ({why})")
        if args is not None and args.label_smoothing_factor != 0:
            raise ConfigError(
                f"TrainingArguments.label_smoothing_factor={args.label_smoothing_factor!r}: "
                "KDTrainer's student loss is the plain cross-entropy; distillation already "
                "gives soft targets (set it to 0)"
            )
        if not isinstance(causal_shift, bool):
            raise ConfigError(f"causal_shift must be True or False, got {causal_shift!r}")
        if model is None:
            raise ConfigError("KDTrainer needs model= (the student)")
        if kd_config is not None:
            model = kd.convert(model, [("kd_loss", kd_config)])
        elif not is_distillation_model(model):
            raise ConfigError(
                f"KDTrainer got a plain {type(model).__name__} and no kd_config: pass "
                "kd_config={'teacher_model': ..., 'criterion': ...}, or a model kd.convert made"
            )
        self.causal_shift = causal_shift
        self.on_policy_fraction = check_unit_interval("on_policy_fraction", on_policy_fraction)
        self.teacher_generated_fraction = check_unit_interval(
            "teacher_generated_fraction", teacher_generated_fraction
        )
        if self.on_policy_fraction + self.teacher_generated_fraction > 1:
            raise ConfigError(
                f"on_policy_fraction={on_policy_fraction!r} and teacher_generated_fraction="
                f"{teacher_generated_fraction!r} add up to more than 1 (they are shares of the "
                "same steps)"
            )
        for name, fraction in (
            ("on_policy_fraction", on_policy_fraction),
            ("teacher_generated_fraction", teacher_generated_fraction),
        ):
            if fraction > 0 and max_new_tokens is None:
                raise ConfigError(
                    f"{name}={fraction!r} needs max_new_tokens= (the longest completion generated)"
                )
        teacher_cache = getattr(model.teacher_model, "cache", None)
        if (
            isinstance(teacher_cache, TeacherCache)
            and on_policy_fraction + teacher_generated_fraction
        ):
            raise ConfigError(
                f"on_policy_fraction={on_policy_fraction!r}, teacher_generated_fraction="
                f"{teacher_generated_fraction!r}: the teacher is a teacher cache "
                f"({teacher_cache.folder}), which holds only the cached examples and cannot "
                "score generated completions; give the teacher itself, or set both to 0"
            )
        self.max_new_tokens = (
            None if max_new_tokens is None else check_positive_int("max_new_tokens", max_new_tokens)
        )
        self.generation_temperature = check_temperature(
            generation_temperature, "generation_temperature"
        )
        self.top_p = check_unit_interval("top_p", top_p)
        if self.top_p == 0:
            raise ConfigError("top_p must be in (0, 1], got 0 (no token would be kept)")
        self._eval_totals: torch.Tensor | None = None
        super().__init__(model=model, args=args, **kwargs)
        self._warn_unused_generation_settings(self.distillation_model())
        # The loss is normalised by the step's token count here (see the module docstring),
        # so the Trainer counts the tokens and does not divide by the accumulation steps again.
        self.model_accepts_loss_kwargs = True

    def _warn_unused_generation_settings(self, meta: DistillationModel) -> None:
        """Warn of settings that do nothing or train on something else than meant."""
        criteria = kd.registries().criteria
        sampled = any(
            criteria.name_of(type(loss)) == "sampled_reverse_kl" for loss in meta.loss_modules
        )
        if (
            sampled
            and self.on_policy_fraction > 0
            and (self.generation_temperature != 1 or self.top_p != 1)
        ):
            warnings.warn(
                f"KDTrainer: the sampled_reverse_kl criterion with generation_temperature="
                f"{self.generation_temperature!r} and top_p={self.top_p!r} estimates the reverse "
                "KL from a tempered or truncated student's samples, not the student's own "
                "distribution (its estimators assume temperature 1 and top_p 1): a biased "
                "estimate; sample at 1 and 1, or use reverse_kl on the generated batch",
                UserWarning,
                stacklevel=3,
            )
        if self.on_policy_fraction == 0 and sampled:
            warnings.warn(
                "KDTrainer: the sampled_reverse_kl criterion with on_policy_fraction=0 estimates "
                "the reverse KL from tokens the student did not sample (the dataset's or the "
                "teacher's), a biased estimate of another objective: set on_policy_fraction > 0, "
                "or use reverse_kl",
                UserWarning,
                stacklevel=3,
            )
        if self.on_policy_fraction == 0 and self.teacher_generated_fraction == 0:
            unused = {
                "max_new_tokens": self.max_new_tokens is not None,
                "generation_temperature": self.generation_temperature != 1,
                "top_p": self.top_p != 1,
            }
            if any(unused.values()):
                names = ", ".join(name for name, given in unused.items() if given)
                warnings.warn(
                    f"KDTrainer: {names} ignored: nothing is generated with on_policy_fraction=0 "
                    "and teacher_generated_fraction=0",
                    UserWarning,
                    stacklevel=3,
                )

    # ----------------------------------------------------------------- the loss
    def distillation_model(self) -> DistillationModel:
        """The meta-model being trained (unwrapped from DDP and friends)."""
        model = self.accelerator.unwrap_model(self.model)
        if not is_distillation_model(model):
            raise DistillationStateError(
                f"the trainer's model is a plain {type(model).__name__}: export_student() gave the "
                "student back, so there is nothing left to distil"
            )
        return model

    def get_batch_samples(
        self, epoch_iterator: Iterator[Any], num_batches: int, device: torch.device
    ) -> tuple[list[Any], torch.Tensor | int | None]:
        """The step's micro-batches and its token count, counted after the causal shift."""
        batch_samples, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        generating = self._generating_side()
        if generating is not None:
            batch_samples = [
                self._generated_batch(batch, index, by_student=generating == "student")
                for index, batch in enumerate(batch_samples)
            ]
        labels = [batch[LABELS] for batch in batch_samples if LABELS in batch]
        if not labels:
            return batch_samples, None
        count = llm.num_items_in_batch(labels, shift=self.causal_shift, all_reduce=False)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            total = self.accelerator.gather(torch.tensor([count], device=device)).sum()
            count = int(total.item())
        return batch_samples, count

    def _generating_side(self) -> str | None:
        """Who completes this step's prompts: ``"student"``, ``"teacher"`` or None (nobody, the
        dataset's text is trained on). The draw is the same on every rank, and again when the run
        resumes."""
        if self.on_policy_fraction == 0 and self.teacher_generated_fraction == 0:
            return None
        draw = torch.Generator().manual_seed(_seed_of(self.args.seed, self.state.global_step))
        value = torch.rand((), generator=draw)
        if value < self.on_policy_fraction:
            return "student"
        if value < self.on_policy_fraction + self.teacher_generated_fraction:
            return "teacher"
        return None

    def _generated_batch(
        self, batch: Mapping[str, Any], index: int, *, by_student: bool
    ) -> dict[str, torch.Tensor]:
        """The student's (or the teacher's) completions of the micro-batch's prompts (its
        leading -100 labels), sampled with the same seed either way."""
        labels, ids = batch[LABELS], batch["input_ids"]
        mask = batch.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        prompt_lengths = (labels == llm.IGNORE_INDEX).int().cumprod(-1).sum(-1)
        if bool((prompt_lengths == 0).any()):
            row = int((prompt_lengths == 0).nonzero()[0])
            raise DistillationStateError(
                f"KDTrainer: {'on-policy' if by_student else 'teacher-generated'} step "
                f"{self.state.global_step}: row {row} of micro-batch "
                f"{index} has no prompt (its first label is not -100), so there is nothing to "
                "complete; label the prompt -100"
            )
        width = int(prompt_lengths.max())
        in_prompt = torch.arange(width, device=ids.device) < prompt_lengths[:, None]
        meta = self.distillation_model()
        generator = torch.Generator(ids.device).manual_seed(
            _seed_of(self.args.seed, self.state.global_step, self.args.process_index, index)
        )
        # Through the meta-model's forward, whose hooks gather the parameters under FSDP2;
        # generate_completions samples from its student unless told the teacher
        with meta.only_teacher_forward(not by_student):
            generated = llm.generate_completions(
                meta,
                ids[:, :width],
                mask[:, :width] * in_prompt,
                max_new_tokens=self.max_new_tokens,  # type: ignore[arg-type]
                temperature=self.generation_temperature,
                top_p=self.top_p,
                eos_token_id=_eos_token_ids(meta if by_student else meta.teacher_model),
                generator=generator,
                sync_ranks=self.args.world_size > 1,
            )
        vocabulary = getattr(getattr(meta, "config", None), "vocab_size", None)
        if not by_student and vocabulary is not None:
            largest = int(generated["input_ids"].max())
            if largest >= vocabulary:
                raise DistillationStateError(
                    f"KDTrainer: teacher-generated step {self.state.global_step}: the teacher "
                    f"sampled token {largest}, outside the student's vocabulary of {vocabulary} "
                    "(teacher_generated_fraction needs the teacher and the student to share a "
                    "tokenizer)"
                )
        return generated

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """The micro-batch's loss (see the module docstring).

        With a ``fused_logits`` criterion the student's cross-entropy comes from the fused
        loss's pass over the chunks (``student_cross_entropy``), not from the logits; when that
        loss names the lm heads, both models run with ``logits_to_keep=1``, so neither computes
        ``[tokens, vocabulary]`` logits (the outputs hold the last position's only).
        """
        if not model.training and not is_distillation_model(self.accelerator.unwrap_model(model)):
            # export_student() gave the student back: evaluate it as transformers.Trainer does
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        meta = self.distillation_model()
        inputs = dict(inputs)
        labels = inputs.pop(LABELS, None)
        if labels is None:
            raise DistillationStateError(
                f"KDTrainer: the batch has no {LABELS!r} (it has "
                f"{', '.join(inputs) or 'nothing'}); use a collator that adds them, e.g. "
                "DataCollatorForLanguageModeling(tokenizer, mlm=False)"
            )
        repeated = 0 if model.training else self._repeated_rows(labels)
        if 0 < repeated < len(labels):  # left out of the losses, as gather_for_metrics drops them
            labels = labels.clone()
            labels[len(labels) - repeated :] = llm.IGNORE_INDEX
        fused = _fused_pair(meta)
        if fused is not None and _skips_heads(meta, fused):
            inputs["logits_to_keep"] = 1  # the fused loss needs no logits: skip the lm heads
        outputs = model(**inputs)  # the teacher, then the student; captures the paired layers
        kd_labels = llm.shift_labels(labels) if self.causal_shift else labels
        tokens = llm.count_tokens(kd_labels)
        if fused is not None:  # the cross-entropy from the divergence's pass over the chunks
            state = meta.kd_state
            student_loss = fused.loss.student_cross_entropy(
                state.student_outputs[fused.student_layer],
                state.teacher_outputs[fused.teacher_layer],
                labels=kd_labels,
            )
        else:
            student_loss = _cross_entropy_sum(outputs, kd_labels) / max(tokens, 1)
        loss_kwargs: dict[str, Any] = {LABELS: kd_labels} if meta.accepts_loss_kwarg(LABELS) else {}
        with_student = meta.loss_balancer is not None
        loss = meta.compute_kd_loss(
            student_loss=student_loss if with_student else None, **loss_kwargs
        )
        assert isinstance(loss, torch.Tensor)  # not a dict: skip_balancer is False
        if model.training and num_items_in_batch is not None:
            step_tokens = (
                num_items_in_batch.item()
                if isinstance(num_items_in_batch, torch.Tensor)
                else num_items_in_batch
            )
            loss = loss * (tokens / max(step_tokens, 1))
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                loss = loss * self.args.world_size  # DDP averages gradients over the ranks
        elif not model.training and self._eval_totals is not None and repeated < len(labels):
            totals = self._eval_totals
            totals[0] += loss.detach().to(totals) * tokens
            totals[1] += student_loss.detach().to(totals) * tokens
            totals[2] += tokens
        return (loss, outputs) if return_outputs else loss

    def _repeated_rows(self, labels: torch.Tensor) -> int:
        """How many of this rank's last rows repeat examples that accelerate added to even out
        the evaluation's last batch over the ranks (``gather_for_metrics`` drops them)."""
        accelerator, state = self.accelerator, self.accelerator.gradient_state
        if accelerator.num_processes == 1 or not accelerator.even_batches:
            return 0
        if not state.end_of_dataloader or state.remainder <= 0:
            return 0
        rank = accelerator.process_index
        owners = accelerator.gather_for_metrics(
            torch.full((len(labels),), rank, device=labels.device)
        )
        return len(labels) - int((owners == rank).sum())

    def evaluation_loop(
        self,
        dataloader: Any,
        description: str,
        prediction_loss_only: bool | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> EvalLoopOutput:
        """The Trainer's loop, with ``<prefix>_loss`` and ``<prefix>_student_loss`` as means
        over the evaluation tokens (the Trainer would average per-batch means)."""
        device = self.args.device
        dtype = torch.float32 if device.type == "mps" else torch.float64  # mps has no float64
        self._eval_totals = torch.zeros(3, dtype=dtype, device=device)
        try:
            output = super().evaluation_loop(
                dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
            )
            totals = self.accelerator.reduce(self._eval_totals, reduction="sum")
        finally:
            self._eval_totals = None
        kd_sum, student_sum, tokens = totals.tolist()
        if tokens > 0 and output.metrics is not None:
            output.metrics[f"{metric_key_prefix}_loss"] = kd_sum / tokens
            output.metrics[f"{metric_key_prefix}_student_loss"] = student_sum / tokens
        return output

    # ----------------------------------------------------------------- saving
    def _save(
        self, output_dir: str | None = None, state_dict: dict[str, Any] | None = None
    ) -> None:
        # Every save (checkpoints, save_model) writes the student's weights alone, so that
        # from_pretrained loads any checkpoint folder; the distillation state goes to its own file.
        model = self.accelerator.unwrap_model(self.model)
        if is_distillation_model(model):
            if state_dict is None:
                kd_state, state_dict = model.kd_state_dict(), model.student_state_dict()
            else:  # gathered by the Trainer (DeepSpeed, FSDP): keyed as the model's state_dict
                kd_keys, student_keys = model.kd_state_dict().keys(), model.student_state_dict()
                kd_state = {k: v for k, v in state_dict.items() if k in kd_keys}
                state_dict = {k: v for k, v in state_dict.items() if k in student_keys}
            folder = output_dir if output_dir is not None else self.args.output_dir
            cache = _teacher_cache_record(model)
            if (kd_state or cache) and self.args.should_save and folder is not None:
                os.makedirs(folder, exist_ok=True)
                tensors = {k: v.detach().contiguous().cpu() for k, v in kd_state.items()}
                manifest = (
                    KD_STATE_MANIFEST
                    if cache is None
                    else json.dumps({**json.loads(KD_STATE_MANIFEST), "teacher_cache": cache})
                )
                _kd_state_backend().write(Path(folder, KD_STATE_FILE), tensors, manifest)
        super()._save(output_dir, state_dict=state_dict)

    def _load_from_checkpoint(
        self, resume_from_checkpoint: str, model: nn.Module | None = None
    ) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model=model)
        path = os.path.join(resume_from_checkpoint, KD_STATE_FILE)
        meta = self.accelerator.unwrap_model(model if model is not None else self.model)
        if not is_distillation_model(meta) or not os.path.isfile(path):
            return
        reader = _kd_state_backend().open(Path(path))
        try:
            _check_teacher_cache(json.loads(reader.manifest).get("teacher_cache"), meta, path)
            meta.load_kd_state_dict({name: reader.load(name) for name in reader.tensors})
        except DistillationStateError as exc:
            raise kd.CheckpointMismatchError(path, f"does not fit this kd_config: {exc}") from None
        finally:
            reader.close()

    def export_student(self, output_dir: str | None = None) -> nn.Module:
        """Give the student back (``kd.export``: teacher, losses and hooks gone) and, with
        ``output_dir``, save it with ``save_pretrained`` (and the processing class, if any).

        The trainer then holds the plain student: evaluate it (its own loss, as
        ``transformers.Trainer`` reports it) or save it, but distil no more.
        """
        student: nn.Module = kd.export(self.distillation_model())
        self.model = self.model_wrapped = student
        if output_dir is not None:
            self.save_model(output_dir)
        return student


def _seed_of(*numbers: int) -> int:
    """One seed from several integers (the hash of a tuple of ints is the same in every run)."""
    return hash(numbers) & (2**63 - 1)


def _eos_token_ids(model: nn.Module) -> list[int]:
    """The model's end-of-sequence ids: its generation config's, else its config's."""
    for config in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        eos = getattr(config, "eos_token_id", None)
        if eos is not None:
            return [eos] if isinstance(eos, int) else list(eos)
    return []


def _teacher_cache_record(meta: DistillationModel) -> dict[str, Any] | None:
    """What a checkpoint records of a cached teacher: the cache and what it was written from."""
    cache = getattr(meta.teacher_model, "cache", None)
    if not isinstance(cache, TeacherCache):
        return None
    return {"path": str(cache.folder), **cache.written_from}


def _check_teacher_cache(recorded: Any, meta: DistillationModel, path: str) -> None:
    """A run trained from a cache resumes from a cache of the same teacher (it may have moved)."""
    found = _teacher_cache_record(meta)
    if not isinstance(recorded, dict) or found is None:
        return
    for key, value in found.items():
        if key != "path" and recorded.get(key) != value:
            raise kd.CheckpointMismatchError(
                path,
                f"was trained from the teacher cache {recorded.get('path')} ({key} "
                f"{recorded.get(key)!r}), but this run's teacher is the cache {found['path']} "
                f"({key} {value!r}): resume with a cache of the same teacher and data",
            )


def _kd_state_backend() -> Any:
    """kdcore's checkpoint backend for the distillation state (a ``CheckpointBackend``)."""
    return kd.registries().checkpoint_backends.get(KD_STATE_BACKEND)


def _fused_pair(meta: DistillationModel) -> Any:
    """The first pair whose loss gives the student's cross-entropy from its own pass over the
    lm head (``fused_logits``: ``student_cross_entropy``) as a per-token mean, or None."""
    for pair in meta.kd_state.pairs:
        loss = pair.loss
        if callable(getattr(loss, "student_cross_entropy", None)) and (
            getattr(loss, "reduction", None) == "batchmean"
        ):
            return pair
    return None


def _skips_heads(meta: DistillationModel, fused: Any) -> bool:
    """Whether the models may skip their lm heads: the fused loss names them (so it captures
    the final hidden states, not the heads' inputs), no loss captures a head or a whole model's
    output (the logits), and both forwards take ``logits_to_keep``."""
    if not getattr(fused.loss, "names_heads", False):
        return False
    student_logits = ("", fused.loss.student_head)
    teacher_logits = ("", fused.loss.teacher_head)
    for pair in meta.kd_state.pairs:
        if (
            pair.student_layer.partition(":")[0] in student_logits
            or pair.teacher_layer.partition(":")[0] in teacher_logits
        ):
            return False
    forwards = (meta.kd_state.original_class.forward, type(meta.teacher_model).forward)
    return all("logits_to_keep" in inspect.signature(f).parameters for f in forwards)


def _cross_entropy_sum(outputs: Any, labels: torch.Tensor) -> torch.Tensor:
    """The student's cross-entropy summed over the rows whose label is not -100."""
    logits = outputs.logits if hasattr(outputs, "logits") else outputs[0]
    return F.cross_entropy(
        logits.flatten(0, -2).float(),
        labels.flatten().to(logits.device),
        ignore_index=llm.IGNORE_INDEX,
        reduction="sum",
    )
