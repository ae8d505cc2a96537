"""One labelled image (``Datum``) and a safe reader for Dassl's legacy pickles.

Dassl caches few-shot draws (``split_fewshot/*.pkl``) and the ImageNet listing (``imagenet/preprocessed.pkl``) as
pickles of ``dassl.data.datasets.base_dataset.Datum``. A pickle can run arbitrary code, so ``load_legacy_pickle``
resolves only an allow-list of globals: that Datum (mapped to vltune's) and plain containers. vltune never writes
pickles.
"""

from __future__ import annotations

import collections
import copyreg
import os
import pickle
from typing import Any

_FIELDS = ("impath", "label", "domain", "classname")


class Datum:
    """An image path with its label, domain and class name.

    Fields live in ``__dict__`` as ``_impath, _label, _domain, _classname`` exactly like Dassl's Datum, so legacy
    pickles restore into this class unchanged. Upstream stats every file on construction; here that check is opt-in
    (``check_exists``) because a 1.28 M-image split would cost 1.28 M stats.
    """

    def __init__(self, impath: str, label: int, domain: int = 0, classname: str = "", check_exists: bool = False):
        if not isinstance(impath, str):
            raise TypeError(f"Datum impath must be a str, got {type(impath).__name__}")
        if check_exists and not os.path.isfile(impath):
            raise FileNotFoundError(f"image not found: {impath}")
        self._impath = impath
        self._label = int(label)
        self._domain = int(domain)
        self._classname = str(classname)

    @property
    def impath(self) -> str:
        return self._impath

    @property
    def label(self) -> int:
        return self._label

    @property
    def domain(self) -> int:
        return self._domain

    @property
    def classname(self) -> str:
        return self._classname

    def _key(self) -> tuple[str, int, int, str]:
        return self._impath, self._label, self._domain, self._classname

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Datum) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"Datum({self._impath!r}, label={self._label}, domain={self._domain}, classname={self._classname!r})"

    def __setstate__(self, state: Any) -> None:
        """Restore from a (Dassl) pickle state: a dict holding ``_impath, _label, _domain, _classname``."""
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state) form
            state = state[0]
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"unexpected Datum state of type {type(state).__name__}")
        values = {f: state.get(f"_{f}", state.get(f)) for f in _FIELDS}
        Datum.__init__(self, values["impath"], values["label"] or 0, values["domain"] or 0, values["classname"] or "")


_ALLOWED: dict[tuple[str, str], Any] = {
    ("dassl.data.datasets.base_dataset", "Datum"): Datum,
    ("vltune.data.datum", "Datum"): Datum,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("collections", "defaultdict"): collections.defaultdict,
    ("copyreg", "_reconstructor"): copyreg._reconstructor,  # protocol 0/1 object reconstruction
    **{("builtins", t.__name__): t for t in (object, list, dict, tuple, set, frozenset, str, bytes, int, float, bool)},
    **{("__builtin__", t.__name__): t for t in (object, list, dict, tuple, set, frozenset, str, int, float, bool)},
}


class _LegacyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global '{module}.{name}' from a legacy pickle; only Dassl's Datum and plain "
                "containers are allowed"
            ) from None


def load_legacy_pickle(path: str) -> Any:
    """Read a Dassl ``split_fewshot/*.pkl`` or ``preprocessed.pkl`` without dassl installed, refusing other classes.

    Raises:
        pickle.UnpicklingError: the pickle references a global outside the allow-list (its code never runs).
    """
    with open(path, "rb") as f:
        try:
            return _LegacyUnpickler(f).load()
        except pickle.UnpicklingError as e:
            raise pickle.UnpicklingError(f"{path}: {e}") from None
