"""mpay's test suite (trial)."""

from mpay import compiled

_REFUSAL = compiled.refusal()
if _REFUSAL is not None:     # the tests would run code that is not in the checkout
    raise RuntimeError(_REFUSAL)
