"""``multipart/form-data`` request bodies, read the way ClickHouse's HTTP interface reads them.

A ClickHouse client sends the query and its bind parameters as form fields (``query``,
``param_<name>``) when they are too long for the URL: clickhouse-connect does so once the
URL-encoded parameters pass 4096 bytes. A part with a ``filename`` is an external data
table. The body is parsed by the standard library's ``email`` parser (``policy.HTTP``);
anything it reports as a defect, and what ClickHouse would read differently (a nested
multipart, a ``Content-Transfer-Encoding``), is refused with ``QueryError`` rather than
guessed at. Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from email.message import Message
from email.parser import BytesParser
from email.policy import HTTP

from aipipe.infra.readonly import QueryError

__all__ = ["CANNOT_READ_ALL_DATA", "LIMIT_EXCEEDED", "Form", "parse_form"]

# ClickHouse's codes for a body it cannot read through, and for a form over its limits.
CANNOT_READ_ALL_DATA, LIMIT_EXCEEDED = 33, 290
_PLAIN_ENCODINGS = frozenset({"", "7bit", "8bit", "binary"})


@dataclass(frozen=True)
class Form:
    """The fields of a form in their order (a name may repeat), and the names of its files."""

    fields: tuple[tuple[str, bytes], ...]
    files: tuple[str, ...]


def parse_form(content_type: str, body: bytes, *, max_fields: int,
               max_field_bytes: int) -> Form:
    """The parts of a ``multipart/form-data`` ``body`` sent with ``content_type``.

    At most ``max_fields`` parts, and at most ``max_field_bytes`` in each field's value;
    files are named, not read (their size is bounded by the body's).
    """
    if "\r" in content_type or "\n" in content_type:
        raise _malformed("its Content-Type header spans lines")
    message = BytesParser(policy=HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode("latin-1", "replace") + body)
    if message.get_content_type() != "multipart/form-data":
        raise _malformed("its Content-Type is not multipart/form-data")
    boundary = message.get_boundary()
    if not boundary:
        raise _malformed("its Content-Type has no boundary parameter")
    # cheap bound before looking at parts: every part starts with a delimiter line
    if body.count(b"--" + boundary.encode("latin-1", "replace")) > max_fields + 1:
        raise _too_many(max_fields)
    if message.defects or not message.is_multipart():
        raise _malformed(f"it is malformed ({_defect(message)})" if message.defects
                         else "it has no parts")
    parts = list(message.iter_parts())
    if len(parts) > max_fields:
        raise _too_many(max_fields)
    fields: list[tuple[str, bytes]] = []
    files: list[str] = []
    for index, part in enumerate(parts, 1):
        name = _name(part, index)
        if part.get_param("filename", header="content-disposition") is not None:
            files.append(name)
            continue
        value = part.get_payload(decode=True)
        if not isinstance(value, bytes):
            raise _malformed(f"part {index} ({name!r}) holds no value")
        if len(value) > max_field_bytes:
            raise QueryError(LIMIT_EXCEEDED, f"Form field {name!r} holds {len(value)} bytes, "
                             f"over the read endpoint's limit of {max_field_bytes}; send "
                             "fewer or shorter values per query.")
        fields.append((name, value))
    return Form(tuple(fields), tuple(files))


def _name(part: Message, index: int) -> str:
    """The part's field name, from ``Content-Disposition: form-data; name="..."``."""
    if part.defects or part.is_multipart():
        reason = f"is malformed ({_defect(part)})" if part.defects else "is itself a multipart"
        raise _malformed(f"part {index} {reason}")
    if part.get_content_disposition() != "form-data":
        raise _malformed(f"part {index} has no 'Content-Disposition: form-data' header")
    encoding = str(part.get("content-transfer-encoding", "")).strip().lower()
    if encoding not in _PLAIN_ENCODINGS:
        raise _malformed(f"part {index} has Content-Transfer-Encoding {encoding}; send the "
                         "value as is")
    name = part.get_param("name", header="content-disposition")
    if not isinstance(name, str) or not name:
        raise _malformed(f"part {index} has no name in its Content-Disposition header")
    return name


def _defect(message: Message) -> str:
    return "; ".join(type(d).__name__ for d in message.defects)


def _malformed(reason: str) -> QueryError:
    return QueryError(CANNOT_READ_ALL_DATA, f"The multipart/form-data body cannot be read: "
                      f"{reason}.")


def _too_many(max_fields: int) -> QueryError:
    return QueryError(LIMIT_EXCEEDED, f"The form has more than {max_fields} fields, the read "
                      "endpoint's limit; send the query and its parameters in fewer fields.")
