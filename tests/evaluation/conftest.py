"""The probe tests run single-threaded, as the self-supervised ones do."""

from ..ssl.conftest import one_thread  # noqa: F401  (autouse)
