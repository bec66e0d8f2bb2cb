"""Strict TOML settings (mfattn.config): every wrong type or form is refused naming the setting."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Literal

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

from mfattn.config import check_value, check_values, field_choices, field_docs, print_config, toml_value


@dataclasses.dataclass
class Dummy:
    __field_docs__ = {"depths": "depths L of the sweep", "beta": "inverse temperature", "attention": "the kernel"}
    __field_choices__ = {"init": ("zero", "mean_noise")}

    depths: Sequence[int] = (1, 2, 4)
    scales: tuple[float, ...] = ()
    beta: float = 1.0
    seeds: int = 2
    mc_check: bool = True
    init: str = "mean_noise"
    attention: str | dict = "softmax"
    precision: Literal["float32", "float64"] = "float32"
    name: str = dataclasses.field(default="run", metadata={"doc": "a label"})


GOOD = {
    "depths": [1, 8],
    "scales": [0.5, 2],
    "beta": 3,
    "seeds": 4,
    "mc_check": False,
    "init": "zero",
    "attention": {"kind": "sigmoid", "causal": True},
    "precision": "float64",
    "name": "x",
}


def test_good_values_are_converted():
    out = check_values(Dummy, GOOD)
    assert out["depths"] == (1, 8) and out["scales"] == (0.5, 2.0) and isinstance(out["scales"][1], float)
    assert out["beta"] == 3.0 and isinstance(out["beta"], float)
    assert out["mc_check"] is False and out["attention"] == {"kind": "sigmoid", "causal": True}
    assert Dummy(**out).precision == "float64"
    assert check_values(Dummy, {}) == {}


@pytest.mark.parametrize(
    "name, value, error, words",
    [
        ("depths", 4, TypeError, "depths must be a list of integers, got 4"),
        ("depths", [1, 2.0], TypeError, "depths must be a list of integers"),
        ("depths", [1, True], TypeError, "depths"),
        ("depths", "1,2", TypeError, "a list of integers, got '1,2' (a string)"),
        ("scales", ["1"], TypeError, "scales must be a list of finite numbers"),
        ("beta", [1.0], TypeError, "beta must be a finite number, got [1.0] (a list)"),
        ("beta", "1.0", TypeError, "beta must be a finite number, got '1.0' (a string)"),
        ("beta", True, TypeError, "beta must be a finite number, got True (a boolean)"),
        ("beta", math.inf, ValueError, "beta must be a finite number, got inf"),
        ("beta", math.nan, ValueError, "beta must be a finite number, got nan"),
        ("seeds", 2.0, TypeError, "seeds must be an integer, got 2.0 (a float)"),
        ("seeds", True, TypeError, "seeds must be an integer, got True (a boolean)"),
        ("seeds", "2", TypeError, "seeds must be an integer"),
        ("mc_check", "false", TypeError, "mc_check must be true or false, got 'false' (a string)"),
        ("mc_check", 0, TypeError, "mc_check must be true or false, got 0 (an integer)"),
        ("init", "bogus", ValueError, "init must be one of 'zero', 'mean_noise', got 'bogus'"),
        ("init", 3, TypeError, "init must be one of 'zero', 'mean_noise', got 3"),
        ("attention", 1, TypeError, "attention must be a string or a table, got 1"),
        ("precision", "float16", ValueError, "precision must be one of 'float32', 'float64'"),
        ("name", ["x"], TypeError, "name must be a string"),
    ],
)
def test_bad_values_are_refused_naming_the_setting(name, value, error, words):
    with pytest.raises(error) as info:
        check_values(Dummy, {**GOOD, name: value}, where="rates config run.toml")
    assert str(info.value).startswith("rates config run.toml: ")
    assert words in str(info.value), str(info.value)


def test_unknown_keys_and_bad_tables(no_jaxtyping):
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['depth'\]; known settings: attention, beta"):
        check_values(Dummy, {"depth": 3})
    with pytest.raises(ValueError, match="unknown setting 'x'"):
        check_value(Dummy, "x", 1)
    with pytest.raises(TypeError, match="table of settings"):
        check_values(Dummy, [("beta", 1.0)])
    with pytest.raises(TypeError, match="dataclass"):
        check_values(dict, {})


def test_docs_and_choices():
    assert field_docs(Dummy)["depths"] == "depths L of the sweep" and field_docs(Dummy)["name"] == "a label"
    assert field_docs(Dummy)["seeds"] == ""
    assert field_choices(Dummy) == {"init": ("zero", "mean_noise"), "precision": ("float32", "float64")}


def test_print_config_is_toml_that_reads_back_as_the_defaults():
    text = print_config(Dummy, header="mfattn test defaults")
    assert text.startswith("# mfattn test defaults\n")
    assert "# depths L of the sweep (a list of integers)\ndepths = [1, 2, 4]\n" in text
    assert "# (one of 'zero', 'mean_noise')\ninit = \"mean_noise\"\n" in text
    assert "scales = []" in text and "mc_check = true" in text and "beta = 1.0" in text
    values = check_values(Dummy, tomllib.loads(text))
    assert Dummy(**values) == Dummy()
    # with values: an instance's settings, tables inline
    inst = Dummy(**check_values(Dummy, GOOD))
    again = check_values(Dummy, tomllib.loads(print_config(Dummy, dataclasses.asdict(inst))))
    assert Dummy(**again) == inst


def test_toml_value_round_trips():
    for v in (0.02, 1e-5, 1e300, -3.0, 2, 'a "q"\n', [1, 2], {"kind": "l2", "k-x": [1.5]}, True):
        assert tomllib.loads(f"x = {toml_value(v)}")["x"] == v
    assert tomllib.loads(f"x = {toml_value(math.inf)}")["x"] == math.inf
    with pytest.raises(TypeError, match="toml_value"):
        toml_value(object())
