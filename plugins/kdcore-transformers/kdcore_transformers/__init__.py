"""kdcore-transformers: Hugging Face Transformers for kdcore.

* the ``transformers`` teacher loader: ``{"name": "transformers", "path": ..., "dtype": ...,
  "device": ...}`` in a ``kd_loss`` config loads the teacher with ``from_pretrained``;
* :class:`KDTrainer`, a ``transformers.Trainer`` that distils with ``kd.convert`` and saves the
  student (only the student) with ``save_pretrained``.

``KDTrainer`` is imported on first access, so importing this package does not import
transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kdcore_transformers.teacher_loader import load_transformers_teacher

if TYPE_CHECKING:
    from kdcore_transformers.trainer import KDTrainer

__version__ = "0.1.0"
__all__ = ["KDTrainer", "__version__", "load_transformers_teacher"]


def __getattr__(name: str) -> Any:
    if name == "KDTrainer":
        from kdcore_transformers.trainer import KDTrainer

        return KDTrainer
    raise AttributeError(f"module 'kdcore_transformers' has no attribute {name!r}")
