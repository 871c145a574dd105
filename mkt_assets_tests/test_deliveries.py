"""The delivery format: signatures, the event type and contact id read from a body, the secret."""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import pickle
from datetime import datetime, timezone

import pytest

from mkt_assets.core.deliveries import (
    MIN_SECRET_CHARACTERS,
    WEBHOOK_SECRET_ENV,
    Delivery,
    DeliveryFacts,
    DeliveryFormatError,
    WebhookSecret,
    exact_contact_id,
    parse,
    sign,
    verify,
    webhook_secret,
)
from mkt_assets.core.errors import ConfigurationError

SECRET_TEXT = "s3cret-0123456789-abcdef"
SECRET = WebhookSecret(SECRET_TEXT)
BODY = b'{"type": "CONTACT_TAG_ADDED", "contact": {"id": 42, "email": "ada@example.com"}, "tag": {"id": 7}}'


def test_a_signature_is_the_hex_hmac_sha256_of_the_raw_body_keyed_with_the_secret() -> None:
    expected = hmac.new(SECRET_TEXT.encode(), BODY, hashlib.sha256).hexdigest()

    assert sign(BODY, SECRET) == sign(BODY, SECRET_TEXT) == expected
    assert verify(BODY, SECRET, expected)


@pytest.mark.parametrize(
    "signature",
    [
        pytest.param(lambda good: good.upper(), id="uppercase hex"),
        pytest.param(lambda good: f"  {good}\n", id="blanks around it"),
    ],
)
def test_a_signature_in_either_case_or_with_blanks_around_it_verifies(signature: object) -> None:
    assert verify(BODY, SECRET, signature(sign(BODY, SECRET)))  # type: ignore[operator]


@pytest.mark.parametrize(
    "signature",
    [
        None,
        "",
        "not hex at all",
        "sha256=" + sign(BODY, SECRET),  # a prefix the platform is not known to send
        sign(BODY, SECRET)[:-1],  # one digit short
        sign(BODY + b" ", SECRET),  # another body's
        sign(BODY, "another-secret-0123456789"),  # another secret's
        hmac.new(SECRET_TEXT.encode(), BODY, hashlib.sha1).hexdigest(),  # another digest
    ],
)
def test_a_missing_malformed_or_wrong_signature_does_not_verify(signature: str | None) -> None:
    assert not verify(BODY, SECRET, signature)


def test_a_body_changed_by_one_byte_no_longer_verifies() -> None:
    signature = sign(BODY, SECRET)
    assert not verify(BODY.replace(b"42", b"43"), SECRET, signature)


@pytest.mark.parametrize(
    ("body", "headers", "facts"),
    [
        (BODY, {}, DeliveryFacts("CONTACT_TAG_ADDED", 42)),
        (b'{"event": "CONTACT_OPT_IN", "data": {"contact": {"id": 5}}}', {}, DeliveryFacts("CONTACT_OPT_IN", 5)),
        # The header names the event when the body does not; the body wins when both do.
        (b'{"data": {"contact": {"id": 5}}}', {"x-webhook-event": "SALE_NEW"}, DeliveryFacts("SALE_NEW", 5)),
        (b'{"type": "SALE_NEW", "contact": {"id": 5}}', {"X-Webhook-Event": "SALE_CANCELED"}, DeliveryFacts("SALE_NEW", 5)),
        # The top-level contact is looked at first; one without an id leaves data.contact.
        (b'{"contact": {"id": 1}, "data": {"contact": {"id": 2}}}', {}, DeliveryFacts(None, 1)),
        (b'{"contact": {"email": "a@b.c"}, "data": {"contact": {"id": 2}}}', {}, DeliveryFacts(None, 2)),
        # Ids written as text are taken when they are exactly an integer.
        (b'{"contact": {"id": "123"}}', {}, DeliveryFacts(None, 123)),
        # Nothing found is None, never an error.
        (b"{}", {}, DeliveryFacts(None, None)),
        (b'{"type": 7, "contact": "42", "data": []}', {}, DeliveryFacts(None, None)),
        (b'{"type": "CONTACT_CREATED\\u001b[2J", "contact": {"id": 42}}', {}, DeliveryFacts(None, 42)),
        (b'{"type": "' + b"X" * 65 + b'"}', {}, DeliveryFacts(None, None)),
    ],
)
def test_the_event_type_and_contact_id_are_found_where_deliveries_carry_them(
    body: bytes, headers: dict[str, str], facts: DeliveryFacts
) -> None:
    assert parse(body, headers) == facts


@pytest.mark.parametrize(
    "value",
    [0, -1, 1.0, 42.5, True, "0123", "+1", " 1", "1.0", "1e3", "١٢٣", "", None, [42], {"id": 42}, 1 << 63, str(1 << 63)],
)
def test_anything_but_an_exact_positive_bigint_is_no_contact_id(value: object) -> None:
    assert exact_contact_id(value) is None
    assert parse(json.dumps({"contact": {"id": value}}).encode()).contact_id is None


def test_the_largest_bigint_is_a_contact_id_as_a_number_or_a_text() -> None:
    largest = (1 << 63) - 1
    assert exact_contact_id(largest) == exact_contact_id(str(largest)) == largest


@pytest.mark.parametrize(
    ("body", "said"),
    [
        (b"not json", "not JSON"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b'{"a": NaN}', "not JSON"),
        (b"[1, 2]", "a JSON list"),
        (b'"text"', "a JSON text"),
        (b"null", "JSON null"),
        (b"[" * 100_000 + b"]" * 100_000, "nests deeper"),
        (b'{"contact": {"id": 42, "email": "ada@example.com"', "not JSON"),
    ],
)
def test_a_body_that_is_not_a_json_object_is_refused_without_being_quoted(body: bytes, said: str) -> None:
    with pytest.raises(DeliveryFormatError, match=said) as raised:
        parse(body)
    assert "ada@example.com" not in str(raised.value)


def test_a_delivery_leaves_its_body_out_of_its_repr() -> None:
    delivery = Delivery(1, datetime.now(timezone.utc), "CONTACT_CREATED", 42, True, "d", BODY.decode())
    assert "ada@example.com" not in repr(delivery)


# ---------------------------------------------------------------- the secret


def test_the_secret_is_read_from_the_environment_without_a_secret_files_final_line_break() -> None:
    secret = webhook_secret({WEBHOOK_SECRET_ENV: SECRET_TEXT + "\n"})
    assert secret.reveal() == SECRET_TEXT
    assert verify(BODY, secret, sign(BODY, SECRET_TEXT))


@pytest.mark.parametrize(
    ("environment", "said"),
    [
        ({}, "MKT_WEBHOOK_SECRET is not set"),
        ({WEBHOOK_SECRET_ENV: ""}, "is empty"),
        ({WEBHOOK_SECRET_ENV: " \t\n"}, "only whitespace"),
        ({WEBHOOK_SECRET_ENV: "short-secret"}, f"shorter than {MIN_SECRET_CHARACTERS}"),
        ({WEBHOOK_SECRET_ENV: "a secret with spaces in it"}, "a space, a control character"),
        ({WEBHOOK_SECRET_ENV: "sécret-0123456789abcdef"}, "outside ASCII"),
        ({WEBHOOK_SECRET_ENV: "x" * 5000}, "longer than any secret"),
    ],
)
def test_a_missing_or_unusable_secret_is_refused_naming_the_variable_never_the_value(
    environment: dict[str, str], said: str
) -> None:
    with pytest.raises(ConfigurationError, match=said) as raised:
        webhook_secret(environment)
    message = str(raised.value)
    assert "MKT_WEBHOOK_SECRET" in message and "secrets.token_hex" in message
    value = environment.get(WEBHOOK_SECRET_ENV, "").strip()
    if value:
        assert value not in message and value[:6] not in message


def test_the_secret_shows_in_no_repr_str_or_format_and_is_never_pickled() -> None:
    shown = [repr(SECRET), str(SECRET), f"{SECRET}", f"{SECRET!r}", repr([SECRET]), repr({"secret": SECRET})]
    assert all(SECRET_TEXT not in text for text in shown)
    with pytest.raises(TypeError, match="never pickled"):
        pickle.dumps(SECRET)
    with pytest.raises(TypeError, match="never pickled"):
        copy.deepcopy(SECRET)
