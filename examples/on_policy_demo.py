"""On-policy against off-policy distillation of a tiny causal LM, on text generated here.

The text: English-like sentences from a small grammar with number agreement, also across an
object relative clause ("the old dogs that a cat sees sleep ."), drawn with a fixed seed by the
code below, so nothing is downloaded and the text's licence is this repository's. Words are the
tokens. A teacher Llama (built from a config) learns the text from scratch. Smaller students
start, as in GKD, from a student trained on the text (a short off-policy warm-up, one per seed)
and are then distilled with ``kdcore_transformers.KDTrainer`` for the same number of steps on
the same prompts: off-policy (``on_policy_fraction=0``: the dataset's continuations) and
on-policy (the student's own samples). Each student then completes held-out prompts at
temperature 1, and the script reports, over the completion tokens:

- the reverse KL ``KL(student || teacher)`` per token, exact over the vocabulary, at each
  position of the student's own samples;
- the teacher's mean log-likelihood per token of those samples (the teacher's figure on its own
  samples is printed as the reference: an estimate of minus its entropy per token);
- the share of samples that are grammatical sentences (the grammar is known here).

Run: ``python examples/on_policy_demo.py`` (a few minutes on 2 CPU cores) or ``--quick`` (a few
seconds, tiny settings: a smoke test, not a result).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import random
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import transformers
from kdcore_transformers import KDTrainer

from kdcore import llm

# ============================================================================ the text
NOUNS = {"cat": "cats", "dog": "dogs", "bird": "birds", "child": "children", "farmer": "farmers"}
INTRANSITIVE = {"sleeps": "sleep", "runs": "run", "sings": "sing", "waits": "wait"}
TRANSITIVE = {"sees": "see", "chases": "chase", "likes": "like", "feeds": "feed"}
ADJECTIVES = ("small", "old", "happy", "red")
DETERMINERS = {False: ("the", "a", "every"), True: ("the", "some", "two")}  # by plural


def _word(forms: dict[str, str], plural: bool, rng: random.Random) -> str:
    """A random word of ``forms`` (singular -> plural, for nouns and verbs alike)."""
    singular = rng.choice(sorted(forms))
    return forms[singular] if plural else singular


def _noun_phrase(rng: random.Random, plural: bool, relative: bool) -> list[str]:
    words = [rng.choice(DETERMINERS[plural])]
    if rng.random() < 0.4:
        words.append(rng.choice(ADJECTIVES))
    words.append(_word(NOUNS, plural, rng))
    if relative:  # "the cat that the dogs chase": the clause's verb agrees with its own subject
        other = rng.random() < 0.5
        words += ["that", *_noun_phrase(rng, other, False), _word(TRANSITIVE, other, rng)]
    return words


def sentence(rng: random.Random) -> list[str]:
    """One sentence: a noun phrase (with a relative clause a third of the time), then a verb
    that agrees with its head noun, intransitive or with an object."""
    plural = rng.random() < 0.5
    words = _noun_phrase(rng, plural, relative=rng.random() < 0.35)
    if rng.random() < 0.5:
        words.append(_word(INTRANSITIVE, plural, rng))
    else:
        words += [_word(TRANSITIVE, plural, rng), *_noun_phrase(rng, rng.random() < 0.5, False)]
    return [*words, "."]


def _noun_phrases(words: Sequence[str], i: int, relative: bool) -> Iterator[tuple[int, bool]]:
    """(end, plural) of each noun phrase starting at ``words[i]``."""
    for plural in (False, True):
        j = i
        if j >= len(words) or words[j] not in DETERMINERS[plural]:
            continue
        j += 1
        if j < len(words) and words[j] in ADJECTIVES:
            j += 1
        nouns = NOUNS.values() if plural else NOUNS.keys()
        if j >= len(words) or words[j] not in nouns:
            continue
        yield j + 1, plural
        if relative and j + 1 < len(words) and words[j + 1] == "that":
            for k, other in _noun_phrases(words, j + 2, False):
                if k < len(words) and words[k] in _verbs(TRANSITIVE, other):
                    yield k + 1, plural


def _verbs(forms: dict[str, str], plural: bool) -> Any:
    return forms.values() if plural else forms.keys()


def is_sentence(words: Sequence[str]) -> bool:
    """Whether ``words`` is a sentence of the grammar (agreement included), ending with '.'."""
    for j, plural in _noun_phrases(words, 0, True):
        ends = [j + 1] if j < len(words) and words[j] in _verbs(INTRANSITIVE, plural) else []
        if j < len(words) and words[j] in _verbs(TRANSITIVE, plural):
            ends += [k for k, _ in _noun_phrases(words, j + 1, False)]
        if any(end == len(words) - 1 and words[end] == "." for end in ends):
            return True
    return False


SPECIALS = ("<pad>", "<bos>", "<eos>")
WORDS = sorted(
    {*NOUNS, *NOUNS.values(), *INTRANSITIVE, *INTRANSITIVE.values(), *TRANSITIVE}
    | {*TRANSITIVE.values(), *ADJECTIVES, *DETERMINERS[False], *DETERMINERS[True], "that", "."}
)
VOCAB = [*SPECIALS, *WORDS]
PAD, BOS, EOS = 0, 1, 2
INDEX = {word: i for i, word in enumerate(VOCAB)}
LONGEST = 15  # <bos>, 13 words at most, <eos>


def encode(words: Sequence[str]) -> list[int]:
    return [BOS, *(INDEX[w] for w in words), EOS]


def decode(ids: Sequence[int]) -> list[str]:
    """The words of a sample, without <bos>; cut at <eos> (kept as the string '<eos>')."""
    words: list[str] = []
    for i in ids:
        if i == EOS:
            return [*words, "<eos>"]
        if i != BOS:
            words.append(VOCAB[i])
    return words


# ============================================================================ the models
def llama(hidden: int, layers: int, seed: int) -> Any:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )
    return transformers.LlamaForCausalLM(config)


def padded(
    rows: Sequence[Sequence[int]], width: int = LONGEST
) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids``, ``attention_mask``: rows right-padded to ``width``."""
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, : len(row)] = torch.tensor(row)
        mask[r, : len(row)] = 1
    return ids, mask


def train_teacher(sentences: Sequence[list[str]], settings: Settings) -> Any:
    """The teacher: next-word prediction on the text (a plain loop, Adam)."""
    teacher = llama(settings.teacher_hidden, settings.teacher_layers, seed=0)
    ids, mask = padded([encode(s) for s in sentences])
    labels = ids.masked_fill(mask == 0, llm.IGNORE_INDEX)
    optimizer = torch.optim.Adam(teacher.parameters(), lr=3e-3)
    order = torch.Generator().manual_seed(0)
    for _ in range(settings.teacher_steps):
        rows = torch.randint(len(ids), (settings.batch,), generator=order)
        loss = teacher(input_ids=ids[rows], attention_mask=mask[rows], labels=labels[rows]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return teacher.eval().requires_grad_(False)


def prompt_length(rng: random.Random) -> int:
    """Tokens of a prompt: <bos> and the sentence's first 1 to 3 words."""
    return 1 + rng.randint(1, 3)


def distillation_examples(sentences: Sequence[list[str]], seed: int) -> list[dict[str, Any]]:
    """The students' dataset: each sentence with its prompt labelled -100 (what on-policy steps
    complete) and its continuation labelled (what off-policy steps learn from)."""
    rng = random.Random(seed)
    ids, mask = padded([encode(s) for s in sentences])
    labels = ids.masked_fill(mask == 0, llm.IGNORE_INDEX)
    examples = []
    for row in range(len(ids)):
        row_labels = labels[row].clone()
        row_labels[: prompt_length(rng)] = llm.IGNORE_INDEX
        examples.append({"input_ids": ids[row], "attention_mask": mask[row], "labels": row_labels})
    return examples


TEACHER, START = "teacher (its own samples)", "start (warm-up only)"
WARM_UP = {"name": "forward_kl"}
#: The students: (name, criterion, on_policy_fraction). The same steps, prompts and seeds.
STUDENTS = (
    ("off-policy forward_kl", {"name": "forward_kl"}, 0.0),
    ("off-policy reverse_kl", {"name": "reverse_kl"}, 0.0),
    ("on-policy reverse_kl", {"name": "reverse_kl"}, 1.0),
    ("on-policy sampled_reverse_kl k3", {"name": "sampled_reverse_kl"}, 1.0),
    ("half on-policy jsd 0.5", {"name": "jsd", "beta": 0.5}, 0.5),
)


def distil(
    student: Any,
    teacher: Any,
    examples: list[dict[str, Any]],
    criterion: dict[str, Any],
    on_policy_fraction: float,
    *,
    steps: int,
    batch: int,
    seed: int,
) -> Any:
    """``student`` distilled by ``KDTrainer`` (Adam at a constant learning rate); returned plain."""
    with tempfile.TemporaryDirectory() as folder:
        args = transformers.TrainingArguments(
            folder,
            max_steps=steps,
            per_device_train_batch_size=batch,
            learning_rate=3e-3,
            lr_scheduler_type="constant",
            weight_decay=0.0,
            seed=seed,
            save_strategy="no",
            logging_strategy="no",
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
            dataloader_pin_memory=False,
        )
        trainer = KDTrainer(
            model=student,
            args=args,
            kd_config={"teacher_model": teacher, "criterion": criterion},
            train_dataset=examples,
            on_policy_fraction=on_policy_fraction,
            max_new_tokens=LONGEST - 2 if on_policy_fraction else None,
            generation_temperature=1.0,
            top_p=1.0,
        )
        trainer.remove_callback(transformers.PrinterCallback)  # the end-of-training metrics
        trainer.train()
        return trainer.export_student().eval()


# ============================================================================ the metrics
@dataclasses.dataclass
class Samples:
    """Completions of the held-out prompts by one model, and their figures."""

    model: Any  # the model that sampled them
    batch: dict[str, torch.Tensor]  # generate_completions' input_ids, attention_mask, labels
    reverse_kl: float  # KL(sampler || teacher) per completion token, exact over the vocabulary
    teacher_log_likelihood: float  # the teacher's mean log-probability per completion token
    grammatical: float  # the share of samples that are sentences of the grammar


def held_out_prompts(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts from sentences drawn with another seed than the training text."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        ids = encode(sentence(rng))
        rows.append(ids[: prompt_length(rng)])
    return padded(rows, width=4)


def sample_and_score(
    model: Any, teacher: Any, prompts: tuple[torch.Tensor, torch.Tensor], seed: int
) -> Samples:
    """``model``'s completions of ``prompts`` at temperature 1, scored against the teacher."""
    batch = llm.generate_completions(
        model,
        *prompts,
        max_new_tokens=LONGEST - 2,
        eos_token_id=EOS,
        generator=torch.Generator().manual_seed(seed),
    )
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        log_p = torch.log_softmax(model(**inputs).logits.double(), -1)
        log_q = torch.log_softmax(teacher(**inputs).logits.double(), -1)
    targets = llm.shift_labels(batch["labels"])  # row i predicts token i + 1
    counted = targets != llm.IGNORE_INDEX
    reverse_kl = (log_p.exp() * (log_p - log_q)).sum(-1)[counted].mean()
    sampled = log_q.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)[counted].mean()
    texts = [decode(row.tolist()) for row in batch["input_ids"]]
    grammatical = sum(t[-1:] == ["<eos>"] and is_sentence(t[:-1]) for t in texts) / len(texts)
    return Samples(model, batch, float(reverse_kl), float(sampled), grammatical)


# ============================================================================ the run
@dataclasses.dataclass(frozen=True)
class Settings:
    sentences: int = 4000
    teacher_hidden: int = 96
    teacher_layers: int = 2
    teacher_steps: int = 600
    student_hidden: int = 16
    student_layers: int = 1
    warm_up_steps: int = 200
    student_steps: int = 200
    batch: int = 32
    prompts: int = 512
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)


QUICK = Settings(
    sentences=64,
    teacher_hidden=16,
    teacher_steps=3,
    student_hidden=16,
    warm_up_steps=1,
    student_steps=2,
    batch=4,
    prompts=8,
    seeds=(0,),
)


@dataclasses.dataclass
class Result:
    teacher: Any
    teacher_samples: Samples
    #: per student name, the figures of each seed's student (in ``Settings.seeds`` order)
    students: dict[str, list[Samples]]
    seconds: dict[str, float]


def run(settings: Settings) -> Result:
    rng = random.Random(0)
    text = [sentence(rng) for _ in range(settings.sentences)]
    start = time.perf_counter()
    teacher = train_teacher(text, settings)
    seconds = {TEACHER: time.perf_counter() - start}
    prompts = held_out_prompts(settings.prompts, seed=1)
    result = Result(teacher, sample_and_score(teacher, teacher, prompts, seed=0), {}, seconds)
    # Every student starts where GKD's do, from a student trained on the text (here distilled
    # off-policy with the forward KL for warm_up_steps), the same start for each seed.
    starts = {}
    for seed in settings.seeds:
        student = llama(settings.student_hidden, settings.student_layers, seed=100 + seed)
        if settings.warm_up_steps:
            examples = distillation_examples(text, seed + 1000)
            student = distil(
                student,
                teacher,
                examples,
                WARM_UP,
                0.0,
                steps=settings.warm_up_steps,
                batch=settings.batch,
                seed=seed + 1000,
            )
        starts[seed] = student
    result.students[START] = [sample_and_score(s, teacher, prompts, n) for n, s in starts.items()]
    for name, criterion, fraction in STUDENTS:
        start = time.perf_counter()
        result.students[name] = []
        for seed in settings.seeds:
            student = distil(
                copy.deepcopy(starts[seed]),
                teacher,
                distillation_examples(text, seed),
                criterion,
                fraction,
                steps=settings.student_steps,
                batch=settings.batch,
                seed=seed,
            )
            result.students[name].append(sample_and_score(student, teacher, prompts, seed))
        seconds[name] = (time.perf_counter() - start) / len(settings.seeds)
    return result


def report(result: Result, settings: Settings) -> str:
    def row(name: str, figures: list[Samples], seconds: float | None) -> str:
        cells = [
            statistics.median(getattr(s, field) for s in figures)
            for field in ("reverse_kl", "teacher_log_likelihood", "grammatical")
        ]
        time_cell = "" if seconds is None else f"{seconds:.1f} s"
        return f"| {name} | {cells[0]:.3f} | {cells[1]:.3f} | {100 * cells[2]:.0f}% | {time_cell} |"

    lines = [
        f"{len(settings.seeds)} seed(s), medians; {settings.student_steps} steps of "
        f"{settings.batch} sequences per student; {settings.prompts} held-out prompts",
        "",
        "| model | reverse KL to the teacher / token | teacher log-likelihood / token "
        "| grammatical | time per seed |",
        "|---|---:|---:|---:|---:|",
        row(TEACHER, [result.teacher_samples], result.seconds[TEACHER]),
        *(row(n, f, result.seconds.get(n)) for n, f in result.students.items()),
    ]
    if len(settings.seeds) > 1:
        lines += [
            "",
            "Per seed (reverse KL / teacher log-likelihood):",
            "",
            "| student | " + " | ".join(f"seed {seed}" for seed in settings.seeds) + " |",
            "|---|" + "---|" * len(settings.seeds),
        ]
        for name, figures in result.students.items():
            values = " | ".join(
                f"{s.reverse_kl:.3f} / {s.teacher_log_likelihood:.3f}" for s in figures
            )
            lines.append(f"| {name} | {values} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> Result:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings: a smoke test")
    parser.add_argument("--seeds", type=int, nargs="+", help="student seeds (default 0 1 2)")
    parser.add_argument("--steps", type=int, help="distillation steps per student (default 150)")
    options = parser.parse_args(argv)
    settings = QUICK if options.quick else Settings()
    if options.seeds:
        settings = dataclasses.replace(settings, seeds=tuple(options.seeds))
    if options.steps:
        settings = dataclasses.replace(settings, student_steps=options.steps)
    torch.set_num_threads(1)  # models this small gain nothing from threads; steadier timings
    transformers.logging.set_verbosity_error()
    result = run(settings)
    print(report(result, settings))
    return result


if __name__ == "__main__":
    main()
