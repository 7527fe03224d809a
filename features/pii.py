"""Personal data (PII) in a bank's own table, by column name and by the shape of its values.

A column found here is never a feature. Only the column's name and the *kind* of PII found are ever
reported; the values sampled to decide stay in memory and are never logged, stored or raised.
"""

import re

import duckdb

from tagml.core.storage import quote

# Token sequences of normalised column names (see `name_tokens`): a name containing one is PII.
PII_NAME_TOKENS: tuple[tuple[str, ...], ...] = tuple(
    tuple(words.split())
    for words in (
        "name",
        "names",
        "surname",
        "firstname",
        "lastname",
        "fullname",
        "username",
        "nickname",
        "phone",
        "phonenumber",
        "phoneno",
        "cellphone",
        "mobile",
        "tel",
        "telephone",
        "fax",
        "email",
        "emailaddress",
        "mail",
        "national id",
        "nationalid",
        "id card",
        "idcard",
        "id number",
        "idnumber",
        "id no",
        "ssn",
        "passport",
        "dob",
        "birth date",
        "birthdate",
        "date of birth",
        "birthday",
        "address",
        "street",
        "zip",
        "zipcode",
        "postcode",
        "postal code",
        "postalcode",
        "iban",
        "account number",
        "accountnumber",
        "account no",
        "acct no",
        "acct number",
        "card number",
        "cardnumber",
        "card no",
        "pan",
        "ip address",
        "ipaddress",
        "wechat",
        "license number",
        "licence number",
        "tax id",
    )
)
# Chinese column names carry no separators: matched as substrings of the raw name.
PII_NAME_SUBSTRINGS = (
    "姓名",
    "名字",
    "客户名称",
    "户名",
    "身份证",
    "证件号",
    "护照",
    "手机",
    "电话",
    "联系方式",
    "邮箱",
    "电邮",
    "地址",
    "住址",
    "邮编",
    "银行卡",
    "卡号",
    "账号",
    "帐号",
    "出生日期",
    "生日",
    "微信",
)

_WORD_BOUNDARY = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])|(?<=[A-Za-z])(?=[0-9])|(?<=[0-9])(?=[A-Za-z])")
_SEPARATORS = re.compile(r"[^A-Za-z0-9]+")


def name_tokens(name: str) -> tuple[str, ...]:
    """A column name as lower-case words: snake_case, camelCase, PascalCase, kebab-case, spaces and dots split alike."""
    return tuple(t.lower() for t in _SEPARATORS.split(_WORD_BOUNDARY.sub(" ", name)) if t)


def contains_tokens(tokens: tuple[str, ...], words: tuple[str, ...]) -> bool:
    """`words` appear in `tokens` as a contiguous run."""
    n = len(words)
    return any(tokens[i : i + n] == words for i in range(len(tokens) - n + 1))


def pii_by_name(name: str) -> str | None:
    """What in the column's name says it holds personal data (e.g. 'phone number', '手机'), or None."""
    tokens = name_tokens(name)
    for words in PII_NAME_TOKENS:
        if contains_tokens(tokens, words):
            return " ".join(words)
    return next((s for s in PII_NAME_SUBSTRINGS if s in name), None)


# ---- by content ------------------------------------------------------------------------------------

SAMPLE_SIZE = 1000
# A column is PII when at least this share of its sampled values has one PII shape. A majority, not
# "any": a payment card check (Luhn) passes one random 13-19 digit number in ten, and free text holds
# the odd e-mail address; a column whose values mostly look like phone numbers is a phone column with
# some blanks or typos.
PII_VALUE_SHARE = 0.5

_CN_MOBILE = re.compile(r"(?:\+?86)?1[3-9]\d{9}")
_INTERNATIONAL_PHONE = re.compile(r"\+\d{7,15}")
_CN_LANDLINE = re.compile(r"0\d{2,3}\d{7,8}")
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[A-Za-z]{2,}")
_CN_ID_18 = re.compile(r"\d{6}(?:19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\d{3}[\dXx]")
_CN_ID_15 = re.compile(r"\d{6}\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\d{3}")
_DIGITS = re.compile(r"\d{13,19}")
_IBAN = re.compile(r"[A-Z]{2}\d{2}[A-Z0-9]{11,30}")
_PHONE_PUNCTUATION = re.compile(r"[\s\-().]")
_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)


def _cn_id_checksum_ok(value: str) -> bool:
    total = sum(int(d) * w for d, w in zip(value[:17], _ID_WEIGHTS))
    return "10X98765432"[total % 11] == value[17].upper()


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, d in enumerate(reversed(digits)):
        n = int(d) * (2 if i % 2 else 1)
        total += n - 9 if n > 9 else n
    return total % 10 == 0


def _iban_ok(value: str) -> bool:
    rotated = value[4:] + value[:4]
    return int("".join(str(int(c, 36)) for c in rotated)) % 97 == 1


def pii_kind(value: str) -> str | None:
    """The PII shape of one value (national id, phone number, e-mail, payment card number, IBAN), or None."""
    text = value.strip()
    if _EMAIL.fullmatch(text):
        return "e-mail address"
    compact = _PHONE_PUNCTUATION.sub("", text)
    if (_CN_ID_18.fullmatch(compact) and _cn_id_checksum_ok(compact)) or _CN_ID_15.fullmatch(compact):
        return "national id number"
    if _CN_MOBILE.fullmatch(compact) or _INTERNATIONAL_PHONE.fullmatch(compact) or _CN_LANDLINE.fullmatch(compact):
        return "phone number"
    if _DIGITS.fullmatch(compact) and _luhn_ok(compact):
        return "payment card number"
    if _IBAN.fullmatch(compact.upper()) and _iban_ok(compact.upper()):
        return "IBAN"
    return None


def pii_by_content(con: duckdb.DuckDBPyConnection, relation: str, column: str) -> tuple[str, float] | None:
    """(kind, share of the sample) when most of the column's first `SAMPLE_SIZE` non-null values have one PII shape.

    The first values in the table's order, not a random draw: the same table gives the same decision, and
    no full scan is needed (insertion order is preserved for this query only).
    """
    preserved = con.execute("SELECT current_setting('preserve_insertion_order')").fetchone()[0]
    con.execute("SET preserve_insertion_order = true")
    try:
        values = con.execute(f"SELECT {quote(column)}::VARCHAR FROM {relation} WHERE {quote(column)} IS NOT NULL LIMIT {SAMPLE_SIZE}").fetchall()
    finally:
        con.execute("SET preserve_insertion_order = ?", [bool(preserved)])
    if not values:
        return None
    counts: dict[str, int] = {}
    for (value,) in values:
        kind = pii_kind(value)
        if kind:
            counts[kind] = counts.get(kind, 0) + 1
    if not counts:
        return None
    kind, hits = max(counts.items(), key=lambda item: item[1])
    share = hits / len(values)
    return (kind, share) if share >= PII_VALUE_SHARE else None
