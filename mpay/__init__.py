"""mpay: an open mobile payment platform; a telephone number (E.164) is the account."""

import os as _os

if _os.environ.get("MPAY_INTERPRETED"):      # run the sources, though compiled (compiled.py)
    from mpay import compiled as _compiled
    _compiled.prefer_sources()
