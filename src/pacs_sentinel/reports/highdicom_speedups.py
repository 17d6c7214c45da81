"""Three CPU savings in highdicom's object construction that leave its output byte for byte the same.

Both were found by profiling the worker (issue 4, daemon overhead ratio); see
docs/benchmarks.md, section "inference".

1. :func:`install` memoizes ``highdicom._standard_utils.is_attribute_in_iod``. It walks every
   module and attribute of an IOD in highdicom's standard tables on each call, and highdicom
   calls it per source image (``is_multiframe_image``: 64 calls for a 64-slice SEG, as many
   again for its SR references), always with the same few arguments. Its result is a pure
   function of (attribute, SOP class, excluded path elements): the tables are module-level
   constants loaded once. The memoized function returns exactly what the original returns
   (``tests/reports/test_highdicom_speedups.py`` compares them over every SOP class) and
   raises the same ``KeyError`` for an unknown SOP class (exceptions are not cached).
   Installed only for the highdicom versions checked (:data:`CHECKED_VERSIONS`, the range
   pinned in pyproject.toml); another version is left untouched.

2. :func:`content_not_copied` lets an SR constructor take a content tree that the caller
   built for it alone without deep-copying it. highdicom's ``_SR.__init__`` deep-copies the
   root content item (``deepcopy(content)``) so that the caller's tree is not altered when
   it converts the copy in place into its content item classes. A tree built by highdicom's
   own templates for one document and dropped afterwards has nobody to protect, and its
   items already have those classes. The context manager gives that one root item, for the
   time of the call, a ``__deepcopy__`` that returns the item itself: no global state (no
   swap of :func:`copy.deepcopy`), so other threads using highdicom are not affected, and
   the attribute is removed afterwards, so a later ``deepcopy`` of the document copies as
   usual. The written bytes are the same (tested).

3. :func:`install` also gives ``highdicom.sr.utils`` (and only it: that module's
   ``collect_evidence`` is its one caller there) a :func:`find_content_items` whose
   recursive search by value type alone reads each item's Value Type string instead of
   building a ``ContentItem`` and a ``CodedConcept`` for every item of the tree. Every SR
   constructor runs that search twice (IMAGE, then COMPOSITE references) to check that its
   evidence covers what the content references: ~9 ms per QC report with 64 source images,
   a third of its construction. Same items in the same order (tested); any other query goes
   to highdicom's function.
"""

from __future__ import annotations

import functools
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import highdicom
import structlog
from pydicom.dataset import Dataset

log = structlog.get_logger(__name__)

#: highdicom versions the memoization was checked against: ``[low, high)``, as pinned in
#: pyproject.toml. Outside it :func:`install` does nothing.
CHECKED_VERSIONS: tuple[tuple[int, int], tuple[int, int]] = ((0, 25), (0, 30))

_install_lock = threading.Lock()
_original_is_attribute_in_iod = None
_original_find_content_items = None


def _version_tuple(version: str) -> tuple[int, int]:
    parts = version.split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return (-1, -1)


def is_checked_version(version: str = highdicom.__version__) -> bool:
    """Whether ``version`` of highdicom is in :data:`CHECKED_VERSIONS`."""
    low, high = CHECKED_VERSIONS
    return low <= _version_tuple(version) < high


def install() -> bool:
    """Memoize ``is_attribute_in_iod`` in every highdicom module that uses it (idempotent).

    Returns:
        True when the memoized function is in place, False when this highdicom version is
        not one the memoization was checked against (nothing is changed then).
    """
    global _original_is_attribute_in_iod, _original_find_content_items
    from highdicom import _standard_utils
    from highdicom.sr import utils as sr_utils

    with _install_lock:
        if _original_is_attribute_in_iod is not None:
            return True
        if not is_checked_version():
            log.debug("highdicom speed-ups not installed: version not checked", version=highdicom.__version__)
            return False
        original = _standard_utils.is_attribute_in_iod
        cached = functools.lru_cache(maxsize=4096)(original)

        @functools.wraps(original)
        def is_attribute_in_iod(attribute: str, sop_class_uid: str,
                                exclude_path_elements: Sequence[str] | None = None) -> bool:
            excluded = None if exclude_path_elements is None else tuple(exclude_path_elements)
            # str(): a pydicom UID and the same plain string are one cache entry.
            return cached(attribute, str(sop_class_uid), excluded)

        is_attribute_in_iod.__wrapped__ = original  # type: ignore[attr-defined]
        # Modules bind the function by name on import (from ... import is_attribute_in_iod);
        # replace every binding of the original, including the one is_multiframe_image uses.
        for name, module in list(sys.modules.items()):
            if (name == "highdicom" or name.startswith("highdicom.")) and \
                    getattr(module, "is_attribute_in_iod", None) is original:
                module.is_attribute_in_iod = is_attribute_in_iod  # type: ignore[attr-defined]
        _original_is_attribute_in_iod = original
        _original_find_content_items = sr_utils.find_content_items
        sr_utils.find_content_items = find_content_items
        return True


def original_is_attribute_in_iod():
    """The unpatched function (for tests and comparisons); highdicom's own before :func:`install`."""
    from highdicom import _standard_utils

    return _original_is_attribute_in_iod or _standard_utils.is_attribute_in_iod


def original_find_content_items():
    """highdicom's own ``find_content_items`` (for tests and comparisons)."""
    from highdicom.sr import utils as sr_utils

    return _original_find_content_items or sr_utils.find_content_items


def find_content_items(dataset: Dataset, name=None, value_type=None, relationship_type=None,
                       recursive: bool = False) -> list[Dataset]:
    """highdicom's ``find_content_items``; a recursive search by value type alone walks the
    tree reading Value Type strings (see the module docstring, item 3).

    Returns:
        The matching content items, depth first in document order, as highdicom's function
        returns them.

    Raises:
        AttributeError: ``dataset`` has no Content Sequence (highdicom's message).
    """
    if name is not None or relationship_type is not None or value_type is None or not recursive:
        return original_find_content_items()(dataset, name=name, value_type=value_type,
                                             relationship_type=relationship_type, recursive=recursive)
    from highdicom.sr.enum import ValueTypeValues

    if not hasattr(dataset, "ContentSequence"):
        raise AttributeError("Data set does not contain a Content Sequence attribute.")
    wanted = ValueTypeValues(value_type).value
    matched: list[Dataset] = []

    def search(node: Dataset) -> None:
        for item in node.ContentSequence:
            if item.ValueType == wanted:
                matched.append(item)
            if hasattr(item, "ContentSequence"):
                search(item)

    search(dataset)
    return matched


@contextmanager
def content_not_copied(root: Dataset) -> Iterator[Dataset]:
    """While the block runs, ``copy.deepcopy(root)`` returns ``root`` itself.

    Use it around one highdicom SR constructor call whose ``content`` was built for that
    document alone (see the module docstring); ``root`` is the content's root item
    (``measurement_report[0]``). Only this one object is affected, only inside the block.
    """
    object.__setattr__(root, "__deepcopy__", lambda memo: root)
    try:
        yield root
    finally:
        object.__delattr__(root, "__deepcopy__")
