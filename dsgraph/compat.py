"""What Python 3.10 lacks and dsgraph uses."""

import sys

if sys.version_info >= (3, 11):
    from typing import assert_never
else:  # pragma: no cover - the CI runs 3.11
    from typing_extensions import assert_never

__all__ = ["assert_never"]
