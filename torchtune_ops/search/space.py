"""A search space: named parameters with finite choices, and a cheap validity rule.

The search never proposes an invalid configuration: it enumerates the valid ones (or, for a space whose
Cartesian product is too large, a random sample of them plus neighbours of good ones found on the way) and
scores only those. Configurations are plain dicts ``{name: value}`` in the order the parameters were given.
"""
from __future__ import annotations

import itertools
import math
import numbers
import random
from typing import Any, Callable, Hashable, Iterable, Iterator, Mapping, Sequence

import numpy as np

Constraint = Callable[[dict], bool]

#: Spaces whose Cartesian product is at most this are enumerated in full; larger ones are sampled.
ENUMERATE_LIMIT = 1 << 18


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))


class Space:
    """Named parameters, each with a finite list of choices, and an optional validity rule.

    Args:
        params: parameter name -> its choices (a non-empty sequence of distinct hashable values). A parameter
            whose choices are all numbers is *ordinal*: the search treats neighbouring values (in sorted
            order, so 16 and 32 are neighbours in [16, 32, 64]) as similar. Any other parameter is
            *categorical*.
        constraint: ``constraint(config) -> bool``, True when a configuration is valid (for instance: fits in
            shared memory). It must be cheap: it is evaluated on every configuration of the space that the
            search considers. Default None: every combination is valid.

    Raises:
        ValueError: no parameters, a parameter without choices, duplicate choices, or a non-string name.

    Example:
        >>> space = Space({"BLOCK_M": [32, 64], "num_warps": [4, 8]},
        ...               constraint=lambda c: c["BLOCK_M"] * c["num_warps"] <= 256)
        >>> space.size, space.is_valid({"BLOCK_M": 64, "num_warps": 8})
        (4, False)
    """

    def __init__(self, params: Mapping[str, Sequence[Hashable]], *, constraint: Constraint | None = None):
        if not isinstance(params, Mapping) or not params:
            raise ValueError("a Space needs at least one parameter")
        self.params: dict[str, tuple] = {}
        for name, choices in params.items():
            if not isinstance(name, str):
                raise ValueError(f"parameter names must be strings, got {name!r}")
            if isinstance(choices, (str, bytes)) or not isinstance(choices, Iterable):
                raise ValueError(f"parameter {name!r}: choices must be a sequence of values, got {choices!r}")
            choices = tuple(choices)
            if not choices:
                raise ValueError(f"parameter {name!r} has no choices")
            if len(set(choices)) != len(choices):
                raise ValueError(f"parameter {name!r} has duplicate choices: {choices!r}")
            self.params[name] = choices
        if constraint is not None and not callable(constraint):
            raise ValueError("constraint must be a callable config -> bool")
        self.constraint = constraint
        self.names: tuple[str, ...] = tuple(self.params)
        self.sizes: tuple[int, ...] = tuple(len(c) for c in self.params.values())
        self.ordinal: tuple[bool, ...] = tuple(all(_is_number(v) for v in c) and len(c) > 2
                                               for c in self.params.values())
        # Position of each choice on its axis: the rank in sorted order for ordinal parameters.
        self.positions: tuple[np.ndarray, ...] = tuple(
            np.argsort(np.argsort(np.asarray(c, dtype=float))).astype(float) if o else np.arange(len(c), dtype=float)
            for c, o in zip(self.params.values(), self.ordinal))
        self._index = [{v: i for i, v in enumerate(c)} for c in self.params.values()]

    @property
    def size(self) -> int:
        """Number of combinations in the Cartesian product (valid or not)."""
        return math.prod(self.sizes)

    def __repr__(self) -> str:
        return f"Space({self.params!r}, constraint={self.constraint!r})"

    def check_keys(self, config: Mapping[str, Any], *, what: str = "config") -> None:
        """Raise ValueError when ``config`` has keys the space does not know or lacks some of its keys."""
        unknown = [k for k in config if k not in self.params]
        missing = [k for k in self.names if k not in config]
        if unknown or missing:
            raise ValueError(f"{what} {dict(config)!r} does not match the space: "
                             f"unknown keys {unknown}, missing keys {missing}")

    def encode(self, config: Mapping[str, Any]) -> tuple[int, ...] | None:
        """The choice indices of ``config``, or None when a value is not one of the choices.

        Raises:
            ValueError: unknown or missing keys.
        """
        self.check_keys(config)
        try:
            return tuple(idx[config[n]] for n, idx in zip(self.names, self._index))
        except (KeyError, TypeError):  # TypeError: an unhashable value
            return None

    def decode(self, index: Sequence[int]) -> dict:
        """The configuration dict for a tuple of choice indices."""
        return {n: c[int(i)] for n, c, i in zip(self.names, self.params.values(), index)}

    def positions_of(self, points: np.ndarray) -> np.ndarray:
        """(m, D) float positions (see ``positions``) of configurations given as choice indices (m, D)."""
        return np.stack([pos[points[:, d]] for d, pos in enumerate(self.positions)], axis=1).reshape(
            len(points), len(self.sizes))

    def is_valid(self, config: Mapping[str, Any]) -> bool:
        """True when every value is one of the choices and the constraint accepts the configuration."""
        if self.encode(config) is None:
            return False
        return self._accepts(dict(config))

    def _accepts(self, config: dict) -> bool:
        return self.constraint is None or bool(self.constraint(config))

    def valid_indices(self, *, limit: int = ENUMERATE_LIMIT, seed: int = 0) -> tuple[np.ndarray, bool]:
        """Choice-index rows of valid configurations, and whether that is the whole valid set.

        A product of at most ``limit`` combinations is enumerated in full. A larger one is sampled: ``limit``
        distinct combinations drawn uniformly (deterministic for ``seed``), of which the valid ones are kept.
        """
        if self.size <= limit:
            rows = (idx for idx in itertools.product(*(range(s) for s in self.sizes)))
            complete = True
        else:
            flat = random.Random(seed).sample(range(self.size), limit)
            rows = (self._unflatten(f) for f in sorted(flat))
            complete = False
        keep = [r for r in rows if self._accepts(self.decode(r))]
        return np.asarray(keep, dtype=np.int64).reshape(len(keep), len(self.sizes)), complete

    def _unflatten(self, flat: int) -> tuple[int, ...]:
        out = []
        for s in reversed(self.sizes):
            flat, r = divmod(flat, s)
            out.append(r)
        return tuple(reversed(out))

    def neighbours(self, index: Sequence[int]) -> Iterator[tuple[int, ...]]:
        """Valid configurations that differ from ``index`` in one parameter (adjacent value if ordinal)."""
        for d, (s, o) in enumerate(zip(self.sizes, self.ordinal)):
            if o:
                pos = self.positions[d]
                order = np.argsort(pos)
                rank = int(pos[index[d]])
                options = [int(order[r]) for r in (rank - 1, rank + 1) if 0 <= r < s]
            else:
                options = [i for i in range(s) if i != index[d]]
            for i in options:
                cand = tuple(index[:d]) + (i,) + tuple(index[d + 1:])
                if self._accepts(self.decode(cand)):
                    yield cand
