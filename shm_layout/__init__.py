"""The binary ABI of asirt's shared region.

Layering: this package imports only numpy, posix_ipc and the standard library; it never
imports ``asirt`` or ``workers``. Numpy structured dtypes defined here are the single source
of truth for every offset and size in the region.
"""
from shm_layout.errors import AsirtError, LayoutMismatch, SegmentMissing
from shm_layout.header import HEADER_DTYPE, LAYOUT_VERSION, MAGIC, RegionState
from shm_layout.sections import (CORE_DTYPE, HIST_BUCKETS, METRIC_DTYPE, SLOT_DTYPE, Section,
                                 WorkerState, section_dtype)
from shm_layout.region import Region, list_leftovers, reclaim
# Importing these registers their sections, so every attach knows their dtypes.
from shm_layout import asi as _asi  # noqa: F401,E402
from shm_layout import cpu as _cpu  # noqa: F401,E402
from shm_layout import sync as _sync  # noqa: F401,E402

__all__ = [
    "AsirtError", "LayoutMismatch", "SegmentMissing", "HEADER_DTYPE", "LAYOUT_VERSION", "MAGIC",
    "RegionState", "CORE_DTYPE", "HIST_BUCKETS", "METRIC_DTYPE", "SLOT_DTYPE", "Section",
    "WorkerState", "section_dtype", "Region", "list_leftovers", "reclaim",
]
