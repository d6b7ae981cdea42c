"""Optimizer state in a checkpoint: scalars in the manifest, tensors named
``__optimizer__.state.<parameter index>.<key>``; every saved value is checked against the given
optimizer before any is loaded.
"""

from __future__ import annotations

import reprlib
import sys
from itertools import chain
from pathlib import Path
from typing import Any

import torch

from kdcore._checkpoint_backend import (
    CheckpointFormatError,
    CheckpointMismatchError,
    CheckpointReader,
    TensorInfo,
    dtype_kind,
)
from kdcore._references import reference_of

OPTIMIZER_PREFIX = "__optimizer__."


def optimizer_manifest(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]
) -> dict[str, Any]:
    state = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{OPTIMIZER_PREFIX}state.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return {
        "class": reference_of(type(optimizer)),
        "param_groups": state["param_groups"],
        "scalars": scalars,
    }


def check_optimizer(optimizer: torch.optim.Optimizer, manifest: dict[str, Any], path: Path) -> None:
    saved = manifest.get("optimizer")  # left out: none saved
    if saved is None:
        raise CheckpointMismatchError(path, "holds no optimizer state (save with optimizer=)")
    groups, scalars = saved.get("param_groups"), saved.get("scalars")
    if not isinstance(groups, list) or not isinstance(scalars, dict):
        raise CheckpointFormatError(path, "manifest 'optimizer' is malformed")
    seen: set[int] = set()
    for index, group in enumerate(groups):
        params = group.get("params") if isinstance(group, dict) else None
        if not isinstance(params, list) or not all(_is_index(p) for p in params):
            raise CheckpointFormatError(
                path, f"manifest optimizer param_groups[{index}] has no 'params' list of indices"
            )
        for parameter in params:
            if parameter in seen:  # torch would map both to one parameter, the other stateless
                raise CheckpointFormatError(
                    path, f"manifest optimizer param_groups list parameter index {parameter} twice"
                )
            seen.add(parameter)
    for index, values in scalars.items():
        if not (_is_index_text(index) and isinstance(values, dict)):
            raise CheckpointFormatError(
                path, f"manifest optimizer scalars[{index!r}] must map a parameter index to a dict"
            )
    ours = [len(group["params"]) for group in optimizer.param_groups]
    theirs = [len(group["params"]) for group in groups]
    if ours != theirs:
        raise CheckpointMismatchError(
            path, f"optimizer parameter groups hold {theirs} parameters, the given optimizer {ours}"
        )
    for index, (group, given) in enumerate(zip(groups, optimizer.param_groups, strict=True)):
        for key, value in group.items():
            if key != "params" and key in given and not _same_kind(value, given[key]):
                raise CheckpointFormatError(
                    path,
                    f"manifest optimizer param_groups[{index}].{key} is {reprlib.repr(value)}, "
                    f"where the given optimizer holds {reprlib.repr(given[key])}",
                )


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_index_text(value: Any) -> bool:
    return isinstance(value, str) and value.isdecimal() and value.isascii()


def _same_kind(saved: Any, given: Any) -> bool:
    """A saved hyperparameter has the JSON type of the optimizer's own (None matches any)."""
    if saved is None or given is None:
        return True
    if isinstance(given, bool) or isinstance(saved, bool):
        return isinstance(given, bool) and isinstance(saved, bool)
    if isinstance(given, (int, float, torch.Tensor)):
        return isinstance(saved, (int, float))
    if isinstance(given, (list, tuple)):
        return (
            isinstance(saved, list)
            and len(saved) == len(given)
            and all(_same_kind(s, g) for s, g in zip(saved, given, strict=True))
        )
    return isinstance(saved, type(given))


def optimizer_state(
    optimizer: torch.optim.Optimizer, manifest: dict[str, Any], reader: CheckpointReader, path: Path
) -> dict[str, Any]:
    """The saved state as ``optimizer.load_state_dict`` takes it, every tensor checked against
    its parameter before any is read (torch checks only what it uses, at the next ``step()``)."""
    saved = manifest["optimizer"]
    # load_state_dict maps the saved indices to the given parameters by position in the groups
    parameters = {
        str(index): parameter
        for index, parameter in zip(
            chain.from_iterable(group["params"] for group in saved["param_groups"]),
            chain.from_iterable(group["params"] for group in optimizer.param_groups),
            strict=True,
        )
    }
    state: dict[int, dict[str, Any]] = {}
    for index, values in saved["scalars"].items():
        if index not in parameters:
            raise CheckpointFormatError(path, _unheld(f"optimizer scalars[{index!r}]", index))
        state.setdefault(int(index), {}).update(values)
    tensors: dict[str, tuple[str, str]] = {}
    for name, info in reader.tensors.items():
        if not name.startswith(OPTIMIZER_PREFIX):
            continue
        parts = name[len(OPTIMIZER_PREFIX) :].split(".", 2)
        if len(parts) != 3 or parts[0] != "state" or not _is_index_text(parts[1]):
            raise CheckpointFormatError(
                path,
                f"tensor {name!r} is not named {OPTIMIZER_PREFIX}state.<parameter index>.<key>",
            )
        if parts[1] not in parameters:
            raise CheckpointFormatError(path, _unheld(f"tensor {name!r}", parts[1]))
        _check_state_tensor(name, info, parts[1], parameters[parts[1]], path)
        tensors[name] = (parts[1], parts[2])
    for name, (index, key) in tensors.items():
        state.setdefault(int(index), {})[key] = reader.load(name)
    return {"state": state, "param_groups": saved["param_groups"]}


def _unheld(what: str, index: str) -> str:
    return f"{what} names parameter index {index}, which no optimizer param_groups entry holds"


def _check_state_tensor(
    name: str, info: TensorInfo, index: str, parameter: torch.Tensor, path: Path
) -> None:
    """A state tensor has its parameter's shape, is a scalar (Adam's ``step``), or holds
    factored statistics (Adafactor's row and column variances: the shape with some sizes 1)."""
    shape, expected = tuple(info.shape), tuple(parameter.shape)
    fits = all(size == 1 for size in shape) or (
        len(shape) == len(expected)
        and all(size in (full, 1) for size, full in zip(shape, expected, strict=True))
    )
    if not fits:
        raise CheckpointFormatError(
            path,
            f"the optimizer state does not fit the given optimizer: tensor {name!r} has shape "
            f"{list(shape)}, but parameter {index} has shape {list(expected)}",
        )
    if shape == expected and dtype_kind(info.dtype) != dtype_kind(parameter.dtype):
        raise CheckpointFormatError(
            path,
            f"the optimizer state does not fit the given optimizer: tensor {name!r} is "
            f"{info.dtype}, but parameter {index} is {parameter.dtype}",
        )


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, state: dict[str, Any], path: Path
) -> None:
    try:
        optimizer.load_state_dict(state)
    except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as exc:
        # torch checks the state only as far as it uses it; what it refuses, the file broke.
        raise CheckpointFormatError(
            path, f"the optimizer state does not fit the given optimizer ({exc!r})"
        ) from exc
    _shard_state_like_parameters(optimizer)


def _shard_state_like_parameters(optimizer: torch.optim.Optimizer) -> None:
    """The file holds whole state tensors; a parameter FSDP2 sharded (a DTensor) needs its
    state sharded the same way. Each rank keeps its own slice of what it read: no traffic."""
    if "torch.distributed.tensor" not in sys.modules:  # then no parameter can be a DTensor
        return
    from torch.distributed.tensor import DTensor, distribute_tensor

    for group in optimizer.param_groups:
        for parameter in group["params"]:
            state = optimizer.state.get(parameter)
            if not isinstance(parameter, DTensor) or not state:
                continue
            for key, value in state.items():
                if type(value) is torch.Tensor and value.shape == parameter.shape:
                    state[key] = distribute_tensor(
                        value.to(parameter.device),
                        parameter.device_mesh,
                        parameter.placements,
                        src_data_rank=None,
                    )
