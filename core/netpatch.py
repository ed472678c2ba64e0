"""Every patch l3spot applies to pynetdicom's internals, in one module.

Patching a library's internals is a last resort: each patch here names the pynetdicom
version it was written against (:data:`PYNETDICOM_VERSION`, pinned exactly in
``pyproject.toml``), and ``tests/unit/test_netpatch.py`` fails when a patch can no longer
attach to the installed version.
"""

from __future__ import annotations

from typing import Any

#: The pynetdicom release these patches were written against (pinned in pyproject.toml).
PYNETDICOM_VERSION = "3.0.4"


def guard_scu_reactor(assoc: Any) -> None:
    """Keep a requestor association's reactor from taking the responses its caller awaits.

    pynetdicom 3.0.4 runs a reactor thread on requestor associations too; it looks at the
    DIMSE queue with ``get_msg(block=False)`` (``Association._run_reactor``) between the
    caller's requests. ``send_c_store`` pauses it with ``_reactor_checkpoint.clear()`` then
    ``while not _is_paused``, but ``_is_paused`` is still True from the reactor's previous
    pause when the reactor was woken by the previous ``send_c_store`` and has not run yet
    (a busy CPU, the GIL): the request goes out, the reactor resumes, takes the C-STORE-RSP
    off the queue and drops it ("Received unexpected C-STORE service message"), and
    ``send_c_store`` waits its whole DIMSE timeout (30 s) and aborts. Only the reactor calls
    ``get_msg`` without blocking (every ``send_*`` blocks), so answering it "no message"
    leaves every response to the ``send_*`` waiting for it. Use on associations that only
    send requests (C-STORE, C-ECHO); call it right after the association is established.
    See docs/reliability.md "The 30 s C-STORE stall".
    """
    get_msg = assoc.dimse.get_msg

    def get_msg_for_callers_only(block: bool = False) -> Any:
        if not block:  # the reactor's look: responses belong to the waiting send_*
            return None, None
        return get_msg(block=True)

    assoc.dimse.get_msg = get_msg_for_callers_only
