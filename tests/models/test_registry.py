"""The one config validator: a function's signature gives defaults, unknown-key checks and value rules."""

from typing import Annotated

import numpy as np
import pytest

from neureg.models.digests import stable_hash
from neureg.models.registry import (
    Fraction,
    PositiveInt,
    Registry,
    complete_kwargs,
    config_parameters,
    one_of,
    open_interval,
)


def settings(
    inputs,
    steps: PositiveInt = 10,
    rate: Fraction = 0.5,
    mode: Annotated[str, one_of("a", "b")] = "a",
    eps: Annotated[float, open_interval(0, 0.5)] = 0.1,
    limit: PositiveInt | None = None,
    flag: bool = False,
):
    """A config: every keyword argument with a default; ``inputs`` (no default) is not config."""


def test_defaults_fill_what_a_config_leaves_out_in_signature_order():
    assert list(config_parameters(settings)) == ["steps", "rate", "mode", "eps", "limit", "flag"]
    assert complete_kwargs(settings, {"rate": 0.25}) == {
        "steps": 10,
        "rate": 0.25,
        "mode": "a",
        "eps": 0.1,
        "limit": None,
        "flag": False,
    }


def test_numpy_scalars_become_plain_values_so_hashes_are_stable():
    full = complete_kwargs(settings, {"steps": np.int64(3), "rate": np.float32(0.5)})
    assert type(full["steps"]) is int and type(full["rate"]) is float


@pytest.mark.parametrize(
    "given, fault",
    [
        ({"stepz": 3}, "unknown config key"),
        ({"inputs": 3}, "unknown config key"),  # an input is never config
        ({"steps": 0}, "'steps' must be a positive integer"),
        ({"steps": 2.5}, "'steps' must be a positive integer"),  # 2.0 is 2 (test_canonical_forms...)
        ({"steps": True}, "'steps' must be a positive integer"),
        ({"rate": 1.0}, "'rate' must be a number in \\[0, 1\\)"),
        ({"rate": float("nan")}, "'rate'"),
        ({"mode": "c"}, "'mode' must be one of"),
        ({"eps": 0.5}, "'eps' must be a number in \\(0, 0.5\\)"),
        ({"eps": "x"}, "'eps'"),
        ({"limit": 0}, "'limit'"),
        ({"flag": 2}, "'flag' must be True or False"),  # 1 is True
    ],
)
def test_bad_values_are_refused_with_the_key_named(given, fault):
    with pytest.raises(ValueError, match=fault):
        complete_kwargs(settings, given, "test config")


def test_optional_values_may_be_none():
    assert complete_kwargs(settings, {"limit": None})["limit"] is None
    assert complete_kwargs(settings, {"limit": 4})["limit"] == 4


def test_a_new_variant_is_one_registered_function():
    shapes = Registry("shape", key="shape")

    def at_most_ten(config):
        if config["sides"] > 10:
            raise ValueError("too many sides")

    @shapes.register(check=at_most_ten, closed=True)
    def polygon(scale: float, sides: PositiveInt = 3):
        return scale * sides

    assert "polygon" in shapes and list(shapes) == ["polygon"]
    assert shapes.complete({"shape": "polygon"}) == {"shape": "polygon", "sides": 3}
    assert shapes.build({"shape": "polygon", "sides": 4}, 2.0) == 8.0
    assert shapes["polygon"].info == {"closed": True}
    with pytest.raises(ValueError, match="too many sides"):
        shapes.complete({"shape": "polygon", "sides": 11})
    with pytest.raises(ValueError, match="unknown shape 'circle'"):
        shapes.complete({"shape": "circle"})
    with pytest.raises(ValueError, match="no 'shape' given"):
        shapes.complete({"sides": 3})
    with pytest.raises(ValueError, match="registered twice"):
        shapes.register("polygon")(lambda: None)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (dict(alpha=0), dict(alpha=0.0)),  # an int where a float is meant
        (dict(pairs_per_step=32.0), dict(pairs_per_step=32)),  # an integral float where an int is meant
        (dict(alpha=np.int64(3), pairs_per_step=np.float32(8)), dict(alpha=3.0, pairs_per_step=8)),
    ],
)
def test_values_take_their_annotations_one_form(given, expected):
    from neureg.models.vision.schedule import regularizer_settings

    full = complete_kwargs(regularizer_settings, given)
    for name, value in expected.items():
        assert full[name] == value and type(full[name]) is type(value)
    assert stable_hash(full) == stable_hash(complete_kwargs(regularizer_settings, expected))


def test_canonical_forms_of_lists_and_flags_and_what_stays_refused():
    from neureg.models.registry import canonical

    assert canonical((0, 1), list[float]) == [0.0, 1.0] and type(canonical([0], list[float])[0]) is float
    assert canonical([1.0, 5.0], list[int]) == [1, 5] and type(canonical([1.0], list[int])[0]) is int
    assert canonical(1, bool) is True and canonical(0, bool | None) is False
    assert canonical(2, bool) == 2  # not a flag: left for the rule to refuse
    assert canonical(2.5, int) == 2.5 and canonical("3", float) == "3" and canonical(True, float) is True
    with pytest.raises(ValueError, match="must be a positive integer, got 2.5"):
        complete_kwargs(settings, {"steps": 2.5})
    full = complete_kwargs(settings, {"steps": 2.0, "rate": 0, "flag": 1})
    assert (full["steps"], full["rate"], full["flag"]) == (2, 0.0, True) and type(full["rate"]) is float
