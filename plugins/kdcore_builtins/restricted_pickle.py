"""Reading a pickle without unpickling it.

:func:`evaluate_pickle` walks the pickle's opcodes and builds an inert description of what it
would construct: it never imports a module, never looks up a global, never calls anything and
never instantiates a class; a reference to any global outside the caller's allow-list is refused
on sight.
"""

from __future__ import annotations

import pickletools
import reprlib
from typing import Any, NamedTuple, cast

import attrs


class PickleRefusedError(Exception):
    pass


class Global(NamedTuple):
    module: str
    name: str


@attrs.define(eq=False, repr=False)
class Instance:
    """What REDUCE or NEWOBJ would have built: ``cls(*args)``, plus BUILD's state. Inert."""

    cls: Global
    args: tuple[Any, ...]
    state: Any = None
    built: bool = False

    def __repr__(self) -> str:  # shallow: a crafted pickle can nest without end
        return f"{self.cls.module}.{self.cls.name}(...)"


class _BoundedRepr(reprlib.Repr):
    def repr_int(self, x: int, level: int) -> str:
        # repr() of an integer of more than 4,300 digits raises ValueError; a pickle can hold one
        if x.bit_length() > 64:
            return f"<a {x.bit_length()}-bit integer>"
        return super().repr_int(x, level)


_REPR = _BoundedRepr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 80, 80


def short(value: Any) -> str:
    """A bounded repr for error messages (values from a crafted file can be huge or deep)."""
    return _REPR.repr(value)


class Persistent(NamedTuple):
    pid: Any


_PUSH_ARGUMENT = frozenset(
    {
        "BININT",
        "BININT1",
        "BININT2",
        "LONG1",
        "LONG4",
        "BINFLOAT",
        "SHORT_BINUNICODE",
        "BINUNICODE",
        "BINUNICODE8",
        "SHORT_BINBYTES",
        "BINBYTES",
        "BINBYTES8",
    }
)


def evaluate_pickle(
    data: bytes, allowed: frozenset[tuple[str, str]], *, persistent: bool = False
) -> Any:
    """Run a pickle's opcodes on inert stand-ins: globals become :class:`Global` names,
    REDUCE/NEWOBJ become :class:`Instance` records, BUILD only stores the state. Nothing is
    imported, looked up, called or constructed; unknown opcodes and globals are refused."""
    stack: list[Any] = []
    marks: list[list[Any]] = []
    memo: dict[int, Any] = {}

    def pop_mark() -> list[Any]:
        nonlocal stack
        if not marks:
            raise PickleRefusedError("is a malformed pickle (no MARK)")
        items, stack = stack, marks.pop()
        return items

    def global_(module: object, name: object) -> Global:
        if not isinstance(module, str) or not isinstance(name, str):
            raise PickleRefusedError("is a malformed pickle (a global named by non-strings)")
        if (module, name) == _ENUM_LOOKUP:  # only as getattr(allowed enum class, member name)
            return Global(module, name)
        if (module, name) not in allowed:
            raise PickleRefusedError(
                f"refers to {module}.{name}, which is not one of the classes this format uses"
            )
        return Global(module, name)

    try:
        for opcode, argument, _ in pickletools.genops(data):
            op = opcode.name
            if op in ("PROTO", "FRAME"):
                continue
            if op == "STOP":
                if len(stack) != 1 or marks:
                    raise PickleRefusedError("is a malformed pickle (stack at STOP)")
                return stack[0]
            if op in _PUSH_ARGUMENT:
                stack.append(argument)
            elif op == "NONE":
                stack.append(None)
            elif op in ("NEWTRUE", "NEWFALSE"):
                stack.append(op == "NEWTRUE")
            elif op == "MARK":
                marks.append(stack)
                stack = []
            elif op == "POP":
                stack.pop()
            elif op == "POP_MARK":
                pop_mark()
            elif op == "DUP":
                stack.append(stack[-1])
            elif op == "EMPTY_TUPLE":
                stack.append(())
            elif op in ("TUPLE1", "TUPLE2", "TUPLE3"):
                count = int(op[-1])
                if len(stack) < count:
                    raise PickleRefusedError("is a malformed pickle (stack underflow)")
                items = stack[-count:]
                del stack[-count:]
                stack.append(tuple(items))
            elif op == "TUPLE":
                items = pop_mark()
                stack.append(tuple(items))
            elif op == "EMPTY_LIST":
                stack.append([])
            elif op == "LIST":
                items = pop_mark()
                stack.append(items)
            elif op == "APPEND":
                value = stack.pop()
                _expect_list(stack[-1]).append(value)
            elif op == "APPENDS":
                items = pop_mark()
                _expect_list(stack[-1]).extend(items)
            elif op == "EMPTY_DICT":
                stack.append({})
            elif op == "DICT":
                items = pop_mark()
                stack.append(_set_items({}, items))
            elif op == "SETITEM":
                value = stack.pop()
                key = stack.pop()
                _set_items(stack[-1], [key, value])
            elif op == "SETITEMS":
                items = pop_mark()
                _set_items(stack[-1], items)
            elif op in ("BINPUT", "LONG_BINPUT"):
                memo[cast(int, argument)] = stack[-1]
            elif op == "MEMOIZE":
                memo[len(memo)] = stack[-1]
            elif op in ("BINGET", "LONG_BINGET"):
                if argument not in memo:
                    raise PickleRefusedError(f"is a malformed pickle (memo {argument} unset)")
                stack.append(memo[argument])
            elif op == "GLOBAL":
                module, _, name = str(argument).partition(" ")
                stack.append(global_(module, name))
            elif op == "STACK_GLOBAL":
                name = stack.pop()
                module = stack.pop()
                stack.append(global_(module, name))
            elif op in ("REDUCE", "NEWOBJ"):
                args = stack.pop()
                callable_ = stack.pop()
                if not isinstance(callable_, Global) or not isinstance(args, tuple):
                    raise PickleRefusedError(f"is a malformed pickle ({op} on a non-global)")
                if callable_ == _ENUM_LOOKUP:
                    stack.append(_enum_member(args, allowed))
                else:
                    stack.append(Instance(callable_, args))
            elif op == "BUILD":
                state = stack.pop()
                target = stack[-1]
                if not isinstance(target, Instance) or target.built:
                    raise PickleRefusedError("is a malformed pickle (BUILD on a non-object)")
                target.state, target.built = state, True
            elif op == "BINPERSID" and persistent:
                stack.append(Persistent(stack.pop()))
            else:
                raise PickleRefusedError(f"uses the pickle opcode {op}, which this format does not")
    except IndexError:
        raise PickleRefusedError("is a malformed pickle (stack underflow)") from None
    except PickleRefusedError:
        raise
    except Exception as exc:  # genops' own complaints: truncated, bad opcode, bad argument
        raise PickleRefusedError(f"is not a valid pickle ({exc})") from None
    raise PickleRefusedError("is a truncated pickle (no STOP)")


# Some Python 3.11 releases pickle an enum member as getattr(EnumClass, "MEMBER"), others as
# EnumClass(value); the first is accepted only in exactly that shape.
_ENUM_LOOKUP = ("builtins", "getattr")


def _enum_member(args: tuple[Any, ...], allowed: frozenset[tuple[str, str]]) -> Instance:
    valid = (
        len(args) == 2
        and isinstance(args[0], Global)
        and tuple(args[0]) in allowed
        and isinstance(args[1], str)
        and args[1].isidentifier()
        and not args[1].startswith("_")
    )
    if not valid:
        raise PickleRefusedError(
            f"uses builtins.getattr on {short(args)}, not as an enum member lookup; "
            "refused without running anything"
        )
    return Instance(args[0], (args[1],))


def _expect_list(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise PickleRefusedError("is a malformed pickle (APPEND to a non-list)")
    return value


_KEY_TYPES = (str, int, type(None), Instance, Global)


def _set_items(target: Any, items: list[Any]) -> dict[Any, Any]:
    if not isinstance(target, dict) or len(items) % 2:
        raise PickleRefusedError("is a malformed pickle (SETITEMS on a non-dict)")
    for key, value in zip(items[::2], items[1::2], strict=True):
        # Flat keys only: hashing a deeply nested tuple would recurse in C without a guard.
        if not isinstance(key, _KEY_TYPES):
            raise PickleRefusedError(f"has a dict key of type {type(key).__name__}")
        target[key] = value
    return target  # type: ignore[no-any-return]
