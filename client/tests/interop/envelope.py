"""ENVELOPE.md written again in Python, on pyhpke: an independent implementation for the
cross-language test of the Rust client (client/tests/interop.rs).

Reads one JSON request on stdin, writes one JSON answer on stdout:
  {"op": "seal", "sender_sk_pem", "sender_pk_pem", "recipient_pk_pem", "sender_id", "recipient_id",
   "texts": [...]}                       -> {"envelopes": [base64, ...], "ids": [...]}
  {"op": "open", "recipient_sk_pem", "sender_pk_pem", "sender_id", "recipient_id",
   "envelopes": [base64, ...]}           -> {"results": [{"ok": true, "plaintext": {...}} |
                                                         {"ok": false, "error": "..."}]}
"""

import base64
import datetime
import json
import sys
import uuid

from pyhpke import AEADId, CipherSuite, KDFId, KEMId, KEMKey

SUITE = CipherSuite.new(KEMId.DHKEM_X25519_HKDF_SHA256, KDFId.HKDF_SHA256, AEADId.CHACHA20_POLY1305)
VERSION = 0x01
LABEL = b"secure-messenger/v1\x00"


def info(sender_id: str, recipient_id: str) -> bytes:
    return LABEL + uuid.UUID(sender_id).bytes + uuid.UUID(recipient_id).bytes


def seal(req: dict) -> dict:
    sks = KEMKey.from_pem(req["sender_sk_pem"])
    pkr = KEMKey.from_pem(req["recipient_pk_pem"])
    envelopes, ids = [], []
    for text in req["texts"]:
        mid = str(uuid.uuid4())
        sent_at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")
        pt = json.dumps(
            {"v": 1, "id": mid, "sent_at": sent_at.replace("+00:00", "Z"), "text": text, "client": "pyhpke"},
            ensure_ascii=False,
        ).encode()
        enc, ctx = SUITE.create_sender_context(pkr, info(req["sender_id"], req["recipient_id"]), sks=sks)
        ct = ctx.seal(pt, b"")
        assert len(enc) == 32
        envelopes.append(base64.b64encode(bytes([VERSION]) + enc + ct).decode())
        ids.append(mid)
    return {"envelopes": envelopes, "ids": ids}


def open_(req: dict) -> dict:
    skr = KEMKey.from_pem(req["recipient_sk_pem"])
    pks = KEMKey.from_pem(req["sender_pk_pem"])
    results = []
    for b64 in req["envelopes"]:
        data = base64.b64decode(b64, validate=True)
        try:
            if len(data) < 1 + 32 + 16 or data[0] != VERSION:
                raise ValueError("not a version-1 envelope")
            ctx = SUITE.create_recipient_context(
                data[1:33], skr, info(req["sender_id"], req["recipient_id"]), pks=pks
            )
            pt = json.loads(ctx.open(data[33:], b"").decode())
            if pt.get("v") != 1:
                raise ValueError("unknown plaintext version")
            results.append({"ok": True, "plaintext": pt})
        except Exception as e:  # noqa: BLE001 - every refusal is an answer here
            results.append({"ok": False, "error": type(e).__name__})
    return {"results": results}


def main() -> None:
    req = json.load(sys.stdin)
    answer = {"seal": seal, "open": open_}[req["op"]](req)
    json.dump(answer, sys.stdout, ensure_ascii=False)


if __name__ == "__main__":
    main()
