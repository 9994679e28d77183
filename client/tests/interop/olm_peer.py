"""ENVELOPE.md version 2 written again in Python on libolm (python-olm): a peer device for the
cross-language test of the Rust client's Olm (client/tests/olm_interop.rs).

One JSON request per line on stdin, one JSON answer per line on stdout ({"error": "..."} when a
request fails). Keys and signatures travel as standard base64 of their raw bytes, envelopes as
standard base64 of `0x02 || type || the Olm message`.
  {"op": "init", "user_id", "device_id"}          -> {"curve25519", "ed25519"}
  {"op": "upload", "count", "last_resort": bool}  -> {"prekeys": [{key_id, public_key, signature}],
                                                      "last_resort": {...} | null}
  {"op": "verify_prekey", "user_id", "device_id", "signing_key", "prekey": {key_id, public_key,
   signature}, "last_resort": bool}                -> {"ok": bool}
  {"op": "start", "peer", "identity_key", "one_time_key"}   -> {}
  {"op": "encrypt", "peer", "to": {user_id, device_id}, "text"} -> {"envelope", "type"}
  {"op": "decrypt", "peer", "identity_key", "envelope"}       -> {"plaintext": {...}, "new_session"}
"""

import base64
import datetime
import json
import struct
import sys
import uuid

import olm

VERSION = 0x02


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def olm_b64(raw: bytes) -> str:
    """libolm's base64: standard alphabet, unpadded."""
    return base64.b64encode(raw).decode().rstrip("=")


def signed_message(context: bytes, user_id: str, device_id: int, *fields: bytes) -> bytes:
    return context + b"\x00" + uuid.UUID(user_id).bytes + struct.pack(">I", device_id) + b"".join(fields)


class Peer:
    def __init__(self) -> None:
        self.account = olm.Account()
        self.sessions: dict[str, list[olm.Session]] = {}
        self.next_key_id = 0
        self.user_id = ""
        self.device_id = 0

    def init(self, req: dict) -> dict:
        self.user_id, self.device_id = req["user_id"], req["device_id"]
        keys = self.account.identity_keys
        return {"curve25519": b64(unb64(keys["curve25519"])), "ed25519": b64(unb64(keys["ed25519"]))}

    def sign_prekey(self, context: bytes, key_b64: str) -> dict:
        raw = unb64(key_b64)
        key_id = self.next_key_id
        self.next_key_id += 1
        message = signed_message(context, self.user_id, self.device_id, struct.pack(">I", key_id), raw)
        return {"key_id": key_id, "public_key": b64(raw), "signature": b64(unb64(self.account.sign(message)))}

    def upload(self, req: dict) -> dict:
        self.account.generate_one_time_keys(req["count"])
        if req["last_resort"]:
            self.account.generate_fallback_key()
        one_time = self.account.one_time_keys["curve25519"]
        prekeys = [self.sign_prekey(b"sm-prekey", one_time[k]) for k in sorted(one_time)]
        fallback = self.account.fallback_key.get("curve25519", {})
        last_resort = None
        for key in fallback.values():
            last_resort = self.sign_prekey(b"sm-last-resort", key)
        self.account.mark_keys_as_published()
        return {"prekeys": prekeys, "last_resort": last_resort}

    def verify_prekey(self, req: dict) -> dict:
        prekey = req["prekey"]
        context = b"sm-last-resort" if req["last_resort"] else b"sm-prekey"
        message = signed_message(
            context, req["user_id"], req["device_id"], struct.pack(">I", prekey["key_id"]), unb64(prekey["public_key"])
        )
        try:
            olm.ed25519_verify(olm_b64(unb64(req["signing_key"])), message, olm_b64(unb64(prekey["signature"])))
            return {"ok": True}
        except olm.OlmVerifyError:
            return {"ok": False}

    def start(self, req: dict) -> dict:
        session = olm.OutboundSession(
            self.account, olm_b64(unb64(req["identity_key"])), olm_b64(unb64(req["one_time_key"]))
        )
        self.sessions.setdefault(req["peer"], []).insert(0, session)
        return {}

    def encrypt(self, req: dict) -> dict:
        session = self.sessions[req["peer"]][0]
        sent_at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")
        plaintext = json.dumps(
            {
                "v": 1,
                "id": str(uuid.uuid4()),
                "sent_at": sent_at.replace("+00:00", "Z"),
                "text": req["text"],
                "from": {"user_id": self.user_id, "device_id": self.device_id},
                "to": req["to"],
                "client": "libolm",
            },
            ensure_ascii=False,
        )
        message = session.encrypt(plaintext)
        body = unb64(message.ciphertext)
        return {"envelope": b64(bytes([VERSION, message.message_type]) + body), "type": message.message_type}

    def decrypt(self, req: dict) -> dict:
        data = base64.b64decode(req["envelope"], validate=True)
        if len(data) < 2 or data[0] != VERSION or data[1] not in (0, 1):
            raise ValueError("not a version-2 envelope")
        sessions = self.sessions.setdefault(req["peer"], [])
        identity = olm_b64(unb64(req["identity_key"]))
        if data[1] == 0:
            message = olm.OlmPreKeyMessage(olm_b64(data[2:]))
            for session in sessions:
                if session.matches(message, identity):
                    return {"plaintext": json.loads(session.decrypt(message)), "new_session": False}
            session = olm.InboundSession(self.account, message, identity)
            self.account.remove_one_time_keys(session)
            text = session.decrypt(message)
            sessions.insert(0, session)
            return {"plaintext": json.loads(text), "new_session": True}
        message = olm.OlmMessage(olm_b64(data[2:]))
        for session in sessions:
            try:
                text = session.decrypt(message)
            except olm.OlmSessionError:
                continue
            return {"plaintext": json.loads(text), "new_session": False}
        raise ValueError("no session opens it")


def main() -> None:
    peer = Peer()
    for line in sys.stdin:
        req = json.loads(line)
        try:
            answer = getattr(peer, req["op"])(req)
        except Exception as error:  # reported to the test, which decides
            answer = {"error": f"{type(error).__name__}: {error}"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
