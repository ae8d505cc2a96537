"""Every method, registered by its Dassl name on import. One line per module."""

from trainers import (
    coop,  # noqa: F401
    zsclip,  # noqa: F401
)
