"""The auto-approving OAuth "middleman" flow that the official dagshub client drives (see dagshub/auth/oauth.py).

1. the browser opens ``/login/oauth/authorize?state=&client_id=&middleman_request_id=R`` -> request R is approved;
2. the client ``POST /login/oauth/middleman`` (form ``request_id=R``) -> JSON string code, once R is approved
   (waits for the approval up to a bounded time, then 400 — never forever);
3. the client ``POST /login/oauth/access_token`` (form ``client_id, code, state``) -> the access token record.
"""
from __future__ import annotations

import datetime
import secrets
import threading
from collections import OrderedDict
from typing import Any, Dict, Optional, Tuple

__all__ = ["OAuthBroker"]

# bounded memory for request ids / codes that a client never came back for
_MAX_PENDING = 1024
# The official client parses "expiry" with dateutil, so "never" would crash it: answer a far-future ISO time.
_EXPIRY = "2099-12-31T23:59:59.000000000Z"


class OAuthBroker:
    """Thread-safe state of the middleman flow; ``token`` is what access_token hands out."""

    def __init__(self, token: str, wait_s: float):
        self.token = token
        self.wait_s = wait_s
        self._cond = threading.Condition()
        self._approved: "OrderedDict[str, str]" = OrderedDict()  # middleman request id -> code
        self._codes: "OrderedDict[str, str]" = OrderedDict()  # unused code -> request id

    def approve(self, request_id: str) -> None:
        """Mark a middleman request approved (what the user's click on "Authorize" does)."""
        with self._cond:
            if request_id not in self._approved:
                code = secrets.token_hex(16)
                self._approved[request_id] = code
                self._codes[code] = request_id
                for table in (self._approved, self._codes):
                    while len(table) > _MAX_PENDING:
                        table.popitem(last=False)
            self._cond.notify_all()

    def wait_for_code(self, request_id: str) -> Optional[str]:
        """The code of an approved request, waiting up to ``wait_s``; None if it was not approved in time."""
        with self._cond:
            self._cond.wait_for(lambda: request_id in self._approved, timeout=self.wait_s)
            return self._approved.pop(request_id, None)

    def exchange(self, code: str) -> Optional[Dict[str, Any]]:
        """The token record for a (single-use) code, or None if the code is unknown or already used."""
        with self._cond:
            if self._codes.pop(code, None) is None:
                return None
        return {"access_token": self.token, "token_type": "bearer", "expiry": _EXPIRY}


def approval_page(request_id: str) -> Tuple[int, bytes]:
    """(status, HTML) of the authorize page."""
    del request_id  # nothing to show; the page only confirms
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    html = (
        "<!DOCTYPE html><html><head><title>streamloader test server</title></head><body>"
        f"<p>Authorized by the streamloader test server at {now}. You can close this window.</p></body></html>"
    )
    return 200, html.encode("utf-8")
