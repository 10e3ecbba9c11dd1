"""Unit tests of hookd_core/verify.py: every scheme against published vectors where they exist, then
valid, wrong-secret, rotated-secret, expired-timestamp and malformed-header cases, and check()."""

import base64
import binascii
import hashlib
import hmac
import unittest

from hookd_core import config, verify
from hookd_core.api import BadSignature, Headers
from handlers.hook import Handler

# Standard Webhooks spec / reference-library example (peers.md §2).
SW_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SW_ID, SW_TS = "msg_p5jXN8AQM9LWM0D4loKWxJek", "1614265330"
SW_BODY = b'{"test": 2432232314}'
SW_SIG = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="

# GitHub's documented example (docs.github.com "Validating webhook deliveries").
GH_SECRET, GH_BODY = "It's a Secret to Everybody", b"Hello, World!"
GH_SIG = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"

# RFC 8032 §7.1 TEST 1 and TEST 2 (seed, public key, message, signature).
RFC8032 = [
    ("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
     "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a", "",
     "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"),
    ("4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
     "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c", "72",
     "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00"),
]


def section(**values):
    """A [hook:t] section as the core builds it (keys with dots are given with '_' here)."""
    values = {k.replace("_", ".") if k.startswith(("signature_", "token_")) else k: v
              for k, v in values.items()}
    return config.Section("hook:t", values, Handler.KEYS)


def sw_headers(msg_id, stamp, signature):
    return {"webhook-id": msg_id, "webhook-timestamp": stamp, "webhook-signature": signature}


def sw_sign(secret, msg_id, stamp, body):
    key = verify.whsec_key(secret)
    mac = hmac.new(key, ("%s.%s." % (msg_id, stamp)).encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def stripe_header(secret, stamp, body, extra=""):
    mac = hmac.new(secret.encode(), stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return "t=%s,v1=%s%s" % (stamp, mac, extra)


def _encode_point(p):
    zinv = pow(p[2], verify._P - 2, verify._P)
    x, y = p[0] * zinv % verify._P, p[1] * zinv % verify._P
    return (y | ((x & 1) << 255)).to_bytes(32, "little")


def ed25519_sign(seed, message):
    """RFC 8032 §5.1.6 signing (tests only: the product only verifies). Returns (public, signature)."""
    h = hashlib.sha512(seed).digest()
    a = (int.from_bytes(h[:32], "little") & ((1 << 254) - 8)) | (1 << 254)
    public = _encode_point(verify._mul(a, verify._G))
    r = int.from_bytes(hashlib.sha512(h[32:] + message).digest(), "little") % verify._L
    big_r = _encode_point(verify._mul(r, verify._G))
    k = int.from_bytes(hashlib.sha512(big_r + public + message).digest(), "little") % verify._L
    return public, big_r + ((r + k * a) % verify._L).to_bytes(32, "little")


class StandardWebhooksTest(unittest.TestCase):
    def check(self, headers, body=SW_BODY, secrets=(SW_SECRET,), now=int(SW_TS), tolerance=300):
        verify.standard_webhooks(headers, body, list(secrets), tolerance, now)

    def test_spec_example_verifies(self):
        self.check(sw_headers(SW_ID, SW_TS, SW_SIG))

    def test_secret_without_prefix_verifies(self):
        self.check(sw_headers(SW_ID, SW_TS, SW_SIG), secrets=[SW_SECRET[len("whsec_"):]])

    def test_wrong_secret_is_refused(self):
        other = "whsec_" + base64.b64encode(b"another secret of 24 bytes").decode()
        with self.assertRaises(BadSignature):
            self.check(sw_headers(SW_ID, SW_TS, SW_SIG), secrets=[other])

    def test_rotated_secret_either_one_verifies(self):
        old = "whsec_" + base64.b64encode(b"the old secret, 24 bytes").decode()
        self.check(sw_headers(SW_ID, SW_TS, SW_SIG), secrets=[old, SW_SECRET])
        both = sw_sign(old, SW_ID, SW_TS, SW_BODY) + " " + SW_SIG
        self.check(sw_headers(SW_ID, SW_TS, both), secrets=[SW_SECRET])

    def test_tampered_body_or_id_is_refused(self):
        with self.assertRaises(BadSignature):
            self.check(sw_headers(SW_ID, SW_TS, SW_SIG), body=SW_BODY + b" ")
        with self.assertRaises(BadSignature):
            self.check(sw_headers(SW_ID + "x", SW_TS, SW_SIG))

    def test_expired_and_future_timestamps_are_refused(self):
        self.check(sw_headers(SW_ID, SW_TS, SW_SIG), now=int(SW_TS) + 300)
        for now in (int(SW_TS) + 301, int(SW_TS) - 301):
            with self.assertRaises(BadSignature):
                self.check(sw_headers(SW_ID, SW_TS, SW_SIG), now=now)

    def test_svix_header_names_verify_as_svix_verify_does(self):
        """svix/svix-webhooks python/svix/webhooks.py Webhook.verify: the svix-* triple, else webhook-*."""
        svix = {"svix-id": SW_ID, "svix-timestamp": SW_TS, "svix-signature": SW_SIG}
        self.check(svix)
        self.check({k.upper(): v for k, v in svix.items()})  # header names are case-insensitive
        mine = sw_sign(SW_SECRET, "msg_2", SW_TS, SW_BODY)
        self.check({"svix-id": "msg_2", "svix-timestamp": SW_TS, "svix-signature": mine})
        with self.assertRaises(BadSignature):  # svix-id is signed: another id does not verify
            self.check(dict(svix, **{"svix-id": "msg_other"}))
        with self.assertRaises(BadSignature):  # a triple is taken whole, never mixed
            self.check({"svix-id": SW_ID, "webhook-timestamp": SW_TS, "svix-signature": SW_SIG})

    def test_the_readers_headers_and_every_base64_form_get_the_general_paths_verdicts(self):
        # An api.Headers (what the reader yields) is looked up in its own index, and base64 in its strict
        # form is decoded in one C call: both must decide as the general path (a dict, b64decode) does.
        body = SW_SIG[3:]
        for text in (body, body.rstrip("="), body + "=", body + "==", " " + body, "=" + body, body[:-1] + "A",
                     "", "QUJD==", "QUJD=", "QQ", "QQ=", "QQ==", "QQ===", "Q", "QU=J", "QQ==QQ==", "Q\nQ=="):
            with self.subTest(text=text):
                try:
                    expected = base64.b64decode(text, validate=True)
                except (ValueError, binascii.Error):
                    expected = None
                self.assertEqual(verify._decode(text, "base64"), expected)
        svix = {"svix-id": SW_ID, "svix-timestamp": SW_TS, "svix-signature": SW_SIG}
        for headers in (sw_headers(SW_ID, SW_TS, SW_SIG), svix, sw_headers(SW_ID, SW_TS, " %s\xa0" % SW_SIG),
                        sw_headers("\xa0", SW_TS, SW_SIG), sw_headers(SW_ID, SW_TS, ""), dict(svix, **{"webhook-id": SW_ID}),
                        sw_headers(SW_ID, SW_TS, SW_SIG + "=="), sw_headers(SW_ID, SW_TS, SW_SIG[:-1])):
            with self.subTest(headers=headers):
                verdicts = []
                for given in (headers, Headers(list(headers.items()))):
                    try:
                        verdicts.append(self.check(given))
                    except BadSignature as e:
                        verdicts.append(str(e))
                self.assertEqual(verdicts[0], verdicts[1])

    def test_malformed_headers_are_401_not_exceptions(self):
        cases = [
            {"webhook-timestamp": SW_TS, "webhook-signature": SW_SIG},
            sw_headers(SW_ID, "16142653.30", SW_SIG),
            sw_headers(SW_ID, "", SW_SIG),
            sw_headers(SW_ID, SW_TS, "v1,not*base64"),
            sw_headers(SW_ID, SW_TS, "v1"),
            sw_headers(SW_ID, SW_TS, "g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="),
            sw_headers(SW_ID, SW_TS, "v2," + SW_SIG[3:]),
            sw_headers(SW_ID, SW_TS, ",,, v1, v1a,xx"),
        ]
        for headers in cases:
            with self.subTest(headers=headers), self.assertRaises(BadSignature):
                self.check(headers)

    def test_v1a_ed25519_signature_verifies_with_whpk_key(self):
        public, sig = ed25519_sign(b"\x07" * 32, ("%s.%s." % (SW_ID, SW_TS)).encode() + SW_BODY)
        whpk = "whpk_" + base64.b64encode(public).decode()
        header = "v1a," + base64.b64encode(sig).decode()
        self.check(sw_headers(SW_ID, SW_TS, header), secrets=[whpk])
        with self.assertRaises(BadSignature):
            self.check(sw_headers(SW_ID, SW_TS, header), body=b"{}", secrets=[whpk])
        other = "whpk_" + base64.b64encode(ed25519_sign(b"\x08" * 32, b"")[0]).decode()
        with self.assertRaises(BadSignature):
            self.check(sw_headers(SW_ID, SW_TS, header), secrets=[other])


class Ed25519Test(unittest.TestCase):
    def test_rfc8032_vectors(self):
        for seed, public, message, signature in RFC8032:
            pub, msg, sig = bytes.fromhex(public), bytes.fromhex(message), bytes.fromhex(signature)
            self.assertTrue(verify.ed25519_verify(pub, msg, sig))
            self.assertFalse(verify.ed25519_verify(pub, msg + b"x", sig))
            self.assertFalse(verify.ed25519_verify(pub, msg, sig[:63] + bytes([sig[63] ^ 1])))
            self.assertEqual(ed25519_sign(bytes.fromhex(seed), msg), (pub, sig))

    def test_malformed_keys_and_signatures_are_false(self):
        pub, msg, sig = (bytes.fromhex(x) for x in RFC8032[0][1:])
        self.assertFalse(verify.ed25519_verify(pub[:31], msg, sig))
        self.assertFalse(verify.ed25519_verify(pub, msg, sig[:63]))
        self.assertFalse(verify.ed25519_verify(b"\xff" * 32, msg, sig))
        self.assertFalse(verify.ed25519_verify(pub, msg, sig[:32] + b"\xff" * 32))  # s >= L


class GithubTest(unittest.TestCase):
    def test_documented_example_verifies(self):
        verify.github({"X-Hub-Signature-256": GH_SIG}, GH_BODY, [GH_SECRET])

    def test_header_name_is_case_insensitive_and_hex_case_too(self):
        verify.github({"x-hub-signature-256": GH_SIG.upper().replace("SHA256=", "sha256=")}, GH_BODY,
                      [GH_SECRET])

    def test_wrong_secret_and_tampered_body_are_refused(self):
        for body, secret in ((GH_BODY, "wrong"), (GH_BODY + b"!", GH_SECRET)):
            with self.assertRaises(BadSignature):
                verify.github({"X-Hub-Signature-256": GH_SIG}, body, [secret])

    def test_rotated_secret(self):
        verify.github({"X-Hub-Signature-256": GH_SIG}, GH_BODY, ["new-secret", GH_SECRET])

    def test_malformed_headers_are_401(self):
        for value in ("", "757107ea0eb2509f", "sha1=" + GH_SIG[7:], "sha256=zz", "sha256=" + GH_SIG[7:-1]):
            with self.subTest(value=value), self.assertRaises(BadSignature):
                verify.github({"X-Hub-Signature-256": value}, GH_BODY, [GH_SECRET])
        with self.assertRaises(BadSignature):
            verify.github({}, GH_BODY, [GH_SECRET])


class StripeTest(unittest.TestCase):
    SECRET, BODY, TS = "whsec_stripe_test_secret", b'{"id": "evt_1", "type": "charge.succeeded"}', "1700000000"

    def run_check(self, value, secrets=None, now=None, body=None):
        verify.stripe({"Stripe-Signature": value}, self.BODY if body is None else body,
                      secrets or [self.SECRET], 300, int(self.TS) if now is None else now)

    def test_valid_signature_among_several_v1_and_a_v0(self):
        value = stripe_header(self.SECRET, self.TS, self.BODY)
        self.run_check(value)
        self.run_check("t=%s,v1=%s,%s,v0=abc" % (self.TS, "00" * 32, value.split(",", 1)[1]))

    def test_wrong_secret_tampered_body_and_rotation(self):
        value = stripe_header(self.SECRET, self.TS, self.BODY)
        with self.assertRaises(BadSignature):
            self.run_check(value, secrets=["other"])
        with self.assertRaises(BadSignature):
            self.run_check(value, body=self.BODY + b"\n")
        self.run_check(value, secrets=["other", self.SECRET])

    def test_expired_timestamp_is_refused(self):
        value = stripe_header(self.SECRET, self.TS, self.BODY)
        self.run_check(value, now=int(self.TS) + 299)
        with self.assertRaises(BadSignature):
            self.run_check(value, now=int(self.TS) + 301)

    def test_malformed_headers_are_401(self):
        mac = stripe_header(self.SECRET, self.TS, self.BODY).split(",")[1]
        for value in ("", "garbage", "t=%s" % self.TS, mac, "t=abc," + mac, "t=%s,v1=xyz" % self.TS,
                      "t=%s,%s,junk" % (self.TS, mac)):
            with self.subTest(value=value), self.assertRaises(BadSignature):
                self.run_check(value)


class ShopifyTest(unittest.TestCase):
    SECRET, BODY = "shpss_secret", b'{"id": 820982911946154508}'

    def sig(self, secret=None):
        return base64.b64encode(hmac.new((secret or self.SECRET).encode(), self.BODY,
                                         hashlib.sha256).digest()).decode()

    def test_valid_wrong_and_rotated(self):
        verify.shopify({"X-Shopify-Hmac-Sha256": self.sig()}, self.BODY, [self.SECRET])
        verify.shopify({"X-Shopify-Hmac-Sha256": self.sig()}, self.BODY, ["old", self.SECRET])
        with self.assertRaises(BadSignature):
            verify.shopify({"X-Shopify-Hmac-Sha256": self.sig("x")}, self.BODY, [self.SECRET])

    def test_malformed_headers_are_401(self):
        for value in ("", "not base64!", self.sig()[:-2], "sha256=" + self.sig()):
            with self.subTest(value=value), self.assertRaises(BadSignature):
                verify.shopify({"X-Shopify-Hmac-Sha256": value}, self.BODY, [self.SECRET])


class HmacRecipeTest(unittest.TestCase):
    def test_preservica_template_over_non_utf8_bytes(self):
        body = b'{"events": [{"title": "caf\xe9 \xff"}]}'  # latin-1 bytes, not UTF-8
        sig = hmac.new(b"s3", b"preservica-webhook-auth" + body, hashlib.sha256).hexdigest()
        conf = section(verify="hmac", secret="s3", signature_header="Preservica-Signature",
                       signature_message="preservica-webhook-auth{body}")
        verify.verify(conf, {"Preservica-Signature": sig}, body)
        with self.assertRaises(BadSignature):
            verify.verify(conf, {"Preservica-Signature": sig}, body.replace(b"\xe9", b"e"))

    def test_base64_sha512_with_prefix_and_a_header_in_the_message(self):
        body = b"payload"
        mac = hmac.new(b"k", b"1700000000:" + body, hashlib.sha512).digest()
        conf = section(verify="hmac", secret="old k", signature_header="X-Sig", signature_prefix="v0=",
                       signature_encoding="base64", signature_algorithm="sha512",
                       signature_message="{header:X-Time}:{body}")
        headers = {"X-Sig": "v0=" + base64.b64encode(mac).decode(), "X-Time": "1700000000"}
        verify.verify(conf, headers, body)
        with self.assertRaises(BadSignature):  # the signed header is missing
            verify.verify(conf, {"X-Sig": headers["X-Sig"]}, body)
        with self.assertRaises(BadSignature):  # the prefix is required
            verify.verify(conf, {"X-Sig": base64.b64encode(mac).decode(), "X-Time": "1700000000"}, body)

    def test_sha1_and_several_comma_separated_signatures(self):
        body = b"x"
        good = hmac.new(b"k", body, hashlib.sha1).hexdigest()
        conf = section(verify="hmac", secret="k", signature_header="X-Hub-Signature",
                       signature_prefix="sha1=", signature_algorithm="sha1")
        verify.verify(conf, {"X-Hub-Signature": "sha1=%s, sha1=%s" % ("ab" * 20, good)}, body)
        for value in ("sha1=" + "ab" * 20, "sha1=zz", "sha1=", ",,,"):
            with self.subTest(value=value), self.assertRaises(BadSignature):
                verify.verify(conf, {"X-Hub-Signature": value}, body)


    def test_message_template_parts_in_order_each_time(self):
        template = "caf\xe9:{header: X-A }{body}|{unknown}{body}{}"
        for _ in range(2):  # the second time the template is already split
            self.assertEqual(verify.build_message(template, {"x-a": " 1 "}, b"\xff"),
                             "caf\xe9:1".encode() + b"\xff|{unknown}\xff{}")
        with self.assertRaisesRegex(BadSignature, "header X-A .signed. is missing"):
            verify.build_message(template, {}, b"")
        self.assertEqual(verify.build_message("{body}", {}, b"raw"), b"raw")
        self.assertEqual(verify.build_message("", {}, b"raw"), b"")

    def test_secrets_of_every_length_sign_as_the_hmac_module_does(self):
        # Keys shorter than, as long as and longer than each hash's block (a long key is hashed first).
        for algorithm, new in sorted(verify.ALGORITHMS.items()):
            for length in (1, 20, 63, 64, 65, 127, 128, 129, 300):
                secret = bytes(range(length % 256)) + b"k" * (length - length % 256)
                for message in (b"", b"x", bytes(range(256)) * 5):
                    with self.subTest(algorithm=algorithm, length=length, message=len(message)):
                        self.assertEqual(verify._mac(secret, message, algorithm),
                                         hmac.new(secret, message, new).digest())

    def test_every_template_signs_its_whole_message(self):
        # Literal text then the body (Preservica's) has that text hashed into the key's prepared state; every
        # other template builds the message. Either way the signature is the HMAC of the whole message,
        # and the same secret with another template, or another literal text, does not match.
        body = b"\xff{\"events\": []}"
        for template, message in (("preservica-webhook-auth{body}", b"preservica-webhook-auth" + body),
                                  ("{body}", body), ("caf\xe9{body}", "caf\xe9".encode() + body),
                                  ("a{unknown}{body}", b"a{unknown}" + body), ("{body}.", body + b"."),
                                  ("{header:X-A}.{body}", b"1." + body), ("{body}{body}", body + body)):
            for secret in ("s3cret", "x" * 100):
                headers = {"X-Sig": hmac.new(secret.encode(), message, hashlib.sha256).hexdigest(), "x-a": "1"}
                with self.subTest(template=template, secret=len(secret)):
                    verify.hmac_scheme(headers, body, ["wrong", secret], "X-Sig", template=template)
                    verify.hmac_scheme(headers, body, [secret], "X-Sig", template=template)
                    for other in ("{body}", "preservica-webhook-auth{body}", "b{body}"):
                        if other != template:
                            with self.assertRaises(BadSignature):
                                verify.hmac_scheme(headers, body, [secret], "X-Sig", template=other)


    def test_hex_hmac_decides_every_header_as_hmac_scheme_does(self):
        # Preservica's check takes a shorter path for one signature of 64 hex digits; any header value gives
        # the same outcome, and a refusal the same reason, as the general recipe.
        body = b'{"events": [{"entityRef": "caf\xc3\xa9"}]}'
        template = "preservica-webhook-auth{body}"
        mac = hmac.new(b"s3cret", b"preservica-webhook-auth" + body, hashlib.sha256).hexdigest()
        other = hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()  # the body alone: no lead
        values = [mac, mac.upper(), " %s " % mac, "%s,%s" % (other, mac), "%s %s" % (mac, other), other, mac[:-1],
                  mac + "0", mac[:-1] + "g", mac[:32] + " " + mac[33:], "%s\t" % mac[:63], "", "zz" * 32, None]
        for value in values:
            for secrets in (["s3cret"], ["wrong"], ["wrong", "s3cret"], []):
                headers = {} if value is None else {"Preservica-Signature": value}
                outcomes = []
                checker = verify.hex_hmac_checker(secrets, "Preservica-Signature", template)
                for check in (lambda: verify.hmac_scheme(headers, body, secrets, "Preservica-Signature",
                                                         template=template),
                              lambda: checker(headers, body)):
                    try:
                        check()
                        outcomes.append("ok")
                    except BadSignature as e:
                        outcomes.append(str(e))
                with self.subTest(value=value, secrets=secrets):
                    self.assertEqual(outcomes[1], outcomes[0])
                    self.assertEqual(outcomes[0] == "ok", "s3cret" in secrets and value in values[:5], outcomes)


class TokenTest(unittest.TestCase):
    def test_bare_bearer_and_basic_forms(self):
        conf = section(verify="token", secret="old-token tok3n")
        basic = "Basic " + base64.b64encode(b"zencoder:tok3n").decode()
        for value in ("tok3n", "Bearer tok3n", "bearer old-token", basic):
            with self.subTest(value=value):
                verify.verify(conf, {"Authorization": value}, b"")
        for value in ("tok3", "Bearer tok3nn", "Basic " + base64.b64encode(b"u:wrong").decode(),
                      "Basic !!!", "Bearer", ""):
            with self.subTest(value=value), self.assertRaises(BadSignature):
                verify.verify(conf, {"Authorization": value}, b"")

    def test_basic_user_and_password_as_the_token_and_a_custom_header(self):
        verify.verify(section(verify="token", secret="user:pw"),
                      {"Authorization": "Basic " + base64.b64encode(b"user:pw").decode()}, b"")
        conf = section(verify="token", secret="s", token_header="X-Hookd-Secret")
        verify.verify(conf, {"x-hookd-secret": "s"}, b"")
        with self.assertRaises(BadSignature):
            verify.verify(conf, {"Authorization": "s"}, b"")

    def test_non_ascii_header_does_not_crash(self):
        with self.assertRaises(BadSignature):
            verify.verify(section(verify="token", secret="s"), {"Authorization": "t\xe9\xff"}, b"")


class DispatchAndCheckTest(unittest.TestCase):
    def test_verify_dispatches_standard_webhooks_with_tolerance(self):
        conf = section(verify="standard-webhooks", secret=SW_SECRET, tolerance="60")
        verify.verify(conf, sw_headers(SW_ID, SW_TS, SW_SIG), SW_BODY, now=int(SW_TS) + 60)
        with self.assertRaises(BadSignature):
            verify.verify(conf, sw_headers(SW_ID, SW_TS, SW_SIG), SW_BODY, now=int(SW_TS) + 61)

    def test_none_needs_allow_unsigned(self):
        with self.assertRaises(BadSignature):
            verify.verify(section(verify="none"), {}, b"x")
        verify.verify(section(verify="none", allow_unsigned="true"), {}, b"x")

    def test_no_secret_or_unknown_scheme_refuses_everything(self):
        with self.assertRaises(BadSignature):
            verify.verify(section(verify="github"), {"X-Hub-Signature-256": GH_SIG}, GH_BODY)
        with self.assertRaises(BadSignature):
            verify.verify(section(verify="magic", secret="s"), {}, b"")

    def test_check_reports_each_problem(self):
        cases = [
            (section(verify="magic", secret="s"), "not one of"),
            (section(verify=""), "not one of"),
            (section(verify="github"), "secret is required"),
            (section(verify="none"), "allow_unsigned"),
            (section(verify="standard-webhooks", secret="whsec_***"), "not a valid Standard Webhooks"),
            (section(verify="standard-webhooks", secret="whpk_AAAA"), "not a valid Standard Webhooks"),
            (section(verify="stripe", secret="s", tolerance="5m"), "tolerance"),
            (section(verify="hmac", secret="s"), "signature.header is required"),
            (section(verify="hmac", secret="s", signature_header="X", signature_encoding="b32"), "encoding"),
            (section(verify="hmac", secret="s", signature_header="X", signature_algorithm="md5"), "algorithm"),
            (section(verify="hmac", secret="s", signature_header="X", signature_message="{t}.{body}"),
             "unknown placeholder {t}"),
        ]
        for conf, expected in cases:
            with self.subTest(expected=expected):
                problems = verify.check(conf)
                self.assertTrue(any(expected in p for p in problems), problems)

    def test_check_accepts_good_configurations(self):
        for conf in (section(verify="standard-webhooks", secret=SW_SECRET + " " + SW_SECRET[6:]),
                     section(verify="none", allow_unsigned="true"),
                     section(verify="hmac", secret="s", signature_header="X-Sig",
                             signature_message="v0:{header:X-Ts}:{body}"),
                     section(verify="token", secret="t"), section(verify="github", secret="g")):
            self.assertEqual(verify.check(conf), [])

    def test_default_dedupe_per_scheme(self):
        self.assertEqual(verify.default_dedupe("standard-webhooks"), "header:webhook-id")
        self.assertEqual(verify.DEFAULT_DEDUPE_ALIASES["header:webhook-id"], "header:svix-id")
        self.assertEqual(verify.default_dedupe("github"), "header:X-GitHub-Delivery")
        self.assertEqual(verify.default_dedupe("shopify"), "header:X-Shopify-Webhook-Id")
        self.assertEqual(verify.default_dedupe("stripe"), "json:id")
        self.assertEqual(verify.default_dedupe("hmac"), "body")

    def test_garbage_headers_never_raise_anything_but_bad_signature(self):
        garbage = ["", " ", ",", "=", "v1,", "t=,v1=", "sha256=", "Basic", "\x00\xff", "a" * 10000,
                   "v1a,AAAA", "t=99999999999999999999,v1=00", "{header:x}"]
        names = ["webhook-id", "webhook-timestamp", "webhook-signature", "X-Hub-Signature-256",
                 "Stripe-Signature", "X-Shopify-Hmac-Sha256", "Authorization", "X-Sig"]
        confs = [section(verify=s, secret=SW_SECRET + " whpk_" + "A" * 43 + "=", signature_header="X-Sig")
                 for s in ("standard-webhooks", "github", "stripe", "shopify", "hmac", "token")]
        for conf in confs:
            for value in garbage:
                with self.subTest(scheme=conf.get("verify"), value=value[:20]):
                    with self.assertRaises(BadSignature):
                        verify.verify(conf, {n: value for n in names}, b"body")


if __name__ == "__main__":
    unittest.main()
