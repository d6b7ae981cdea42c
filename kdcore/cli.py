"""The ``kdcore`` command line.

``kdcore plugins`` lists what the installed plugins register, ``kdcore check CONFIG`` checks a
config file before anything is built (importing nothing it names unless ``--import``),
``kdcore inspect PATH`` prints a checkpoint's manifest, ``kdcore new-plugin NAME`` writes a
plugin package to start from.
Each subcommand is one
``_add_<name>_command(subparsers)`` function that sets ``handler``; handlers import what they
need when they run, so that ``kdcore --help`` stays cheap and a new subcommand (``check``,
``inspect``, ``distill``...) is one more function added to :data:`COMMANDS`.

::

    $ kdcore plugins
    $ kdcore plugins --json
    $ kdcore check distill.toml
    $ kdcore check distill.toml --import --student mypkg.models:build_student
    $ kdcore inspect run.safetensors
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

PROG = "kdcore"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); return the exit status.

    0 on success, 1 when kdcore refused something, 2 on a usage error. Example::

        main(["plugins", "--json"])
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help and on usage errors
        return exc.code if isinstance(exc.code, int) else 2
    handler: Callable[[argparse.Namespace], int] | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return 2
    from kdcore._errors import KDCoreError

    try:
        return handler(args)
    except KDCoreError as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `kdcore plugins | head`: the reader left; say nothing more
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Knowledge distillation for PyTorch on a small plugin core."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    subparsers = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")
    for add_command in COMMANDS:
        add_command(subparsers)
    return parser


def _version() -> str:
    from kdcore import __version__

    return __version__


# ---------------------------------------------------------------------------- kdcore plugins


def _add_plugins_command(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "plugins",
        help="list what the installed plugins register",
        description=(
            "List every registered name by kind, with the plugin (entry-point name) and the "
            "distribution that provide it, then name conflicts, disabled plugins and load "
            "problems. KDCORE_DISABLE_PLUGINS=<plugin>[,<plugin>...] disables plugins."
        ),
    )
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="also show the object each name refers to"
    )
    parser.set_defaults(handler=_run_plugins)


def _run_plugins(args: argparse.Namespace) -> int:
    report = plugin_report()
    if args.json:
        import json

        print(json.dumps(report, indent=2))
    else:
        print(format_plugin_report(report, verbose=args.verbose))
    return 0


def plugin_report() -> dict[str, Any]:
    """What the current plugin host registered, as plain data (the ``--json`` output).

    ``{"registries": {"criteria": [{"name", "kind", "plugin", "distribution", "object"}, ...],
    ...}, "conflicts": [...], "disabled": [...], "warnings": [...]}``
    """
    import warnings

    import attrs

    from kdcore._plugin_manager import PluginWarning, current_host

    host = current_host()
    # Loading happens on first use; what goes wrong while loading belongs in the report. A host
    # loaded earlier has already warned, and its registries are listed as they are.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PluginWarning)
        registries = host.registries
    problems = []
    for warning in caught:
        if issubclass(warning.category, PluginWarning):
            problems.append(str(warning.message))
        else:
            warnings.warn_explicit(
                warning.message, warning.category, warning.filename, warning.lineno
            )

    listing: dict[str, list[dict[str, str]]] = {}
    conflicts: list[dict[str, Any]] = []
    for field in attrs.fields(type(registries)):
        registry = getattr(registries, field.name)
        listing[field.name] = [
            {
                "name": name,
                "kind": registry.kind,
                "plugin": provider.plugin,
                "distribution": provider.distribution,
                "object": _describe(obj),
            }
            for name, obj, provider in registry.items()
        ]
        conflicts.extend(
            {
                "registry": field.name,
                "kind": registry.kind,
                "name": name,
                "providers": [
                    {"plugin": p.plugin, "distribution": p.distribution} for p in providers
                ],
            }
            for name, providers in sorted(registry.conflicts().items())
        )
    return {
        "registries": listing,
        "conflicts": conflicts,
        "disabled": sorted(host.blocked),
        "warnings": problems,
    }


def format_plugin_report(report: dict[str, Any], *, verbose: bool = False) -> str:
    """The plain-text form of :func:`plugin_report`: one aligned table, then the exceptions."""
    header = ["KIND", "NAME", "PLUGIN", "DISTRIBUTION"] + (["OBJECT"] if verbose else [])
    rows = []
    for entries in report["registries"].values():
        for entry in entries:
            row = [entry["kind"], entry["name"], entry["plugin"], entry["distribution"]]
            rows.append(row + ([entry["object"]] if verbose else []))
    lines = _table([header, *rows])
    empty = [kind for kind, entries in report["registries"].items() if not entries]
    if empty:
        lines.append("")
        lines.append(f"Nothing registered: {', '.join(k.replace('_', ' ') for k in empty)}")
    if report["conflicts"]:
        lines += ["", "Conflicts (the name cannot be used until all but one plugin is disabled):"]
        conflict_rows = [
            [
                conflict["kind"],
                conflict["name"],
                ", ".join(f"{p['plugin']} ({p['distribution']})" for p in conflict["providers"]),
            ]
            for conflict in report["conflicts"]
        ]
        lines += _table([["KIND", "NAME", "REGISTERED BY"], *conflict_rows], indent="  ")
    if report["disabled"]:
        lines += ["", f"Disabled plugins (KDCORE_DISABLE_PLUGINS): {', '.join(report['disabled'])}"]
    if report["warnings"]:
        lines += ["", "Problems while loading plugins:"]
        lines += [f"  {message}" for message in report["warnings"]]
    return "\n".join(lines)


def _table(rows: list[list[str]], indent: str = "") -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        indent
        + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def _describe(obj: object) -> str:
    """``module:qualname`` of a registered class or function, or of an instance's class."""
    target = obj if hasattr(obj, "__qualname__") else type(obj)
    module = getattr(target, "__module__", None) or "?"
    name = f"{module}:{target.__qualname__}"
    return name if target is obj else f"{name} instance"


# ---------------------------------------------------------------------------- kdcore check


def _add_check_command(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "check",
        help="check a config file and say what it would build (imports nothing it names)",
        description=(
            "Read a TOML, JSON or YAML config, check every key, type and plugin name without "
            "building the teacher, and print what kd.convert would build. By default nothing "
            "the file names is imported or called: 'module:qualname' references (teacher "
            "factories, criterion and balancer classes) are checked for their form only and "
            "listed as not imported; registered plugins (installed code) are checked, and "
            "their criteria and balancers built. --import checks the references too, by "
            "importing their modules and calling the classes the config names: their code "
            "runs, so use it only on a config you trust. With --student, also check the layer "
            "names against the student that the callable returns (it is imported and called). "
            "With --import and a student (--student, or a job file's [train] student), also "
            "take one step on the job's first batch (a plain config: a dummy batch, when the "
            "student's first layer tells its input) to check that every criterion fits its "
            "layers' outputs."
        ),
    )
    parser.add_argument("config", help="the config file (.toml, .json, .yaml)")
    parser.add_argument(
        "--import",
        dest="import_references",
        action="store_true",
        help=(
            "also check the 'module:qualname' references: this imports the modules the config "
            "names and calls the criterion and balancer classes it names (their code runs)"
        ),
    )
    parser.add_argument(
        "--student",
        metavar="MODULE:CALLABLE",
        help="a function or class returning the student (imported and called)",
    )
    parser.set_defaults(handler=_run_check)


def _import_from_current_folder() -> None:
    """'module:callable' names may be modules of the current folder, as with ``python -m``."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())


def _run_check(args: argparse.Namespace) -> int:
    from kdcore._config_files import load_config, read_config_file
    from kdcore._errors import ConfigTypeError
    from kdcore._modes import check
    from kdcore._references import resolve
    from kdcore.training.config import TRAIN_TABLE, load_job
    from kdcore.training.loop import job_factory

    imports = args.import_references
    if imports or args.student is not None:
        _import_from_current_folder()  # as kdcore distill does
    if imports:
        print(
            f"{args.config}: --import: this imports the modules the config names and calls the "
            "classes it names (their code runs)"
        )
    train = None
    with _errors_from(args.config):
        if TRAIN_TABLE in read_config_file(Path(args.config)):  # a kdcore distill job file
            modes, train = load_job(args.config, imports=imports)
        else:
            modes = load_config(args.config, imports=imports)
    student = None
    if args.student is not None:
        student = resolve(args.student, what="student factory")()
        import torch.nn

        if not isinstance(student, torch.nn.Module):
            raise ConfigTypeError(f"--student {args.student} returned {type(student).__name__}")
    with _errors_from(args.config):
        if student is None and imports and train is not None:
            student = job_factory(train, "student")()
        for line in check(modes, student=student, imports=imports) if modes else []:
            print(line)
        if train is not None:
            length = _count(train.steps, "step") if train.steps else _count(train.epochs, "epoch")
            print(
                f"[{TRAIN_TABLE}] {train.student} on {train.data}: {train.optimizer} "
                f"lr {train.learning_rate}, {length}, batch {train.batch_size}, {train.device}, "
                f"output {train.output}"
            )
        if modes and student is not None:
            print(_probe_shapes(modes, student, train) if imports else _NO_PROBE)
    if not imports:
        print(
            "static check: nothing the config names was imported or called "
            "(--import checks the references too, by running their code)"
        )
    print(f"{args.config}: ok")
    return 0


def _count(number: int | None, unit: str) -> str:
    number = number or 1
    return f"{number} {unit}{'' if number == 1 else 's'}"


_NO_PROBE = "shape probe: not run (it builds the teacher, which runs the config's code: --import)"
#: Examples in a dummy batch, enough for the criteria that relate the examples of a batch.
_DUMMY_EXAMPLES = 4


def _probe_shapes(modes: list[tuple[str, Any]], student: Any, train: Any) -> str:
    """Take one step as ``kdcore distill`` would, on the job's first batch (without a job, on a
    dummy batch when the student's first layer tells its input), under ``no_grad``: a criterion
    that does not fit its layers' outputs raises :class:`kdcore.CriterionError` here, at its
    config path, rather than in the first step of a run."""
    import torch

    import kdcore as kd
    from kdcore._errors import ConfigError
    from kdcore.plugin import is_distillation_model
    from kdcore.training.loop import first_batch

    if train is not None:
        inputs, source = first_batch(train)[0], f"the first batch of {train.data}"
    else:
        inputs, source = _dummy_inputs(student), "a dummy batch"
        if inputs is None:
            return "shape probe: not run (no job data, and no known input for the student)"
    model = kd.convert(student, modes)
    if not is_distillation_model(model):
        return "shape probe: not run (the modes give back a plain model)"
    described = f"{source} (inputs {tuple(getattr(inputs, 'shape', ()))})"
    model.eval()
    with torch.no_grad():
        for side, alone in (
            ("teacher", model.only_teacher_forward),
            ("student", model.only_student_forward),
        ):
            try:
                with alone():
                    output = model(inputs)
            except (ValueError, RuntimeError) as exc:
                if train is None:  # a guess that did not fit, not the user's mistake
                    return f"shape probe: not run ({described} does not fit the {side}: {exc})"
                raise ConfigError(
                    f"the {side} cannot take {described}: {type(exc).__name__}: {exc}",
                    path="train.data",
                ) from exc
        # Labels of the right shape for a criterion that takes them (MFTLoss): the student's.
        labels: dict[str, Any] = {}
        if isinstance(output, torch.Tensor) and model.accepts_loss_kwarg("labels"):
            labels["labels"] = output.argmax(-1)
        model.compute_kd_loss(skip_balancer=True, **labels)
    return f"shape probe: one step on {described}: every criterion takes its layers' outputs"


def _dummy_inputs(student: Any) -> Any:
    """A batch for the student's first layer, if it is one whose input is known."""
    import torch
    from torch import nn

    for module in student.modules():
        if isinstance(module, nn.Linear):
            return torch.randn(_DUMMY_EXAMPLES, module.in_features)
        if isinstance(module, nn.Conv2d):
            return torch.randn(_DUMMY_EXAMPLES, module.in_channels, 32, 32)
        if isinstance(module, nn.Embedding):
            return torch.randint(module.num_embeddings, (_DUMMY_EXAMPLES, 16))
        if next(module.parameters(recurse=False), None) is not None:
            return None
    return None


@contextlib.contextmanager
def _errors_from(config: str, *others: str) -> Iterator[None]:
    """Errors about the config's values start with the config file, as ``load_job``'s do; those
    that name another file already (``others``: a checkpoint) or the ``--resume`` option are
    left as they are."""
    from kdcore._errors import ConfigError, UnknownNameError

    try:
        yield
    except (ConfigError, UnknownNameError) as exc:
        named = (*(f"{source}: " for source in (config, *others)), "--resume ")
        if not str(exc).startswith(named):
            exc.args = (f"{config}: {exc.args[0]}", *exc.args[1:])
        raise


# ---------------------------------------------------------------------------- kdcore inspect


def _add_inspect_command(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="print a checkpoint's (or a teacher cache's) manifest and tensor summary",
        description=(
            "Print what a kd.save checkpoint holds: format and kdcore version, the modes with "
            "their teacher spec, criteria and balancer, and tensor counts and sizes by group. "
            "Reads the header only and runs nothing the file names. A damaged manifest is "
            "shown as far as it can be read, followed by its problems (those kd.restore would "
            "refuse it for); the exit status is still 0. It is 1 only when PATH is not a "
            "checkpoint at all (no backend reads it, or it holds no kdcore manifest). "
            "For a teacher cache folder (kd.cache_teacher, kdcore cache-teacher): its teacher, "
            "vocabulary, top_k/top_p, temperature, compression, coverage and size; a missing "
            "or damaged shard is named (exit status 0; rerun cache-teacher to re-write it), "
            "an unreadable manifest.json gives 1."
        ),
    )
    parser.add_argument("path", help="a checkpoint file or folder, or a teacher cache folder")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.set_defaults(handler=_run_inspect)


def _run_inspect(args: argparse.Namespace) -> int:

    from kdcore._checkpoint import inspect_checkpoint
    from kdcore._teacher_cache import MANIFEST, cache_summary

    if (Path(args.path) / MANIFEST).is_file():  # a teacher cache (kd.cache_teacher)
        summary = cache_summary(args.path)
        print(_json(summary, indent=2) if args.json else "\n".join(summary["lines"]))
        return 0

    summary = inspect_checkpoint(args.path)
    if args.json:
        print(_json(summary, indent=2))
        return 0
    # The manifest is whatever the file holds: each field is shown only in the shape kd.save
    # writes it, and the problems are listed at the end.
    manifest = _object(summary["manifest"])
    print(f"{summary['path']}")
    print(
        f"  format {_shown(manifest.get('format_version'))}, written by kdcore "
        f"{_shown(manifest.get('kdcore_version'))}, student {_shown(manifest.get('student_class'))}"
    )
    modes = manifest.get("modes")
    for mode in modes if isinstance(modes, list) else []:
        mode = _object(mode)
        config = _object(mode.get("config"))
        print(f"  mode {_shown(mode.get('name'))}")
        if "teacher_model" in config:
            saved = " (weights in the checkpoint)" if mode.get("teacher_weights") is True else ""
            print(f"    teacher: {_json(config['teacher_model'])}{saved}")
        criterion = config.get("criterion")
        for index, pair in enumerate(criterion if isinstance(criterion, list) else []):
            pair = _object(pair)
            print(
                f"    criterion[{index}]: student {pair.get('student') or '<output>'!r} <- "
                f"teacher {pair.get('teacher') or '<output>'!r}: {_json(pair.get('loss'))}"
            )
        if "loss_balancer" in config:
            print(f"    loss balancer: {_json(config['loss_balancer'])}")
        missing = mode.get("missing")
        for entry in missing if isinstance(missing, list) else []:
            if isinstance(entry, list) and len(entry) == 2:
                print(f"    not recorded: {_shown(entry[0])} ({_shown(entry[1])})")
    optimizer = manifest.get("optimizer")
    if isinstance(optimizer, dict):
        print(f"  optimizer: {_shown(optimizer.get('class'))}")
    rows = [["TENSORS", "COUNT", "PARAMETERS", "MIB"]]
    for group, entry in summary["tensor_groups"].items():
        mib = f"{entry['bytes'] / 2**20:.2f}"
        rows.append([group, str(entry["tensors"]), f"{entry['parameters']:,}", mib])
    print("\n".join(_table(rows, indent="  ")))
    print("  files (where they really are):")
    for file in summary["files"]:
        outside = " (outside the checkpoint folder)" if file["outside"] else ""
        print(f"    {file['name']}: {file['location']}{outside}")
    if summary["problems"]:
        print("  problems:")
        for problem in summary["problems"]:
            print(f"    - {problem}")
    return 0


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _shown(value: Any) -> str:
    """A manifest field as text: strings as they are, anything else as JSON."""
    if value is None:
        return "(not recorded)"
    return value if isinstance(value, str) else _json(value)


def _json(value: Any, indent: int | None = None) -> str:
    import json

    try:
        return json.dumps(value, indent=indent)
    except RecursionError:  # parsed, but too deep for the indenting (pure Python) encoder
        return json.dumps(value)


# ---------------------------------------------------------------------------- kdcore distill


def _add_distill_command(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "distill",
        help="run a distillation job (with no config: a built-in demo on the UCI digits)",
        description=(
            "Train a student distilled from a teacher. CONFIG (TOML, JSON or YAML) holds the "
            "mode tables (as for 'kdcore check') and a [train] table: student and data "
            "factories ('module:callable'), optimizer, learning_rate, epochs or steps, "
            "batch_size (the global batch), device, precision, grad_accumulation, output, "
            "checkpoint_every, log_every, eval_every, seed, strategy, loggers. Writes "
            "checkpoints, the loggers' records (metrics.jsonl by default), the exported student "
            "and metrics.png (with matplotlib) to output, "
            "which must be empty or new unless --resume or --overwrite. "
            "Under 'torchrun --nproc_per_node=N -m kdcore distill CONFIG' it trains "
            "data-parallel (strategy ddp or fsdp2). Without CONFIG, run the embedded demo "
            "(no download)."
        ),
    )
    parser.add_argument("config", nargs="?", help="the job file (.toml, .json, .yaml)")
    start = parser.add_mutually_exclusive_group()
    start.add_argument(
        "--resume",
        metavar="PATH",
        help="continue from a checkpoint (step-N) this command saved, with the same job file",
    )
    start.add_argument(
        "--overwrite",
        action="store_true",
        help="start the job even though its output folder holds files (an earlier run's)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="with --resume: resume although the job file changed since the checkpoint",
    )
    parser.add_argument(
        "--quick", action="store_true", help="demo only: a few training steps (a smoke test)"
    )
    parser.set_defaults(handler=_run_distill)


def _run_distill(args: argparse.Namespace) -> int:
    if args.config is None:
        for given, option in [
            (args.resume, "--resume"),
            (args.overwrite, "--overwrite"),
            (args.force, "--force"),
        ]:
            if given:
                print(f"{PROG} distill: error: {option} needs the job's CONFIG", file=sys.stderr)
                return 2
        from kdcore.training.demo import run_demo

        if args.quick:
            run_demo(teacher_steps=60, student_steps=60)
        else:
            run_demo()
        return 0
    if args.quick:
        print(
            f"{PROG} distill: error: --quick shortens the demo only; for a short run of "
            f"{args.config}, lower its [train] steps",
            file=sys.stderr,
        )
        return 2
    if args.force and args.resume is None:
        print(f"{PROG} distill: error: --force goes with --resume PATH", file=sys.stderr)
        return 2
    from kdcore.training import load_job, train

    _import_from_current_folder()
    modes, config = load_job(args.config)  # everything checked before anything is built
    if args.resume is None and not args.overwrite:
        _refuse_an_earlier_run(args.config, Path(config.output))
    output = Path(config.output)
    fresh = not output.exists()
    resumed = () if args.resume is None else (args.resume, str(Path(args.resume)))
    try:
        with _errors_from(args.config, *resumed):
            # progress, summary and plot: rank 0 only
            train(modes, config, resume=args.resume, force=args.force)
    except KeyboardInterrupt:
        print(f"{PROG} distill: interrupted", file=sys.stderr)
        return 130
    except Exception:
        if fresh:
            _remove_unused_output(output)
        raise
    return 0


def _remove_unused_output(output: Path) -> None:
    """Remove the output folder of a run that failed before its first step (an empty
    metrics file is all it holds); anything else in it stays."""
    from kdcore.training.metrics import METRICS_NAME

    metrics = output / METRICS_NAME
    with contextlib.suppress(OSError):  # another rank may have removed it first
        if [path.name for path in output.iterdir()] == [
            METRICS_NAME
        ] and not metrics.stat().st_size:
            metrics.unlink()
        output.rmdir()  # only when empty


def _add_new_plugin_command(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "new-plugin",
        help="write a ready plugin package to start from",
        description=(
            "Write the package kdcore-NAME: a pyproject.toml with the kdcore entry point, a "
            "working example plugin of the kind asked for, tests that check it against "
            "kdcore.testing's contracts, and a README. Nothing is downloaded."
        ),
    )
    parser.add_argument("name", help="the name the plugin registers, e.g. cosine")
    parser.add_argument(
        "--kind",
        default="criterion",
        help="criterion (default), balancer, teacher-loader or backend",
    )
    parser.add_argument(
        "--directory", type=Path, default=Path("."), help="where to write it (default: here)"
    )
    parser.set_defaults(handler=_run_new_plugin)


def _run_new_plugin(args: argparse.Namespace) -> int:
    from kdcore._scaffold import new_plugin

    package = new_plugin(args.name, args.kind, args.directory)
    for path in sorted(p for p in package.rglob("*") if p.is_file()):
        print(f"wrote {path}")
    print(f"next: cd {package} && pip install -e . && python -m pytest tests")
    return 0


def _refuse_an_earlier_run(job: str, output: Path) -> None:
    """A job's output folder holding files is an earlier run's, which a new run would mix with."""
    from kdcore._errors import ConfigError
    from kdcore.training.resume import latest_checkpoint

    held = sorted(p.name for p in output.iterdir()) if output.is_dir() else []
    if not held:
        return
    shown = ", ".join(held[:3]) + (f" and {len(held) - 3} more" if len(held) > 3 else "")
    latest = latest_checkpoint(output)
    resume = f"--resume {latest} to continue that run, " if latest is not None else ""
    raise ConfigError(
        f"{job}: train.output {output} already holds {shown}; pass {resume}--overwrite to write "
        "over it, or give another train.output"
    )


# ---------------------------------------------------------------------- kdcore cache-teacher


def _add_cache_teacher_command(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "cache-teacher",
        help="run a job's teacher over its training data once and cache its top-k outputs",
        description=(
            "Offline distillation: run the teacher of CONFIG's first mode over the batches of "
            "its [train] data (one epoch, in the run's order) and write a teacher cache to "
            "OUTPUT (kd.cache_teacher). Rerun after a kill to resume after the last complete "
            "shard, or to re-write a missing or damaged one. Under torchrun each rank caches "
            "its share of the batches into shards of its own. Then train with "
            "teacher_model = {name = 'cached', path = OUTPUT}."
        ),
    )
    parser.add_argument("config", help="the job file (.toml, .json, .yaml)")
    parser.add_argument("output", help="the cache folder (new, or one to resume)")
    parser.add_argument("--top-k", type=int, default=64, help="entries kept per position")
    parser.add_argument("--top-p", type=float, default=None, help="keep at most this mass")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument(
        "--compression", default="float32", help="float32 (lossless), bfloat16 or compressed"
    )
    parser.add_argument("--examples-per-shard", type=int, default=1024)
    parser.set_defaults(handler=_run_cache_teacher)


def _run_cache_teacher(args: argparse.Namespace) -> int:
    from kdcore._errors import ConfigError
    from kdcore._teacher_cache import cache_summary, cache_teacher
    from kdcore.training import load_job
    from kdcore.training.distributed import launch
    from kdcore.training.loop import epoch_batches

    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p must be in (0, 1], got {args.top_p}")
    _import_from_current_folder()
    with _errors_from(args.config):
        modes, config = load_job(args.config)
        teachers = [
            (name, mode["teacher_model"]) for name, mode in modes if "teacher_model" in mode
        ]
        if not teachers:
            raise ConfigError("no mode names a teacher_model to cache")
        teacher = teachers[0][1]
        with launch(config.strategy, "cpu") as job:  # a process group under torchrun
            cache_teacher(
                teacher,
                (x for x, _ in epoch_batches(config)),
                args.output,
                top_k=args.top_k,
                top_p=args.top_p,
                temperature=args.temperature,
                compression=args.compression,
                examples_per_shard=args.examples_per_shard,
                log=print,
            )
    if job.main:
        print("\n".join(cache_summary(args.output)["lines"]))
    return 0


COMMANDS: list[Callable[[Any], None]] = [
    _add_plugins_command,
    _add_check_command,
    _add_inspect_command,
    _add_distill_command,
    _add_cache_teacher_command,
    _add_new_plugin_command,
]
