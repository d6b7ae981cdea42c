"""The hooks a kdcore plugin may implement.

Every hook receives a :class:`~kdcore._registry.Registry` and calls ``registry.add(name, obj)``
for each thing it provides::

    import kdcore

    @kdcore.hookimpl
    def kdcore_register_criteria(registry):
        registry.add("cosine", CosineLoss)

A plugin is a module (or object) listed under the ``kdcore`` entry-point group of its
distribution. Implementations may leave out arguments, so hooks can grow new ones later.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from kdcore._registry import Registry

PROJECT_NAME = "kdcore"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def kdcore_register_criteria(registry: Registry) -> None:
    """Register distillation losses.

    :param registry: ``registry.add(name, cls)`` with an ``nn.Module`` subclass whose
        ``forward(student_output, teacher_output, **kwargs)`` returns a loss tensor.
    """


@hookspec
def kdcore_register_balancers(registry: Registry) -> None:
    """Register loss balancers.

    :param registry: ``registry.add(name, cls)`` with a parameter-free
        :class:`~kdcore.DistillationLossBalancer` subclass.
    """


@hookspec
def kdcore_register_teacher_loaders(registry: Registry) -> None:
    """Register teacher loaders.

    :param registry: ``registry.add(name, fn)`` with a callable whose keyword arguments are the
        config keys and which returns the teacher ``nn.Module``.
    """


@hookspec
def kdcore_register_checkpoint_backends(registry: Registry) -> None:
    """Register checkpoint backends.

    :param registry: ``registry.add(name, backend)`` with an object implementing
        :class:`~kdcore._checkpoint.CheckpointBackend`.
    """


@hookspec
def kdcore_register_modes(registry: Registry) -> None:
    """Register conversion modes.

    :param registry: ``registry.add(name, mode)`` with an object implementing
        :class:`~kdcore._modes.Mode`; ``kd.convert(model, [(name, config)])`` applies it.
    """


@hookspec
def kdcore_register_loggers(registry: Registry) -> None:
    """Register run loggers (``[train] loggers`` of a ``kdcore distill`` job).

    ``registry.add(name, cls)``: a class built with the logger's options from the job file,
    following :class:`kdcore.plugin.RunLogger`.
    """
