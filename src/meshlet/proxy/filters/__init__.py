"""HTTP filters; importing the package registers the built-in ones."""

from meshlet.proxy.filters import fault as _fault  # noqa: F401
from meshlet.proxy.filters import local_ratelimit as _local_ratelimit  # noqa: F401
