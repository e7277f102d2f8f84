"""Configs as keyword arguments: one validator for every config, variants as registered builders.

A config is the keyword arguments of one function (nnfabrik's builder idea; VOneNet's factory and
Foolbox's attack constructors work the same way). The function's signature *is* the config's schema:
its defaults fill what a config leaves out, a key it does not take is refused, and each annotation says
what a value may be (``PositiveInt``, ``Fraction`` ...). :func:`complete_kwargs` is the one place that
checks this, so a config is validated identically wherever it enters (a Lookup table, a test, a bench);
it also gives each value its annotation's one form (:func:`canonical`), so ``alpha=0`` and ``alpha=0.0``
are one config and one hash.

Variants (similarity methods, attacks, architectures) live in a :class:`Registry`: a config names its
variant (``{"attack": "l2_ddn", "steps": 300}``) and the rest are that builder's keyword arguments. A
new variant is one decorated function; nothing else has to change.
"""

from __future__ import annotations

import inspect
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

from .digests import plain


@dataclass(frozen=True)
class Rule:
    """A check on one config value, with the words an error message uses for it."""

    words: str
    test: Callable[[Any], bool]


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


PositiveInt = Annotated[int, Rule("a positive integer", lambda v: _is_int(v) and v >= 1)]
NonNegativeInt = Annotated[int, Rule("an integer >= 0", lambda v: _is_int(v) and v >= 0)]
PositiveFloat = Annotated[float, Rule("a finite number > 0", lambda v: _is_number(v) and v > 0)]
NonNegativeFloat = Annotated[float, Rule("a finite number >= 0", lambda v: _is_number(v) and v >= 0)]
UnitInterval = Annotated[float, Rule("a number in (0, 1]", lambda v: _is_number(v) and 0 < v <= 1)]
Fraction = Annotated[float, Rule("a number in [0, 1)", lambda v: _is_number(v) and 0 <= v < 1)]
OpenUnit = Annotated[float, Rule("a number in (0, 1)", lambda v: _is_number(v) and 0 < v < 1)]

_PLAIN_RULES = {
    int: Rule("an integer", _is_int),
    float: Rule("a finite number", _is_number),
    bool: Rule("True or False", lambda v: isinstance(v, bool)),
    str: Rule("a string", lambda v: isinstance(v, str)),
    list: Rule("a list", lambda v: isinstance(v, list)),
}


def open_interval(low: float, high: float) -> Rule:
    """A rule for a finite number strictly between ``low`` and ``high``."""
    return Rule(f"a number in ({low}, {high})", lambda v: _is_number(v) and low < v < high)


def at_least(low: int) -> Rule:
    """A rule for an integer no smaller than ``low``."""
    return Rule(f"an integer >= {low}", lambda v: _is_int(v) and v >= low)


def one_of(*choices) -> Rule:
    """A rule for a value that must be one of a few choices (an annotation: ``Annotated[str, one_of(...)]``)."""
    return Rule(f"one of {list(choices)}", lambda v: v in choices)


def _rules(annotation) -> tuple[list[Rule], bool]:
    """The rules an annotation imposes, and whether None is allowed."""
    optional = False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(members) < len(typing.get_args(annotation))
        annotation = members[0] if len(members) == 1 else Any
    if typing.get_origin(annotation) is Annotated:
        base, *extras = typing.get_args(annotation)
        return [e for e in extras if isinstance(e, Rule)] or _rules(base)[0], optional
    origin = typing.get_origin(annotation) or annotation
    return ([_PLAIN_RULES[origin]] if origin in _PLAIN_RULES else []), optional


def _base_type(annotation):
    """The plain type an annotation holds (``Annotated`` and ``Optional`` unwrapped), or None."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = members[0] if len(members) == 1 else Any
    if typing.get_origin(annotation) is Annotated:
        return _base_type(typing.get_args(annotation)[0])
    return annotation if annotation is not Any else None


def canonical(value, annotation):
    """``value`` in the one form its annotation gives it, so equal configs hash alike: an int where a float
    is meant becomes a float (``alpha=0`` is ``alpha=0.0``), an integral float where an int is meant an int
    (``epochs=2.0`` is ``2``), 0 and 1 where a bool is meant a bool, and a ``list[T]``'s items each so.
    Anything else is left as given, for the annotation's rule to accept or refuse."""
    base = _base_type(annotation)
    origin = typing.get_origin(base)
    if origin is list and isinstance(value, (list, tuple)):
        (item,) = typing.get_args(base) or (Any,)
        return [canonical(v, item) for v in value]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    if base is float and isinstance(value, int):
        return float(value)
    if base is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if base is bool and value in (0, 1):
        return bool(value)
    return value


def config_parameters(function: Callable) -> dict[str, inspect.Parameter]:
    """The parameters of ``function`` that are config: those with a default (inputs come first, without)."""
    return {
        name: p
        for name, p in inspect.signature(function).parameters.items()
        if p.default is not inspect.Parameter.empty and p.kind is not inspect.Parameter.VAR_KEYWORD
    }


def complete_kwargs(function: Callable, given: dict, context: str = "") -> dict:
    """``given`` completed with ``function``'s defaults and checked against its annotations.

    Raises ValueError naming the context and the fault: a key the function does not take, or a value its
    annotation does not allow. Returns a new dict in signature order, numpy scalars made plain.
    """
    context = context or function.__name__
    if not isinstance(given, dict):
        raise ValueError(f"{context}: a config is a dict, got {type(given).__name__}")
    parameters = config_parameters(function)
    unknown = sorted(set(given) - set(parameters))
    if unknown:
        raise ValueError(f"{context}: unknown config key(s) {unknown}; known: {sorted(parameters)}")
    hints = typing.get_type_hints(function, include_extras=True)
    full = {}
    for name, parameter in parameters.items():
        value = canonical(plain(given.get(name, parameter.default)), hints.get(name, Any))
        rules, optional = _rules(hints.get(name, Any))
        if not (value is None and (optional or parameter.default is None)):
            for rule in rules:
                if not rule.test(value):
                    raise ValueError(f"{context}: {name!r} must be {rule.words}, got {value!r}")
        full[name] = value
    return full


def config_rules(rules: Callable[..., None] | None = None):
    """Decorator for a function that computes (an evaluation) and whose keyword arguments are a config: its
    rules across several keys are ``rules(**config)`` (raising ValueError), or there are none. Validation
    never calls the function itself; a plain ``*_settings`` function, whose body holds the rules, is called."""

    def mark(function: Callable) -> Callable:
        function.config_rules = rules
        return function

    return mark


def config_history(*, added: dict | None = None, retired: dict | None = None):
    """Decorator: how a config function's keys changed after rows were keyed by it, so those rows keep their
    hashes (``ConfigTable``; docs/architecture.md, "Configs that change").

    ``added``: keys introduced later, each with the value that does what configs without it did. A config
    holding exactly that value hashes as it did before the key existed, so an old row and the same config
    added today are one row. ``retired``: keys that left the config (execution settings now), each with the
    value configs of its time carried by default. The hash still counts them at that value, a stored config
    is read back without them, and a config that names one is refused."""

    def mark(function: Callable) -> Callable:
        function.config_added = dict(added or {})
        function.config_retired = dict(retired or {})
        return function

    return mark


def added_keys(function: Callable | None) -> dict:
    """The keys ``function``'s config gained later, with their values that change nothing (:func:`config_history`)."""
    return dict(getattr(function, "config_added", {}))


def retired_keys(function: Callable | None) -> dict:
    """The keys that left ``function``'s config, with the values hashes still count (:func:`config_history`)."""
    return dict(getattr(function, "config_retired", {}))


def hashed_form(function: Callable | None, full: dict) -> dict:
    """What a completed config's hash is taken of: without the later keys that hold their neutral value, with
    the retired keys at their old value."""
    added = added_keys(function)
    return {**retired_keys(function), **{k: v for k, v in full.items() if not (k in added and v == added[k])}}


def check_config_rules(function: Callable, full: dict) -> None:
    """Apply the rules across keys of ``function``'s completed config (see :func:`config_rules`)."""
    rules = getattr(function, "config_rules", function)
    if rules is not None:
        rules(**full)


@dataclass(frozen=True)
class Variant:
    """One registered builder and what the registry knows about it beyond its signature."""

    name: str
    builder: Callable
    check: Callable[[dict], None] | None = None
    info: dict = field(default_factory=dict)


class Registry:
    """Named builders of one kind; a config is ``{key: name, **that builder's keyword arguments}``."""

    def __init__(self, kind: str, key: str):
        self.kind, self.key = kind, key
        self._variants: dict[str, Variant] = {}

    def register(self, name: str | None = None, *, check: Callable[[dict], None] | None = None, **info):
        """Decorator: add a builder under ``name`` (default: its function name).

        ``check`` runs on the completed keyword arguments for rules across several of them; ``info``
        holds facts a caller needs before building (an attack's norm, the inputs a target reads).
        """

        def add(builder: Callable) -> Callable:
            variant_name = name or builder.__name__
            if variant_name in self._variants:
                raise ValueError(f"{self.kind} {variant_name!r} is registered twice")
            self._variants[variant_name] = Variant(variant_name, builder, check, info)
            return builder

        return add

    def unregister(self, name: str) -> None:
        """Remove a variant: for a notebook or a test that tried one out (rows made with it stay valid data)."""
        self[name]  # an unknown name is the same ValueError as everywhere
        del self._variants[name]

    def __contains__(self, name) -> bool:
        return name in self._variants

    def __iter__(self):
        return iter(sorted(self._variants))

    def __getitem__(self, name: str) -> Variant:
        if name not in self._variants:
            raise ValueError(f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self._variants))}")
        return self._variants[name]

    def complete(self, config: dict) -> dict:
        """The config with its variant's defaults filled in and every value checked (ValueError if not)."""
        if not isinstance(config, dict):
            raise ValueError(f"{self.kind} config: a config is a dict, got {type(config).__name__}")
        if self.key not in config:
            raise ValueError(f"{self.kind} config: no {self.key!r} given; one of {', '.join(self)}")
        variant = self[config[self.key]]
        rest = {k: v for k, v in config.items() if k != self.key}
        full = {self.key: variant.name, **complete_kwargs(variant.builder, rest, f"{self.kind} {variant.name}")}
        if variant.check is not None:
            variant.check(full)
        return full

    def build(self, config: dict, *inputs):
        """Call the config's builder on ``inputs`` with the config's keyword arguments (validated first)."""
        return self.build_completed(self.complete(config), *inputs)

    def build_completed(self, full: dict, *inputs):
        """Call the builder of a config :meth:`complete` already returned, without validating it again (a
        config is validated once, where it enters; an attack then builds once per batch)."""
        return self[full[self.key]].builder(*inputs, **{k: v for k, v in full.items() if k != self.key})
