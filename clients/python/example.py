"""The Patronus API from Python, through a client generated from the controller's own OpenAPI
document by openapi-python-client (a standard generator from PyPI): log in, list the sites,
create a policy, and receive and verify the webhook the policy's change sets off.

Run by `crates/patronus/tests/clients.rs` against a live controller; by hand:

    openapi-python-client generate --url https://CONTROLLER/api/v1/openapi.json --meta none \
        --output-path patronus_client
    PATRONUS_URL=https://CONTROLLER PATRONUS_CA_FILE=cert.pem PATRONUS_EMAIL=... \
        PATRONUS_PASSWORD=... python3 example.py

The webhook receiver listens on 127.0.0.1: the controller must be allowed to post there
(`webhook_allowed_networks`, PATRONUS_WEBHOOK_ALLOWED_NETWORKS=127.0.0.0/8).
"""

import hashlib
import hmac
import http.server
import os
import queue
import ssl
import threading
import time

from patronus_client import AuthenticatedClient, Client
from patronus_client.api.auth import login
from patronus_client.api.policies import create_policy
from patronus_client.api.sites import list_sites
from patronus_client.api.webhooks import create_webhook
from patronus_client.models import ErrorBody, LoginRequest, Policy, TokenResponse, WebhookSpec


def verify(secret: str, header: str, body: bytes, tolerance_s: int = 300) -> bool:
    """X-Patronus-Signature: t=<unix seconds>,v1=<hex of HMAC-SHA256(secret, "<t>." + body)>."""
    parts = dict(p.split("=", 1) for p in header.split(","))
    t, sig = parts["t"], parts["v1"]
    if abs(time.time() - int(t)) > tolerance_s:
        return False  # too old or too new: a replay
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(mac, sig)


def receiver() -> tuple[int, "queue.Queue[tuple[dict[str, str], bytes]]"]:
    """A webhook receiver on a free port of 127.0.0.1: what it gets goes to the queue (header
    names in lower case)."""
    got: "queue.Queue[tuple[dict[str, str], bytes]]" = queue.Queue()

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            got.put(({k.lower(): v for k, v in self.headers.items()}, body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server.server_address[1], got


def main() -> None:
    url = os.environ["PATRONUS_URL"]
    tls = ssl.create_default_context(cafile=os.environ["PATRONUS_CA_FILE"])

    tokens = login.sync(
        client=Client(base_url=url, verify_ssl=tls),
        body=LoginRequest(email=os.environ["PATRONUS_EMAIL"], password=os.environ["PATRONUS_PASSWORD"]),
    )
    assert isinstance(tokens, TokenResponse), tokens
    api = AuthenticatedClient(base_url=url, token=tokens.access_token, verify_ssl=tls)

    sites = list_sites.sync(client=api, limit=100)
    assert not isinstance(sites, ErrorBody), sites
    print("sites:", sites.total, sorted(s.name for s in sites.items))

    port, got = receiver()
    hook = create_webhook.sync(
        client=api,
        body=WebhookSpec.from_dict(
            {"url": f"http://127.0.0.1:{port}/hook", "events": ["config.changed"], "description": "python example"}
        ),
    )
    assert not isinstance(hook, ErrorBody) and hook.secret, hook

    stamp = int(time.time())
    policy = create_policy.sync(
        client=api,
        body=Policy.from_dict(
            {
                "name": f"python-voice-{stamp}",
                "order": 10_000 + stamp % 100_000,
                "class": "realtime",
                "match": {"protocol": "udp", "dst_ports": ["5060"]},
            }
        ),
    )
    assert not isinstance(policy, ErrorBody), policy
    print("policy:", policy.name.rsplit("-", 1)[0], "created")

    deadline = time.time() + 30
    while True:
        headers, body = got.get(timeout=max(0.1, deadline - time.time()))
        if b"policy.create" in body:
            break
    signature = headers["x-patronus-signature"]
    assert verify(hook.secret, signature, body), "the signature does not verify"
    assert not verify(hook.secret, signature, body + b" "), "a changed body verified"
    print("webhook:", headers["x-patronus-event"], "signature verified")


if __name__ == "__main__":
    main()
