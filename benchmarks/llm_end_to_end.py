"""Peak activation memory and time of one LLM distillation step: fused end to end vs plain.

One step is what ``KDTrainer`` does for a micro-batch: the teacher's and the student's forward,
the KD loss and the student's cross-entropy combined by a static balancer (0.5 each), and the
backward. Models are tiny Llamas built from configs (nothing is downloaded; two layers, the
student narrower than the teacher) with a large vocabulary, so that the lm heads dominate:

* plain: both models run their lm heads on every position (``[tokens, vocab]`` logits each),
  ``forward_kl`` on the logits, ``F.cross_entropy`` on the student's;
* fused: the criterion pairs ``model.norm`` and names the heads (``fused_logits`` with
  ``student_head``/``teacher_head``), the models run with ``logits_to_keep=1`` (they skip their
  heads), and ``student_cross_entropy`` gives the student's loss from the divergence's pass.

Every measurement runs in a fresh subprocess with ``MALLOC_MMAP_THRESHOLD_`` set (freed large
blocks go back to the kernel at once, so the resident set follows the live tensors). After one
warm-up step, the parameters' gradients are set to None (as ``Trainer``'s ``zero_grad`` does) and
the measured step runs from the models and the batch alone. Two figures: the *raw peak* (``VmHWM``
after resetting it, minus the resident set before the step) and the *activations*: the raw peak
minus the parameters' gradients that exist at the peak (model state, parameter-sized in every
path, the head's ``[vocab, hidden]`` among them; see ``_GradientsAtPeak``). Then
the median time of ``--repeats`` steps. Variants alternate over ``--rounds`` (medians over
rounds). The losses of the two variants are printed side by side (float32; they agree to
rounding).

    python benchmarks/llm_end_to_end.py [--vocabs 32000,128000,256000] [--tokens 2x512]
                                        [--repeats 2] [--rounds 1] [--hidden 128]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from typing import Any

KD_WEIGHT = 0.5


def _rss_bytes() -> int:
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as file:
        for line in file:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as file:
        file.write("5")


def child(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F
    import transformers

    import kdcore as kd
    from kdcore import llm

    def llama(hidden: int, seed: int) -> Any:
        torch.manual_seed(seed)
        config = transformers.LlamaConfig(
            vocab_size=spec["vocab"],
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=spec["length"],
        )
        return transformers.LlamaForCausalLM(config)

    fused = spec["variant"] == "fused"
    hidden = spec["hidden"]
    criterion = (
        {("model.norm", "model.norm"): {"name": "fused_logits", "temperature": 2.0,
                                        "student_head": "lm_head", "teacher_head": "lm_head"}}
        if fused
        else {("", ""): {"name": "forward_kl", "temperature": 2.0}}
    )  # fmt: skip
    warnings.simplefilter("ignore", kd.NotRecordableWarning)  # a teacher instance: not saved here
    model = kd.convert(llama(hidden, 0), [("kd_loss", {
        "teacher_model": llama(hidden + hidden // 2, 1),
        "criterion": criterion,
        "loss_balancer": {"name": "static", "kd_loss_weight": KD_WEIGHT},
    })])  # fmt: skip
    (loss_module,) = model.loss_modules
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(0, spec["vocab"], (spec["batch"], spec["length"]), generator=generator)
    labels = llm.shift_labels(ids)

    def step(gradients: _GradientsAtPeak | None = None) -> float:
        if fused:
            model(input_ids=ids, logits_to_keep=1)
            state = model.kd_state
            student_loss = loss_module.student_cross_entropy(
                state.student_outputs["model.norm"], state.teacher_outputs["model.norm"], labels
            )
        else:
            logits = model(input_ids=ids).logits
            student_loss = F.cross_entropy(
                logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100
            )
        loss = model.compute_kd_loss(student_loss=student_loss, labels=labels)
        if gradients is not None:
            gradients.mark()  # the forward's peak, no gradient yet
        loss.backward()
        if gradients is not None:
            gradients.mark()
        return float(loss.detach())

    step()  # warm-up
    model.zero_grad(set_to_none=True)
    gradients = _GradientsAtPeak(model.parameters())
    _reset_peak()
    baseline = _rss_bytes()
    loss = step(gradients)
    gradients.remove()
    peak = _peak_rss_bytes() - baseline
    times = []
    for _ in range(spec["repeats"]):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {
        "peak": peak,
        "activations": peak - gradients.at_peak,
        "loss": loss,
        "time": statistics.median(times) if times else None,
    }


class _GradientsAtPeak:
    """The bytes of the parameters' gradients that exist when the resident set peaks.

    ``VmHWM`` is read after the forward, after each parameter's gradient is accumulated, and
    after backward; the peak lies in the last stretch where it rose, when at most the gradients
    accumulated by that stretch's end exist (the one accumulated at its end was made in it)."""

    def __init__(self, parameters: Any) -> None:
        self.existing = self.at_peak = self.high = 0
        self.handles = [
            p.register_post_accumulate_grad_hook(self._accumulated)
            for p in parameters
            if p.requires_grad
        ]

    def _accumulated(self, parameter: Any) -> None:
        self.existing += parameter.grad.nbytes
        self.mark()

    def mark(self) -> None:
        high = _peak_rss_bytes()
        if high > self.high:
            self.high, self.at_peak = high, self.existing

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    if done.returncode != 0:
        raise RuntimeError(f"child {spec} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocabs", default="128000", help="comma-separated vocabulary sizes")
    parser.add_argument("--tokens", default="2x512", help="batch x sequence length")
    parser.add_argument("--repeats", type=int, default=2, help="timed steps after the measured one")
    parser.add_argument(
        "--hidden", type=int, default=128, help="student hidden size (teacher 1.5x)"
    )
    parser.add_argument("--rounds", type=int, default=1, help="alternating runs of each variant")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    batch, length = (int(x) for x in args.tokens.split("x"))
    print(f"{batch}x{length} tokens, student hidden {args.hidden}, teacher {args.hidden * 3 // 2}")
    rows = []
    for vocab in (int(v) for v in args.vocabs.split(",")):
        runs: dict[str, list[dict[str, Any]]] = {"plain": [], "fused": []}
        for _ in range(args.rounds):  # alternating, so that machine noise hits both alike
            for variant in runs:
                spec = {"variant": variant, "vocab": vocab, "batch": batch, "length": length,
                        "hidden": args.hidden, "repeats": args.repeats}  # fmt: skip
                runs[variant].append(run_child(spec))
        plain, fused = (_median(runs[variant]) for variant in ("plain", "fused"))
        rows.append((vocab, plain, fused))
        print(
            f"vocab {vocab}: activations {_mib(plain, 'activations')} -> "
            f"{_mib(fused, 'activations')} MiB (x{_ratio(plain, fused)}); raw peak "
            f"{_mib(plain, 'peak')} -> {_mib(fused, 'peak')} MiB; step {_times(plain, fused)}; "
            f"loss {plain['loss']:.6f} vs {fused['loss']:.6f}",
            flush=True,
        )
    print(
        "\n| vocabulary | activations MiB plain -> fused | ratio | raw peak MiB plain -> fused "
        "| step time plain -> fused |"
    )
    print("|---|---|---|---|---|")
    for vocab, plain, fused in rows:
        print(
            f"| {vocab} | {_mib(plain, 'activations')} -> {_mib(fused, 'activations')} | "
            f"{_ratio(plain, fused)} | {_mib(plain, 'peak')} -> {_mib(fused, 'peak')} | "
            f"{_times(plain, fused)} |"
        )


def _mib(run: dict[str, Any], key: str) -> str:
    return f"{run[key] / 2**20:.0f}"


def _ratio(plain: dict[str, Any], fused: dict[str, Any]) -> str:
    return f"{fused['activations'] / plain['activations']:.3f}"


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    times = [run["time"] for run in runs if run["time"] is not None]
    return {
        "peak": statistics.median(run["peak"] for run in runs),
        "activations": statistics.median(run["activations"] for run in runs),
        "loss": runs[0]["loss"],
        "time": statistics.median(times) if times else None,
    }


def _times(plain: dict[str, Any], fused: dict[str, Any]) -> str:
    if plain["time"] is None or fused["time"] is None:
        return "not timed"
    return f"{plain['time']:.2f} -> {fused['time']:.2f} s (x{fused['time'] / plain['time']:.2f})"


if __name__ == "__main__":
    main()
