# The control API runs in process here as in the unit suite, with the same cheap
# password-hashing parameters.
from tests.unit.conftest import _cheap_password_hashing

__all__ = ["_cheap_password_hashing"]
