"""Who wrote an object: PACS Sentinel's equipment identity, and how to recognise our output.

Every SEG, SR and SC that the node writes carries this identity in the General Equipment
module. :func:`is_own_object` reads it back, so that results sent to the PACS and pushed back
to us (a PACS routing rule, a user re-sending a study) never re-enter the pipelines.
"""

from __future__ import annotations

import datetime
import os
import socket
from functools import lru_cache

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

import pacs_sentinel

#: Manufacturer (0008,0070) of every object we write.
MANUFACTURER = "PACS Sentinel"
#: Manufacturer's Model Name (0008,1090) of every object we write.
MODEL_NAME = "PACS Sentinel AI node"
#: Software Versions (0018,1020): the product version.
SOFTWARE_VERSION = pacs_sentinel.__version__
#: Environment variable that overrides the device serial number (default: the host name).
SERIAL_NUMBER_ENV = "PACS_SENTINEL_SERIAL_NUMBER"



@lru_cache(maxsize=1)
def device_serial_number() -> str:
    """Return the Device Serial Number (0018,1000) of this installation.

    The value is ``$PACS_SENTINEL_SERIAL_NUMBER`` when set, otherwise the host name, cut to
    the 64 characters an LO value may hold. It is stable across restarts.
    """
    value = os.environ.get(SERIAL_NUMBER_ENV) or socket.gethostname() or "unknown"
    return value.replace("\\", "/")[:64]


@lru_cache(maxsize=1)
def device_uid() -> str:
    """Return a UID identifying this installation as an SR device observer (stable)."""
    return generate_uid(entropy_srcs=[MANUFACTURER, MODEL_NAME, device_serial_number()])


def equipment_attributes() -> dict[str, str]:
    """Return the General Equipment keyword arguments highdicom's constructors accept."""
    return {
        "manufacturer": MANUFACTURER,
        "manufacturer_model_name": MODEL_NAME,
        "software_versions": SOFTWARE_VERSION,
        "device_serial_number": device_serial_number(),
    }


def creation_times() -> dict[str, datetime.date | datetime.time]:
    """Return Series and Content Date/Time keyword arguments, all from one clock reading.

    highdicom fills Content Date/Time itself but leaves the series dates out; PACS worklists
    sort and filter on them, so every object we write carries both, equal.
    """
    now = datetime.datetime.now()
    return {
        "series_date": now.date(),
        "series_time": now.time(),
        "content_date": now.date(),
        "content_time": now.time(),
    }


def is_own_object(ds: Dataset) -> bool:
    """Tell whether ``ds`` was written by PACS Sentinel (any installation, any version).

    The check reads only the General Equipment module: Manufacturer equals
    :data:`MANUFACTURER` and Manufacturer's Model Name equals :data:`MODEL_NAME`. Objects
    another system derived from ours carry that system's equipment and are not ours.

    Args:
        ds: A dataset, possibly read with ``stop_before_pixels`` or only partly decoded.

    Returns:
        True when the object is one of our results.
    """
    try:
        manufacturer = str(ds.get("Manufacturer", "") or "").strip()
        model = str(ds.get("ManufacturerModelName", "") or "").strip()
    except Exception:  # a malformed element must not crash the ingest path; treat as foreign
        return False
    return manufacturer == MANUFACTURER and model == MODEL_NAME
