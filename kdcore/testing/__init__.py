"""Contract checks for plugin authors: one call tells a criterion, balancer, teacher loader,
checkpoint backend or mode whether it keeps every contract kdcore's own plugins keep.

::

    from kdcore.testing import check_criterion

    def test_my_loss_keeps_the_contracts():
        check_criterion("my_loss", kwargs={"temperature": 2.0})

Each check runs every contract, returns a :class:`ContractReport` when all pass and raises
:class:`ContractFailure` (an ``AssertionError``) naming each failed contract and what it
expected. The pytest plugin (:mod:`kdcore.testing.pytest_plugin`, loaded automatically once
kdcore is installed) adds fixtures for tiny models and a fresh plugin host.
"""

from __future__ import annotations

from kdcore.testing._backend import BACKEND_CONTRACTS, check_backend
from kdcore.testing._balancer import BALANCER_CONTRACTS, check_balancer
from kdcore.testing._criterion import CRITERION_CONTRACTS, Sample, check_criterion, logits_sample
from kdcore.testing._mode import MODE_CONTRACTS, check_mode
from kdcore.testing._report import ContractFailure, ContractReport
from kdcore.testing._setup import TINY_CONV_NET, TINY_NET, Setup
from kdcore.testing._teacher_loader import TEACHER_LOADER_CONTRACTS, check_teacher_loader

__all__ = [
    "BACKEND_CONTRACTS",
    "BALANCER_CONTRACTS",
    "CRITERION_CONTRACTS",
    "MODE_CONTRACTS",
    "TEACHER_LOADER_CONTRACTS",
    "TINY_CONV_NET",
    "TINY_NET",
    "ContractFailure",
    "ContractReport",
    "Sample",
    "Setup",
    "check_backend",
    "check_balancer",
    "check_criterion",
    "check_mode",
    "check_teacher_loader",
    "logits_sample",
]
