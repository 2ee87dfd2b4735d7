"""mpay's test suite (trial)."""

from mpay import compiled

if compiled.stale():     # the tests would run code that is not in the checkout
    raise RuntimeError(f"compiled older than their source: {', '.join(compiled.stale())}; "
                       "run make test (or python -m mpay.compiled build, or clean)")
