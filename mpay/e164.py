"""Telephone numbers as account ids: everything becomes E.164 here, or is refused.

The account id is the number in E.164 form (``+886912345678``).  Users, devices
and modems write numbers in every national style, so each one passes through
`normalise` with the configured default region before it is compared or
stored.  libphonenumber (the ``phonenumbers`` package) decides validity: a
number it does not know to be valid is refused with a reason a person can act
on, and never reaches a store.

`is_e164` is only a syntactic check, for values that were normalised earlier
(ledger keys, URIs we wrote ourselves); anything from outside goes through
`normalise` or `number_from_uri`.
"""

from __future__ import annotations

import functools
import re

import phonenumbers
from phonenumbers import NumberParseException, PhoneNumberFormat, ValidationResult

from mpay.sip.headers import ParseError
from mpay.sip.uri import parse_uri

# Longer input than this is not a telephone number someone typed; refusing it
# early also bounds the memory of the cache below.
MAX_INPUT_CHARS = 64
# Distinct (text, region) pairs remembered; invalid inputs are cached too, so
# a peer repeating garbage costs one dictionary look-up.
NORMALISE_CACHE_ENTRIES = 4096
# ITU-T E.164: at most 15 digits, country code first (never 0).  [0-9], not
# \d, which also matches other scripts' digits.
_E164_RE = re.compile(r"\+[1-9][0-9]{6,14}")
_NOT_IN_DOMAIN_RE = re.compile(r'[@;:<>"? \t\r\n]')
# RFC 3966 visual separators, allowed inside a tel: URI's number.
_VISUAL_SEPARATORS = str.maketrans("", "", "-.()")
# 00 is the international prefix ITU-T recommends and most countries use; people
# type it even where their own region dials out otherwise (TW 002, US 011).
_ITU_INTERNATIONAL_PREFIX = "00"
# Used when the text must carry its own +country code.
_NO_REGION = "ZZ"

_PARSE_REASONS = {
    NumberParseException.INVALID_COUNTRY_CODE: "unknown country code",
    NumberParseException.NOT_A_NUMBER: "not a number",
    NumberParseException.TOO_SHORT_AFTER_IDD: "too short",
    NumberParseException.TOO_SHORT_NSN: "too short",
    NumberParseException.TOO_LONG: "too long",
}
_POSSIBLE_REASONS = {
    ValidationResult.INVALID_COUNTRY_CODE: "unknown country code",
    ValidationResult.TOO_SHORT: "too short",
    ValidationResult.TOO_LONG: "too long",
    ValidationResult.IS_POSSIBLE_LOCAL_ONLY: "local number only: add the area code",
}


class InvalidNumber(ValueError):
    """A number we refuse; `reason` is short and fit to show the user."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def is_e164(text: object) -> bool:
    """True if *text* is already in E.164 form; syntax only, no validity check (any value:
    a JSON body's field may be anything)."""
    return isinstance(text, str) and _E164_RE.fullmatch(text) is not None


def normalise(text: object, default_region: str) -> str:
    """*text* as ``+<digits>``, read in *default_region* when it has no country code.

    Raises `InvalidNumber` with the reason when libphonenumber does not accept
    the number as valid; an extension is refused rather than silently dropped.
    """
    if not isinstance(text, str):
        raise InvalidNumber("not a number")
    text = text.strip()
    if not text:
        raise InvalidNumber("empty")
    if len(text) > MAX_INPUT_CHARS:
        raise InvalidNumber("too long to be a telephone number")
    number, reason = _normalise_cached(text, default_region)
    if number is None:
        raise InvalidNumber(reason or "invalid")
    return number


@functools.lru_cache(maxsize=NORMALISE_CACHE_ENTRIES)
def _normalise_cached(text: str, region: str) -> tuple[str | None, str | None]:
    """(number, None) or (None, reason): results, refusals included, are cached."""
    number, reason = _parse(text, region)
    if number is None and text.startswith(_ITU_INTERNATIONAL_PREFIX):
        # Only ever replaces a refusal: a number valid in the region wins.
        retry, _ = _parse("+" + text[len(_ITU_INTERNATIONAL_PREFIX):], _NO_REGION)
        if retry is not None:
            return retry, None
    return number, reason


def _parse(text: str, region: str) -> tuple[str | None, str | None]:
    try:
        parsed = phonenumbers.parse(text, region)
    except NumberParseException as exc:
        if (exc.error_type == NumberParseException.INVALID_COUNTRY_CODE
                and not text.startswith("+")
                and region not in phonenumbers.SUPPORTED_REGIONS):
            return None, f"unknown region {region}: write the number with +country code"
        return None, _PARSE_REASONS.get(exc.error_type, "not a number")
    if parsed.extension:
        return None, "extensions are not accepted"
    possible = phonenumbers.is_possible_number_with_reason(parsed)
    if possible != ValidationResult.IS_POSSIBLE:
        reason = _POSSIBLE_REASONS.get(possible)
        if reason is None:
            reason = f"wrong length for region {_region_of(parsed, region)}"
        return None, reason
    if not phonenumbers.is_valid_number(parsed):
        return None, f"invalid for region {_region_of(parsed, region)}"
    result = phonenumbers.format_number(parsed, PhoneNumberFormat.E164)
    if not is_e164(result):      # libphonenumber accepts some German numbers of 16 digits
        return None, "too long for E.164 (15 digits at most)"
    return result, None


def _region_of(parsed: phonenumbers.PhoneNumber, default_region: str) -> str:
    code = parsed.country_code
    region = None if code is None else phonenumbers.region_code_for_country_code(code)
    return default_region if region in (None, "001", _NO_REGION) else region


@functools.lru_cache(maxsize=NORMALISE_CACHE_ENTRIES)
def sip_uri(number: str, domain: str) -> str:
    """The SIP address of an account: ``sip:+886912345678@domain;user=phone``.
    Remembered (a refusal is not): a transfer names its payer and payee by it,
    and each time was two regular expressions."""
    if not is_e164(number):
        raise InvalidNumber(f"not an E.164 number: {number!r}")
    if not domain or _NOT_IN_DOMAIN_RE.search(domain):
        raise ValueError(f"not a SIP domain: {domain!r}")
    return f"sip:{number}@{domain};user=phone"


def number_from_uri(uri: str) -> str:
    """The account number in a ``sip:``/``sips:`` or ``tel:`` URI, validated.

    Only global numbers (``+`` and country code) are accepted: a local number
    would need a phone-context to mean anything, and we do not guess one.
    """
    if not isinstance(uri, str):
        raise InvalidNumber("not a URI")
    uri = uri.strip()
    if uri.startswith("<") and uri.endswith(">"):
        uri = uri[1:-1]
    scheme, colon, rest = uri.partition(":")
    scheme = scheme.lower()
    if not colon:
        raise InvalidNumber("not a URI")
    if scheme == "tel":
        user = rest.partition(";")[0].translate(_VISUAL_SEPARATORS)
    elif scheme in ("sip", "sips"):
        try:
            parsed = parse_uri(uri)
        except ParseError as exc:
            raise InvalidNumber(f"bad SIP URI: {exc.reason}") from None
        if parsed.user is None or parsed.password is not None:
            raise InvalidNumber("SIP URI has no telephone number")
        user = parsed.user
    else:
        raise InvalidNumber(f"unsupported URI scheme {scheme!r}")
    if not is_e164(user):
        raise InvalidNumber("not a global telephone number (+country code)")
    return normalise(user, _NO_REGION)
