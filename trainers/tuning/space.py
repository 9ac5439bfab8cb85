"""The search space of `bmvae tune`: a YAML file over the dotted config keys of `--set`.

    model.bmvae_m.lambda_c: {values: [0.01h, 0.1h, 0.5h]}      # categorical
    train.learning_rate: {low: 1.0e-4, high: 3.0e-3, log: true} # float range (log scale)
    model.latent_dim: {low: 8, high: 32, step: 8, int: true}    # int range
    model.bmvae_p.beta_prior: {values: [0.5, 1, 10]}

A value (or a range end) written as a multiple of `h` (`0.5h`, `h`, `2*h`) is that multiple of h,
the mean of the dataset's modalities' element counts (the paper's "average size of the data").
Every key, value and range end is checked against the config before any trial starts, so an
unknown key or a value the config refuses is one error naming the space file and the key.

Nothing here imports TensorFlow or Optuna.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
from typing import Any, Callable, Mapping

import yaml

from bmvae_tf.errors import UserError

_H = re.compile(r"^\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)?\s*\*?\s*h\s*$")
_RANGE_KEYS = {"low", "high", "log", "step", "int"}


@dataclasses.dataclass(frozen=True)
class Parameter:
    """One searched config key: categorical `values`, or a range [low, high]."""

    key: str
    values: tuple | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    integer: bool = False

    @property
    def categorical(self) -> bool:
        return self.values is not None

    def ends(self) -> list:
        """The values the config must accept: every category, or both ends of the range."""
        return list(self.values) if self.categorical else [self.low, self.high]

    def describe(self) -> str:
        if self.categorical:
            return "{" + ", ".join(_short(v) for v in self.values) + "}"
        scale = ", log" if self.log else ""
        step = f", step {_short(self.step)}" if self.step else ""
        return f"[{_short(self.low)}, {_short(self.high)}]{' int' if self.integer else ''}{scale}{step}"


@dataclasses.dataclass(frozen=True)
class Space:
    path: str
    h: float
    parameters: tuple[Parameter, ...]

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.parameters]

    def grid(self) -> dict[str, list] | None:
        """{key: values} when every parameter is categorical (then the search is a grid)."""
        if not all(p.categorical for p in self.parameters):
            return None
        return {p.key: list(p.values) for p in self.parameters}

    def grid_size(self) -> int | None:
        grid = self.grid()
        return None if grid is None else math.prod(len(v) for v in grid.values())

    def describe(self) -> dict[str, str]:
        return {p.key: p.describe() for p in self.parameters}


def _short(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def mean_element_count(manifest) -> float:
    """h: the mean over the manifest's modalities of each one's element count (8x8x1 -> 64)."""
    sizes = [m.size for m in manifest.modalities]
    return float(sum(sizes)) / len(sizes)


def _number(value, h: float, where: str):
    """A YAML value with `h` multiples resolved (`0.5h` -> 0.5 * h); other values unchanged."""
    if isinstance(value, str):
        match = _H.match(value)
        if match:
            return float(match.group(1) or 1.0) * h
    return value


def _float(value):
    """YAML 1.1 reads 1e-4 (no dot) as a string: a number in a range end."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _parameter(key: str, spec: Any, h: float, where: str) -> Parameter:
    if not isinstance(key, str) or not key or not all(key.split(".")):
        raise UserError(f"{where}: {key!r} is not a dotted config key such as model.bmvae_m.lambda_c")
    if isinstance(spec, list):
        spec = {"values": spec}
    if not isinstance(spec, Mapping):
        raise UserError(f"{where}: {key}: expected {{values: [...]}} or {{low: A, high: B}}, got {spec!r}")
    if "values" in spec:
        extra = sorted(set(spec) - {"values"})
        if extra:
            raise UserError(f"{where}: {key}: {extra[0]!r} does not go with 'values'")
        values = spec["values"]
        if not isinstance(values, list) or not values:
            raise UserError(f"{where}: {key}: 'values' must be a non-empty list, got {values!r}")
        values = tuple(_number(v, h, where) for v in values)
        if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
            raise UserError(f"{where}: {key}: 'values' repeats a value: {list(values)}")
        return Parameter(key, values=values)
    return _range(key, spec, h, where)


def _range(key: str, spec: Mapping, h: float, where: str) -> Parameter:
    unknown = sorted(set(spec) - _RANGE_KEYS)
    if unknown or "low" not in spec or "high" not in spec:
        what = f"unknown field {unknown[0]!r}" if unknown else "a range needs 'low' and 'high'"
        raise UserError(f"{where}: {key}: {what} (fields: values, or low, high, log, step, int)")
    integer = spec.get("int", False)
    log = spec.get("log", False)
    if not isinstance(integer, bool) or not isinstance(log, bool):
        raise UserError(f"{where}: {key}: 'int' and 'log' must be true or false")
    low, high, step = (_float(_number(spec.get(f), h, where)) for f in ("low", "high", "step"))
    for name, value in (("low", low), ("high", high), ("step", step)):
        if value is None and name == "step":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise UserError(f"{where}: {key}: '{name}' must be a number (or a multiple of h), got {value!r}")
    if integer:
        low, high = math.ceil(low), math.floor(high)
        step = None if step is None else int(step)
    if low > high:
        raise UserError(f"{where}: {key}: the range [{_short(low)}, {_short(high)}] is empty (low > high)")
    if log and low <= 0:
        raise UserError(f"{where}: {key}: a log range needs low > 0, got {_short(low)}")
    if step is not None and (step <= 0 or log):
        raise UserError(f"{where}: {key}: 'step' must be positive and cannot go with 'log'")
    if not integer:
        low, high = float(low), float(high)
    return Parameter(key, low=low, high=high, log=log, step=step, integer=integer)


def parse_space(data: Any, h: float, where: str) -> Space:
    """The Space of a loaded YAML mapping {dotted key: spec}."""
    if isinstance(data, Mapping) and set(data) == {"space"}:
        data = data["space"]
    if not isinstance(data, Mapping) or not data:
        raise UserError(f"{where}: the search space must be a non-empty mapping of dotted config keys")
    return Space(where, h, tuple(_parameter(k, v, h, where) for k, v in data.items()))


def load_space(path: str, h: float) -> Space:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: search space file not found") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    return parse_space(data, h, path)


def overrides(params: Mapping[str, Any]) -> list[str]:
    """`--set` strings for a trial's parameters (JSON is YAML, so the values round-trip)."""
    return [f"{key}={json.dumps(value)}" for key, value in params.items()]


def check_space(space: Space, build: Callable[[list[str]], Any]) -> None:
    """Builds the config with every category and both ends of every range (one key at a time,
    the others at their first value), so an unknown key or a refused value fails now, naming
    the space file; `build` turns --set overrides into a validated config (a UserError if not)."""
    first = {p.key: p.ends()[0] for p in space.parameters}
    for parameter in space.parameters:
        for value in parameter.ends():
            try:
                build(overrides({**first, parameter.key: value}))
            except UserError as e:
                raise UserError(f"{space.path}: {parameter.key}={_short(value)}: {_reason(e)}") from None


def _reason(error: UserError) -> str:
    """The config's message without its leading `source:`."""
    text = str(error)
    return text.split(": ", 1)[1] if text.startswith("--set: ") else text


def grid_points(space: Space) -> list[dict]:
    grid = space.grid() or {}
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def suggest(trial, space: Space) -> dict:
    """The trial's values of every parameter (Optuna's suggest_* API)."""
    params = {}
    for p in space.parameters:
        if p.categorical:
            params[p.key] = trial.suggest_categorical(p.key, list(p.values))
        elif p.integer:
            params[p.key] = trial.suggest_int(p.key, int(p.low), int(p.high), step=p.step or 1, log=p.log)
        else:
            params[p.key] = trial.suggest_float(p.key, p.low, p.high, step=p.step, log=p.log)
    return params


