"""
Tests for L{msgmux.oslo.tokens}: signed reply tokens verify only for the link,
direction and key they were issued under, and anything else is a
L{TokenError}; canaries only from a holder of the key; keys rotate without
refusing what was signed before.
"""

from __future__ import annotations

import base64
import string
from typing import Any

import cbor2
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from msgmux.oslo.tokens import MAX_VERIFY_KEYS, ReplyToken, TokenError, TokenSigner, key_id

KEY = b"k" * 32
SIGNER = TokenSigner(KEY)
TOKEN = SIGNER.issue("tenant-a", "down", "6a1c0e2f3b4d", "reply_0123abcd", 1700000000.25)
PREFIX = "mmx2."
#: What may follow the prefix: the base64url alphabet, the separator, padding and noise.
ASCII_TAIL = string.ascii_letters + string.digits + "-_.=+/ \0"
#: Text without lone surrogates: issue() cannot encode those yet (UnicodeEncodeError, reported).
UNICODE = st.text(alphabet=st.characters(blacklist_categories=("Cs",)))


def flip(text: str, index: int) -> str:
    """C{text} with the base64url character at C{index} replaced by a different one."""
    replacement = "B" if text[index] != "B" else "C"
    return text[:index] + replacement + text[index + 1 :]


def b64(data: bytes) -> str:
    """Unpadded base64url, as tokens use."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class RoundTripTests(SynchronousTestCase):
    """A token verifies back to what it was issued with."""

    def test_round_trip(self) -> None:
        """verify() returns the msg_id, reply queue and deadline given to issue()."""
        token = SIGNER.verify("tenant-a", "down", TOKEN)
        self.assertIsInstance(token, ReplyToken)
        self.assertEqual((token.msg_id, token.reply_queue, token.deadline), ("6a1c0e2f3b4d", "reply_0123abcd", 1700000000.25))

    def test_shape(self) -> None:
        """Tokens are short printable ASCII with the mmx2. prefix, usable as an oslo _msg_id."""
        self.assertTrue(TOKEN.startswith(PREFIX))
        self.assertEqual(TOKEN.count("."), 2)
        self.assertTrue(set(TOKEN) <= set(string.ascii_letters + string.digits + "-_."), TOKEN)
        self.assertLess(len(TOKEN), 100)

    def test_deadline_rounded(self) -> None:
        """Deadlines keep millisecond precision and come back as floats."""
        self.assertEqual(SIGNER.verify("l", "down", SIGNER.issue("l", "down", "m", "r", 12.3456789)).deadline, 12.346)
        deadline = SIGNER.verify("l", "down", SIGNER.issue("l", "down", "m", "r", 5)).deadline
        self.assertEqual((deadline, type(deadline)), (5.0, float))

    def test_unicode_fields(self) -> None:
        """Non-ASCII ids and queue names survive; the token itself stays ASCII."""
        token = SIGNER.issue("tenant-ü", "down", "msg-é", "reply-☃", 1.0)
        self.assertTrue(token.isascii())
        verified = SIGNER.verify("tenant-ü", "down", token)
        self.assertEqual((verified.msg_id, verified.reply_queue), ("msg-é", "reply-☃"))

    def test_shared_key(self) -> None:
        """Another signer with the same key verifies the token (control halves share reply_key_file)."""
        self.assertEqual(TokenSigner(KEY).verify("tenant-a", "down", TOKEN).msg_id, "6a1c0e2f3b4d")

    def test_short_key(self) -> None:
        """Keys shorter than 16 bytes are refused; 16 bytes are enough."""
        self.assertRaises(ValueError, TokenSigner, b"k" * 15)
        TokenSigner(b"k" * 16)

    @settings(deadline=None)
    @given(UNICODE, UNICODE, st.floats(min_value=0, max_value=2**40), UNICODE.filter(bool))
    def test_round_trip_property(self, msg_id: str, reply_queue: str, deadline: float, link: str) -> None:
        """Any ids, deadline and link round-trip, and no other link accepts the token."""
        token = SIGNER.issue(link, "down", msg_id, reply_queue, deadline)
        verified = SIGNER.verify(link, "down", token)
        self.assertEqual((verified.msg_id, verified.reply_queue), (msg_id, reply_queue))
        self.assertEqual(verified.deadline, round(deadline, 3))
        self.assertRaises(TokenError, SIGNER.verify, link + "x", "down", token)
        self.assertRaises(TokenError, SIGNER.verify, link, "up", token)


class RefusalTests(SynchronousTestCase):
    """Everything but a genuine token for this link and key is a TokenError."""

    def refuse(self, token: str, link: str = "tenant-a", signer: TokenSigner = SIGNER) -> None:
        """Assert that C{signer} refuses C{token} on C{link}."""
        self.assertRaises(TokenError, signer.verify, link, "down", token)

    def test_other_link(self) -> None:
        """A token issued for one link is refused on another."""
        self.refuse(TOKEN, "tenant-b")
        self.refuse(TOKEN, "tenant-a ")
        self.refuse(TOKEN, "")

    def test_other_direction(self) -> None:
        """A token of a call relayed one way does not verify for the other: a tenant cannot pass its own call's token off as a reply."""
        self.refuse(SIGNER.issue("tenant-a", "up", "m", "reply_victim", 1.0))
        self.assertRaises(TokenError, SIGNER.verify, "tenant-a", "up", TOKEN)

    def test_other_key(self) -> None:
        """A token signed under another key is refused."""
        self.refuse(TOKEN, signer=TokenSigner(b"x" * 32))
        self.refuse(TokenSigner(b"x" * 32).issue("tenant-a", "down", "6a1c0e2f3b4d", "reply_0123abcd", 1700000000.25))

    def test_tampered_payload(self) -> None:
        """Changing any character of the payload breaks the signature."""
        payload_end = TOKEN.rindex(".")
        for index in range(len(PREFIX), payload_end):
            self.refuse(flip(TOKEN, index))

    def test_swapped_payload(self) -> None:
        """A payload naming another reply queue, with the original signature, is refused."""
        payload = b64(cbor2.dumps(["6a1c0e2f3b4d", "reply_attacker", 1700000000.25, 0]))
        self.refuse(PREFIX + payload + TOKEN[TOKEN.rindex(".") :])

    def test_tampered_mac(self) -> None:
        """Changing a signature character that carries bits breaks the signature."""
        mac_start = TOKEN.rindex(".") + 1
        # The last of the 22 characters holds 2 signature bits and 4 padding bits.
        for index in range(mac_start, len(TOKEN) - 1):
            self.refuse(flip(TOKEN, index))

    def test_truncated(self) -> None:
        """Every proper prefix of a token is refused."""
        for end in range(len(TOKEN)):
            self.refuse(TOKEN[:end])

    def test_missing_parts(self) -> None:
        """Tokens without a signature or a payload are refused."""
        payload, _, mac = TOKEN[len(PREFIX) :].partition(".")
        for token in (PREFIX + payload, PREFIX + payload + ".", PREFIX + "." + mac, PREFIX + mac, PREFIX + ".", PREFIX):
            self.refuse(token)

    def test_not_prefixed(self) -> None:
        """Strings without the mmx2. prefix, such as plain oslo msg_ids, are refused."""
        for token in ("", "6a1c0e2f3b4d", TOKEN[len(PREFIX) :], "mmx1." + TOKEN[len(PREFIX) :], "MMX2." + TOKEN[len(PREFIX) :], " " + TOKEN):
            self.refuse(token)

    def test_garbage_after_prefix_refused(self) -> None:
        """Garbage after the prefix is refused."""
        for token in ("mmx2.!!!.???", "mmx2.a.b", "mmx2.a.b.c", "mmx2.====.====", "mmx2.\0.\0", "mmx2.AAAA.AAAAAAAAAAAAAAAAAAAAAA"):
            self.refuse(token)

    def test_overlong(self) -> None:
        """Tokens longer than 1024 characters are refused, even when correctly signed."""
        long_token = SIGNER.issue("tenant-a", "down", "m" * 1000, "r", 1.0)
        self.assertGreater(len(long_token), 1024)
        self.refuse(long_token)
        self.refuse(TOKEN + "A" * 1024)

    def test_signed_garbage(self) -> None:
        """A correctly signed payload that is not [str, str, number] is still a TokenError."""
        for value in (
            b"\xff",
            cbor2.dumps([1, "r", 2.0, 0]),
            cbor2.dumps(["m", "r", 2.0]),
            cbor2.dumps(["m", "r", True, 0]),
            cbor2.dumps(["m", "r", 2.0, "0"]),
            cbor2.dumps({"a": 1}),
        ):
            payload = b64(value)
            mac = b64(SIGNER._mac(KEY, "tenant-a", "down", payload))
            self.refuse(f"{PREFIX}{payload}.{mac}")

    @settings(deadline=None)
    @given(st.text(max_size=1100))
    def test_arbitrary_text(self, token: str) -> None:
        """Arbitrary text is refused with TokenError and nothing else."""
        self.refuse(token)

    @settings(deadline=None)
    @given(st.text(alphabet=ASCII_TAIL, max_size=200))
    def test_arbitrary_prefixed_ascii(self, tail: str) -> None:
        """Arbitrary ASCII after the prefix is refused with TokenError and nothing else."""
        self.refuse(PREFIX + tail)


class SerialTests(SynchronousTestCase):
    def test_tokens_are_unique(self) -> None:
        """Two calls with the same ids and deadline get different tokens (each counts against the in-flight limit)."""
        first = SIGNER.issue("l", "down", "m", "r", 10.0)
        second = SIGNER.issue("l", "down", "m", "r", 10.0)
        self.assertNotEqual(first, second)
        self.assertEqual(SIGNER.verify("l", "down", first).msg_id, SIGNER.verify("l", "down", second).msg_id)

    def test_unknown_direction(self) -> None:
        """Only "down" and "up" are directions."""
        self.assertRaises(ValueError, SIGNER.issue, "l", "sideways", "m", "r", 1.0)
        self.assertRaises(ValueError, SIGNER.verify, "l", "sideways", TOKEN)


class CanaryTests(SynchronousTestCase):
    """Canaries prove a link's health, so only the key holder can make them."""

    def test_round_trip(self) -> None:
        """A canary verifies for its link and gives back its send time."""
        self.assertEqual(SIGNER.verify_canary("tenant-a", SIGNER.canary("tenant-a", 1700000000.125)), 1700000000.125)

    def test_foreign_or_tampered_canaries_refused(self) -> None:
        """Canaries of another link or key, tampered, oversized or garbage are refused with TokenError."""
        good = SIGNER.canary("tenant-a", 100.5)
        bodies = [
            SIGNER.canary("tenant-b", 100.5),
            TokenSigner(b"x" * 32).canary("tenant-a", 100.5),
            good.replace(b"100.5", b"101.5"),
            b'{"sent": "100.5", "link": "tenant-a"}',
            b'{"sent": 100.5, "link": "tenant-a", "mac": "x"}',
            b'{"sent": "nan", "link": "tenant-a", "mac": "x"}',
            b'{"sent": "1' + b"0" * 400 + b'", "link": "tenant-a", "mac": "x"}',
            b"[" * 100000,
            b"\xff\xfe",
            b"not json",
            good + b" " * 600,
        ]
        for body in bodies:
            self.assertRaises(TokenError, SIGNER.verify_canary, "tenant-a", body)

    @settings(deadline=None)
    @given(st.binary(max_size=600))
    def test_arbitrary_bytes(self, body: bytes) -> None:
        """Arbitrary bytes are refused with TokenError and nothing else."""
        self.assertRaises(TokenError, SIGNER.verify_canary, "tenant-a", body)


OLD, NEW = b"o" * 32, b"n" * 32


def call(signer: TokenSigner, msg_id: str = "m") -> str:
    """A token for a down call on link l."""
    return signer.issue("l", "down", msg_id, "reply_q", 1e9)


def verifies(signer: TokenSigner, token: str) -> bool:
    try:
        signer.verify("l", "down", token)
    except TokenError:
        return False
    return True


class RotationTests(SynchronousTestCase):
    """Several keys: one signs, all verify; keys rotate across control halves without refusing calls in flight."""

    def test_verification_keys(self) -> None:
        """A signer verifies under its signing key and its verification keys, and signs only with the first."""
        signer = TokenSigner(NEW, [OLD])
        self.assertEqual(signer.verify("l", "down", call(TokenSigner(OLD), "before")).msg_id, "before")
        self.assertEqual(signer.verify("l", "down", call(signer, "after")).msg_id, "after")
        self.assertRaises(TokenError, TokenSigner(OLD).verify, "l", "down", call(signer))
        self.assertEqual(TokenSigner(NEW).verify("l", "down", call(signer, "new")).msg_id, "new")

    def test_procedure_across_two_halves(self) -> None:
        """
        The documented procedure, on two control halves that answer each
        other's calls and are reloaded one after the other: no token issued
        by either at any step is refused by either until the old key is
        dropped after the calls signed with it have expired.
        """
        first, second = TokenSigner(OLD), TokenSigner(OLD)
        in_flight = [call(first, "0a"), call(second, "0b")]

        def everyone_verifies() -> None:
            for token in in_flight:
                for half in (first, second):
                    half.verify("l", "down", token)

        steps = [
            (first, OLD, [NEW]), (second, OLD, [NEW]),  # 1. the new key verifies everywhere
            (first, NEW, [OLD]), (second, NEW, [OLD]),  # 2. then signs, one half after the other
        ]  # fmt: skip
        for index, (half, key, others) in enumerate(steps):
            half.use_keys(key, others)
            everyone_verifies()
            in_flight += [call(first, f"{index}a"), call(second, f"{index}b")]
            everyone_verifies()
        # 3. Once calls signed with the old key have expired, drop it.
        old_calls = [token for token in in_flight if verifies(TokenSigner(OLD), token)]
        self.assertEqual(len(old_calls), 7)  # all made before a half's step 2, by that half
        for half in (first, second):
            half.use_keys(NEW)
        for token in in_flight:
            for half in (first, second):
                if token in old_calls:
                    self.assertRaises(TokenError, half.verify, "l", "down", token)
                else:
                    half.verify("l", "down", token)

    def test_canaries_across_rotation(self) -> None:
        """A canary sent before a rotation verifies after it, and no longer once its key is dropped."""
        signer = TokenSigner(OLD)
        before = signer.canary("tenant-a", 5.0)
        signer.use_keys(NEW, [OLD])
        self.assertEqual(signer.verify_canary("tenant-a", before), 5.0)
        after = signer.canary("tenant-a", 6.0)
        self.assertRaises(TokenError, TokenSigner(OLD).verify_canary, "tenant-a", after)
        signer.use_keys(NEW)
        self.assertRaises(TokenError, signer.verify_canary, "tenant-a", before)
        self.assertEqual(signer.verify_canary("tenant-a", after), 6.0)

    def test_bad_keys_change_nothing(self) -> None:
        """Too many verification keys, or a short one, are refused, and the keys in use stay."""
        signer = TokenSigner(OLD)
        spare = [bytes([65 + i]) * 16 for i in range(MAX_VERIFY_KEYS + 1)]
        self.assertRaises(ValueError, signer.use_keys, NEW, spare)
        self.assertRaises(ValueError, signer.use_keys, NEW, [b"short"])
        self.assertRaises(ValueError, TokenSigner, NEW, [b"x" * 15])
        self.assertEqual(signer.key_ids(), {"signing": key_id(OLD), "verifying": []})
        self.assertTrue(verifies(TokenSigner(OLD), call(signer)))
        signer.use_keys(NEW, spare[:MAX_VERIFY_KEYS])
        self.assertEqual(len(signer.key_ids()["verifying"]), MAX_VERIFY_KEYS)

    def test_verification_cost(self) -> None:
        """
        A token signed by the signing key costs one HMAC; one from a
        verification key or a forgery at most one per key, and a key listed
        twice is tried once.
        """
        signer = TokenSigner(NEW, [OLD, OLD, b"x" * 32])
        macs: list[bytes] = []
        real = signer._mac

        def counting(key: bytes, *rest: Any) -> bytes:
            macs.append(key)
            return real(key, *rest)

        self.patch(signer, "_mac", counting)
        for token, expected in ((call(signer), 1), (call(TokenSigner(OLD)), 2), (call(TokenSigner(b"z" * 32)), 3)):
            del macs[:]
            try:
                signer.verify("l", "down", token)
            except TokenError:
                pass
            self.assertEqual(len(macs), expected, token)
        self.assertEqual(signer.key_ids(), {"signing": key_id(NEW), "verifying": [key_id(OLD), key_id(b"x" * 32)]})

    def test_key_ids(self) -> None:
        """Key ids are short, stable, differ between keys, and do not contain the key."""
        self.assertEqual(key_id(NEW), key_id(b"n" * 32))
        self.assertNotEqual(key_id(NEW), key_id(OLD))
        self.assertRegex(key_id(NEW), r"^[0-9a-f]{8}$")
