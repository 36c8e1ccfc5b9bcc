"""`python -m neon.control_plane ...`: run the `neon_local` CLI."""

from __future__ import annotations

import sys

from neon.control_plane.cli import main

sys.exit(main())
