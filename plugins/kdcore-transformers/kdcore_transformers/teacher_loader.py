"""The ``transformers`` teacher loader: ``from_pretrained`` from a local folder or a hub id.

::

    {"name": "transformers", "path": "out/teacher", "dtype": "bfloat16", "device": "cpu"}

Every argument is checked before anything is loaded (``kd.check`` calls :func:`validate`
without loading), and refused values are named in a :class:`kdcore.ConfigError`.

A folder is recorded as an absolute path (:func:`canonical_transformers_teacher`, which
``kd.convert`` applies to the spec before a checkpoint records it), so ``kd.restore`` loads the
same folder from any directory; a recorded absolute path that no longer exists is an error,
never a hub id. A path naming no folder is a hub id, recorded as written.

A kd.save checkpoint records the spec and kd.restore replays it, so the loader never runs code
shipped with a model, whoever calls it: ``trust_remote_code`` is refused, a local folder whose
``config.json`` needs its own code (an ``auto_map``) is refused before transformers sees it, and
``from_pretrained`` always gets ``trust_remote_code=False``, so transformers refuses such code
itself (for a hub id) instead of asking "run the custom code? [y/N]" on stdin.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdcore import ConfigError, ConfigTypeError
from kdcore.plugin import did_you_mean

#: ``dtype`` values; "auto" keeps the dtype the checkpoint was saved in.
DTYPES: dict[str, torch.dtype | str] = {
    "auto": "auto",
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
DEFAULT_AUTO_CLASS = "AutoModelForCausalLM"
#: Keys of ``from_pretrained_kwargs`` that have their own option, or that would run code a
#: config (or a checkpoint, which records the teacher spec) names.
RESERVED_KWARGS = {
    "pretrained_model_name_or_path": "path",
    "dtype": "dtype",
    "torch_dtype": "dtype",
    "device_map": "device",
    "revision": "revision",
}
_BUILD_IT_YOURSELF = (
    "build such a teacher yourself and pass the module, or a @kd.teacher_factory, as teacher_model"
)
REFUSED_KWARGS = {
    "trust_remote_code": (
        "runs code downloaded with the model, and a kd.save checkpoint records the teacher spec "
        f"for kd.restore to replay; {_BUILD_IT_YOURSELF}"
    ),
}
# A hub id: "name" or "owner/name" (letters, digits, '-', '_', '.').
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _local_folder(path: str | Path) -> Path | None:
    """``path`` made absolute (``~`` expanded), if it names something here; else ``None``."""
    local = Path(path).expanduser()
    return Path(os.path.abspath(local)) if local.exists() else None


def _check_path(path: Any) -> Path | str:
    """A local folder holding config.json (absolute), or a hub id (not looked up: that needs
    the network)."""
    if not isinstance(path, (str, Path)) or not str(path):
        raise ConfigTypeError(f"path must be a folder or a hub id (a string), got {path!r}")
    local = _local_folder(path)
    if local is not None:
        if not local.is_dir():
            raise ConfigError(
                f"path {str(path)!r} is a file; give the folder save_pretrained wrote"
            )
        if not (local / "config.json").is_file():
            raise ConfigError(
                f"path {str(path)!r} has no config.json: not a folder save_pretrained wrote"
            )
        _check_no_custom_code(local / "config.json")
        return local
    text = str(path)
    if os.path.isabs(text):  # a folder kd.convert recorded: never a hub id
        raise ConfigError(f"path {text!r}: no such folder (an absolute path, not a hub id)")
    looks_local = isinstance(path, Path) or text.startswith((".", "~")) or "\\" in text
    if looks_local or not _HUB_ID.match(text):
        raise ConfigError(f"path {text!r}: no such folder, and not a hub id ('owner/name')")
    return text


def canonical_transformers_teacher(path: Any, **options: Any) -> dict[str, Any]:
    """The loader's arguments as a checkpoint records them: ``path`` as an absolute folder when
    it names one here (resolved against the current directory), so that ``kd.restore`` loads
    the same folder from anywhere; a hub id, or a path naming nothing, as written."""
    local = _local_folder(path) if isinstance(path, (str, Path)) and str(path) else None
    return {"path": str(local) if local is not None else path, **options}


def _check_no_custom_code(config_file: Path) -> None:
    """Refuse a config.json that maps classes to Python files shipped with the model.

    An ``auto_map`` is harmless when transformers has its own classes for the ``model_type``
    (saved Phi-3 or Qwen folders keep one): with ``trust_remote_code=False`` it uses those.
    """
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{config_file} is not a readable JSON config: {exc}") from None
    if not isinstance(config, Mapping):
        raise ConfigError(f"{config_file} holds {type(config).__name__}, not a JSON object")
    if not config.get("auto_map"):
        return
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    if isinstance(model_type, str) and model_type in CONFIG_MAPPING:
        return
    raise ConfigError(
        f"{config_file} has an auto_map and model_type {model_type!r}, which transformers has no "
        "classes for: loading it would run Python files shipped with the model, which kdcore "
        f"never does (a checkpoint replays this spec at kd.restore); {_BUILD_IT_YOURSELF}"
    )


def _check_dtype(dtype: Any) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ConfigError(f"dtype {dtype} is not one of {', '.join(DTYPES)}")
        return dtype
    if not isinstance(dtype, str) or dtype not in DTYPES:
        hint = did_you_mean(str(dtype).removeprefix("torch."), DTYPES) if dtype else ""
        aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32"}
        if isinstance(dtype, str) and dtype in aliases:
            hint = f"; did you mean {aliases[dtype]!r}?"
        raise ConfigError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}{hint}")
    return DTYPES[dtype]


def _check_device(device: Any) -> torch.device | None:
    if device is None:
        return None
    if not isinstance(device, (str, torch.device)):
        raise ConfigTypeError(f"device must be a string such as 'cpu' or 'cuda:0', got {device!r}")
    try:
        return torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(
            f"device {device!r} is not a torch device (such as 'cpu', 'cuda', 'cuda:1')"
        ) from None


def _check_auto_class(auto_class: Any) -> Any:
    import transformers

    names = [n for n in dir(transformers) if n.startswith("AutoModel")]
    if not isinstance(auto_class, str) or auto_class not in names:
        raise ConfigError(
            f"auto_class {auto_class!r} is not a transformers AutoModel class"
            f"{did_you_mean(str(auto_class), names)} (default: {DEFAULT_AUTO_CLASS!r})"
        )
    return getattr(transformers, auto_class)


def _check_kwargs(from_pretrained_kwargs: Any) -> dict[str, Any]:
    if from_pretrained_kwargs is None:
        return {}
    if not isinstance(from_pretrained_kwargs, Mapping):
        raise ConfigTypeError(
            "from_pretrained_kwargs must be a mapping of keyword arguments, got "
            f"{type(from_pretrained_kwargs).__name__}"
        )
    for key in from_pretrained_kwargs:
        if key in RESERVED_KWARGS:
            raise ConfigError(
                f"from_pretrained_kwargs[{key!r}]: use the loader's own "
                f"{RESERVED_KWARGS[key]!r} key instead"
            )
        if key in REFUSED_KWARGS:
            raise ConfigError(
                f"from_pretrained_kwargs[{key!r}] is refused: it {REFUSED_KWARGS[key]}"
            )
    return dict(from_pretrained_kwargs)


def _check_revision(revision: Any) -> None:
    if revision is not None and (not isinstance(revision, str) or not revision):
        raise ConfigTypeError(
            f"revision must be a branch, tag or commit (a string), got {revision!r}"
        )


def validate_transformers_teacher(
    path: str,
    dtype: str = "auto",
    device: str | None = None,
    auto_class: str = DEFAULT_AUTO_CLASS,
    revision: str | None = None,
    from_pretrained_kwargs: Mapping[str, Any] | None = None,
) -> None:
    """Check the arguments of :func:`load_transformers_teacher` without loading anything."""
    _check_path(path)
    _check_dtype(dtype)
    _check_device(device)
    _check_auto_class(auto_class)
    _check_revision(revision)
    _check_kwargs(from_pretrained_kwargs)


def load_transformers_teacher(
    path: str,
    dtype: str = "auto",
    device: str | None = None,
    auto_class: str = DEFAULT_AUTO_CLASS,
    revision: str | None = None,
    from_pretrained_kwargs: Mapping[str, Any] | None = None,
) -> nn.Module:
    """``transformers.<auto_class>.from_pretrained(path, ...)``, as a frozen-ready teacher.

    :param path: a folder ``save_pretrained`` wrote (holding ``config.json``), or a hub id
        (``"owner/name"``), which transformers downloads or takes from its cache.
    :param dtype: ``"auto"`` (the checkpoint's own dtype), ``"float32"``, ``"float16"``,
        ``"bfloat16"`` or ``"float64"``.
    :param device: where the weights are loaded (``"cpu"``, ``"cuda:0"``...); ``None`` leaves
        it to transformers (the CPU), and the Trainer moves the model later anyway.
    :param auto_class: the ``transformers.AutoModel*`` class to load with.
    :param revision: a branch, tag or commit of a hub repository.
    :param from_pretrained_kwargs: further keyword arguments of ``from_pretrained``
        (``attn_implementation``, ``local_files_only``...); ``trust_remote_code`` is refused,
        and so is a folder whose ``config.json`` needs code shipped with the model.
    """
    source = _check_path(path)
    torch_dtype = _check_dtype(dtype)
    torch_device = _check_device(device)
    cls = _check_auto_class(auto_class)
    _check_revision(revision)
    kwargs = _check_kwargs(from_pretrained_kwargs)
    if torch_device is not None:
        if torch_device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {device!r}: CUDA is not available on this machine")
        kwargs["device_map"] = torch_device
    if revision is not None:
        kwargs["revision"] = revision
    call = f"{auto_class}.from_pretrained({str(path)!r})"
    try:
        # Explicitly False: left unset, transformers asks on stdin whether to run the code.
        model = cls.from_pretrained(source, dtype=torch_dtype, trust_remote_code=False, **kwargs)
    except ValueError as exc:
        if "trust_remote_code" not in str(exc):
            raise ConfigError(f"{call} failed: {exc}") from exc
        # Its advice (pass trust_remote_code=True) is what kdcore refuses.
        raise ConfigError(
            f"{call}: the model needs Python files shipped with it (an auto_map in its "
            f"config.json), which kdcore never runs; {_BUILD_IT_YOURSELF}"
        ) from exc
    except (OSError, TypeError, KeyError) as exc:
        raise ConfigError(f"{call} failed: {exc}") from exc
    return model  # type: ignore[no-any-return]


load_transformers_teacher.validate = validate_transformers_teacher  # type: ignore[attr-defined]
load_transformers_teacher.canonical = canonical_transformers_teacher  # type: ignore[attr-defined]
