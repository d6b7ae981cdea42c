"""Shared fixtures and helpers: tiny models built from code, plugin hosts made fresh per test,
crafted checkpoints, a watch on what a restore runs, and manifest strategies for fuzzing."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import hypothesis.strategies as st
import pytest
import torch
from kdcore_builtins import safetensors_format
from torch import nn

import kdcore as kd


class TinyNet(nn.Module):
    """Two linear layers; ``width`` tells teachers from students."""

    def __init__(self, width: int = 8, inputs: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(inputs, width)
        self.fc2 = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x))) * scale


@kd.teacher_factory
def make_teacher() -> TinyNet:
    """A named teacher factory (module-level, so it can be referenced by 'module:qualname')."""
    torch.manual_seed(1)
    return TinyNet(width=16)


def tiny_llama_from_config(
    *, vocab: int, hidden: int, seed: int = 0, layers: int = 2, tied: bool = False
) -> Any:
    """A Hugging Face Llama causal LM built from a config (no download), weights drawn after
    ``torch.manual_seed(seed)``; transformers is imported here, by the tests that use it."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
    )
    return transformers.LlamaForCausalLM(config)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def student() -> TinyNet:
    return TinyNet()


@pytest.fixture
def teacher() -> TinyNet:
    return make_teacher()


@pytest.fixture
def batch() -> torch.Tensor:
    return torch.randn(5, 4)


@pytest.fixture
def builtin_host() -> kd.PluginHost:
    """A fresh host over the installed entry points (ignoring $KDCORE_DISABLE_PLUGINS),
    made current for the test."""
    host = kd.PluginHost(blocked=())
    with kd.use_host(host):
        yield host


# ================================================================== checkpoints, crafted
def write_raw(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """A safetensors file holding ``tensors`` and ``metadata`` as given: nothing is checked, so
    the manifest (``metadata["kdcore"]``) may be anything a crafted file could hold."""
    with open(path, "wb") as file:
        safetensors_format.write(file, tensors, metadata)
    return path


def crafted_manifest(teacher: dict[str, Any] | None = None, **overrides: Any) -> dict[str, Any]:
    """The manifest ``kd.save`` writes for a :class:`TinyNet` distilled from :func:`make_teacher`
    (``teacher``: another teacher spec), with top-level keys replaced by ``overrides``."""
    manifest = {
        "format": "kdcore.checkpoint",
        "format_version": 1,
        "kdcore_version": "0.1.0",
        "student_class": "tests.conftest:TinyNet",
        "modes": [
            {
                "name": "kd_loss",
                "config": {
                    "teacher_model": teacher
                    or {"name": "callable", "target": "tests.conftest:make_teacher"},
                    "criterion": [{"student": "", "teacher": "", "loss": {"name": "logits"}}],
                    "loss_balancer": None,
                    "expose_minimal_state_dict": True,
                },
                "missing": [],
                "teacher_weights": False,
            }
        ],
        "aliases": {},
        "optimizer": None,
    }
    manifest.update(overrides)
    return manifest


def trained_model() -> tuple[nn.Module, torch.optim.Optimizer]:
    """A distillation model and its Adam optimizer after one step (so the optimizer has state)."""
    model = kd.convert(
        TinyNet(),
        [("kd_loss", {"teacher_model": make_teacher, "criterion": kd.LogitsDistillationLoss()})],
    )
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 4))
    model.compute_kd_loss().backward()
    optimizer.step()
    return model, optimizer


class FullDisk:
    """A file object that takes ``budget`` bytes, then fails as a full disk does."""

    def __init__(self, file: IO[bytes], budget: list[int]) -> None:
        self._file, self._budget = file, budget

    def write(self, data: Any) -> int:
        size = memoryview(data).nbytes
        if size > self._budget[0]:
            self._file.write(memoryview(data)[: self._budget[0]])
            self._budget[0] = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self._budget[0] -= size
        return self._file.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)

    def __enter__(self) -> FullDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()


@contextlib.contextmanager
def disk_full_after(budget: int) -> Iterator[list[str]]:
    """Every file opened through ``os.fdopen`` (as ``kd.save``'s atomic writes open theirs)
    takes ``budget`` bytes in all, then fails as a full disk does; yields the modes of the
    files opened for writing."""
    remaining, real_fdopen, opened = [budget], os.fdopen, []

    def fdopen(descriptor: int, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        file = real_fdopen(descriptor, mode, *args, **kwargs)
        if "w" not in mode:
            return file
        opened.append(mode)
        return FullDisk(file, remaining)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "fdopen", fdopen)
        yield opened


# ================================================================== watching what runs
_WATCHED_EVENTS = (
    "os.system",
    "os.exec",
    "os.posix_spawn",
    "os.spawn",
    "os.fork",
    "os.forkpty",
    "subprocess.Popen",
    "pickle.find_class",
    "ctypes.dlopen",
    "socket.connect",
    "os.remove",
    "os.rename",
    "shutil.rmtree",
)
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_recording: list[list[tuple[str, str]]] = []


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if not _recording:
        return
    generated = event == "compile" and _generated_by_kdcore_or_its_libraries(*args[:2])
    if event in _WATCHED_EVENTS or (event == "compile" and not generated):
        _recording[-1].append((event, repr(args)[:200]))
    elif event == "open" and len(args) == 3:
        _, mode, flags = args
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & _WRITE_FLAGS
        )
        if writing:
            _recording[-1].append((event, repr(args)[:200]))


def _generated_by_kdcore_or_its_libraries(source: Any, filename: Any) -> bool:
    """attrs and cattrs generate methods, and typing evaluates string annotations ('Any',
    'list[str]'), on first use of a class; eval or exec of a string from a file would not look
    like either (any code passes through a compile event first; a code object itself could only
    come from a pickle, which the pickle.find_class event catches)."""
    name = str(filename)
    if name.startswith(("<attrs generated", "<cattrs generated")):
        return True
    text = source.decode() if isinstance(source, bytes) else str(source)
    return name == "<string>" and re.fullmatch(r"[\w.\[\], |]+", text) is not None


sys.addaudithook(_audit)  # audit hooks cannot be removed; this one only records while asked


@contextlib.contextmanager
def nothing_runs() -> Iterator[None]:
    """Fail if the block spawns, execs, unpickles, writes a file or imports a new module."""
    modules = set(sys.modules)
    _recording.append([])
    try:
        yield
    finally:
        events = _recording.pop()
    assert events == [], f"restore ran something: {events}"
    assert set(sys.modules) - modules == set(), "restore imported a module"


# ================================================================== fuzzing manifests
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True)
    | st.text(max_size=8)
    | st.sampled_from(["kd_loss", "callable", "logits", "os:system", "tests.conftest:TinyNet"]),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "format",
                    "format_version",
                    "modes",
                    "aliases",
                    "optimizer",
                    "name",
                    "config",
                    "missing",
                    "teacher_weights",
                    "teacher_model",
                    "criterion",
                    "loss",
                    "target",
                    "params",
                    "param_groups",
                    "scalars",
                ]
            )
            | st.text(max_size=6),
            children,
            max_size=5,
        )
    ),
    max_leaves=12,
)


@st.composite
def manifests(draw: st.DrawFn) -> Any:
    """A valid manifest with parts replaced by arbitrary JSON, or arbitrary JSON outright."""
    if draw(st.integers(0, 9)) == 0:
        return draw(JSON)
    manifest = crafted_manifest()
    for _ in range(draw(st.integers(1, 3))):
        target: Any = manifest
        keys: list[Any] = []
        while isinstance(target, (dict, list)) and target and draw(st.booleans()):
            key = draw(
                st.sampled_from(sorted(target) if isinstance(target, dict) else range(len(target)))
            )
            keys.append(key)
            target = target[key]
        if not keys:
            key = draw(st.sampled_from(sorted(manifest)))
            keys = [key]
        parent = manifest
        for key in keys[:-1]:
            parent = parent[key]
        if draw(st.booleans()) and isinstance(parent, dict):
            parent.pop(keys[-1], None)
        else:
            parent[keys[-1]] = draw(JSON)
    return manifest


#: The divergence cases the divergence tests run: name -> (divergence, its arguments besides
#: temperature and reduction); ``topk_kl_tail`` is ``topk_kl`` with a tail bucket.
DIVERGENCE_CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "forward_kl": ("forward_kl", {}),
    "reverse_kl": ("reverse_kl", {}),
    "jsd": ("jsd", {"beta": 0.3}),
    "skew_kl": ("skew_kl", {"alpha": 0.2}),
    "skew_reverse_kl": ("skew_reverse_kl", {"alpha": 0.2}),
    "tvd": ("tvd", {}),
    "topk_kl": ("topk_kl", {"k": 4}),
    "topk_kl_tail": ("topk_kl", {"k": 4, "tail_bucket": True}),
}


def exit_torchrun_worker() -> None:
    """End a torchrun test worker once every rank is done: a barrier, then ``os._exit(0)``.

    Tearing gloo down from Python is racy: a DDP reducer freed after ``destroy_process_group``
    joins gloo's worker thread while holding the GIL that thread needs to free its last work
    (a deadlock, seen in CI), and gloo's threads left to interpreter exit can abort the process
    ("terminate called without an active exception"). The worker's results are on disk by now.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
