"""Every numeric field of every script's Args, read from the dataclass itself: NaN and a value
outside the range the script declares in ARG_RANGES are refused with one `error:` line, exit
code 2, no traceback and nothing under runs/. A new script or a new field is covered without
editing this file; a numeric field without a declared range fails test_every_numeric_field_has_a_range."""

import dataclasses
import math
import os
import subprocess
import sys
import typing

import pytest

from conftest import ALGOS, ALGOS_DIR, load


def numeric_fields(name):
    """{field: int or float} for the int / float (or Optional of them) fields of Args."""
    hints = typing.get_type_hints(load(name).Args)
    fields = {}
    for f in dataclasses.fields(load(name).Args):
        kind = hints[f.name]
        if typing.get_origin(kind) is typing.Union:
            inner = [a for a in typing.get_args(kind) if a is not type(None)]
            kind = inner[0] if len(inner) == 1 else None
        if kind in (int, float):
            fields[f.name] = kind
    return fields


def parse(interval):
    low, high = (float(x) for x in interval[1:-1].split(","))
    return interval[0] == "[", low, high, interval[-1] == "]"


def outside(interval, kind):
    """Values just outside each finite end of the interval (the end itself when it is open)."""
    closed_low, low, high, closed_high = parse(interval)
    values = []
    if math.isfinite(low):
        values.append(low - (1 if kind is int else 0.5) if closed_low else low)
    if math.isfinite(high):
        values.append(high + (1 if kind is int else 0.5) if closed_high else high)
    return [kind(v) for v in values]


CASES = [(name, field, value) for name in ALGOS for field, kind in numeric_fields(name).items()
         for value in [float("nan")] + outside(getattr(load(name), "ARG_RANGES", {}).get(field, "(-inf, inf)"), kind)]


@pytest.mark.parametrize("name", ALGOS)
def test_every_numeric_field_has_a_range(name):
    ranges = getattr(load(name), "ARG_RANGES", {})
    fields = numeric_fields(name)
    assert set(fields) <= set(ranges), f"{name}.py: declare the range of {sorted(set(fields) - set(ranges))} in ARG_RANGES"
    assert set(ranges) <= set(fields), f"{name}.py: ARG_RANGES names {sorted(set(ranges) - set(fields))}, not in Args"
    for field, interval in ranges.items():
        assert interval[0] in "[(" and interval[-1] in ")]", (field, interval)
        closed_low, low, high, closed_high = parse(interval)
        assert low < high and not (closed_low and low == -math.inf) and not (closed_high and high == math.inf)
        default = getattr(load(name).Args(), field)
        if default is not None:  # the defaults are valid
            assert (low < default or closed_low and default == low) and (default < high or closed_high and default == high), \
                (field, default, interval)


@pytest.mark.parametrize("name,field,value", CASES, ids=[f"{n}-{f}-{v}" for n, f, v in CASES])
def test_out_of_range_is_refused(name, field, value, in_tmp_dir, capsys):
    module = load(name)
    with pytest.raises(SystemExit) as e:
        module.train(module.Args(cuda=False, **{field: value}))
    assert e.value.code == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert 1 <= len(err) <= 3 and err[0].startswith("error:"), err
    assert "--" + field.replace("_", "-") in err[0], err
    assert "Traceback" not in captured.err + captured.out
    assert not os.path.exists("runs"), "a refused run must not create runs/"


@pytest.mark.parametrize("name", ALGOS)
def test_command_line_refusals_are_one_line(name, in_tmp_dir):
    """Through tyro: a word where an int belongs, and inf for a float."""
    fields = numeric_fields(name)
    int_field = next(f for f, kind in fields.items() if kind is int)
    float_field = next(f for f, kind in fields.items() if kind is float)
    for flag, value in [(int_field, "nan"), (float_field, "inf"), ("no-such-flag", "1")]:
        out = subprocess.run([sys.executable, os.path.join(ALGOS_DIR, f"{name}.py"), "--" + flag.replace("_", "-"), value],
                             capture_output=True, text=True, timeout=120)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2, out.stderr
        assert 1 <= len(lines) <= 3 and lines[0].startswith("error:") and "Traceback" not in out.stderr, out.stderr
        assert not os.path.exists("runs")
