"""``parse_form``: multipart/form-data bodies as the read endpoint reads them (no network).

Bodies are built by urllib3's ``encode_multipart_formdata``, the encoder clickhouse-connect
sends its form queries with, or written out byte by byte for what no encoder produces.
"""

from __future__ import annotations

import pytest
from urllib3 import encode_multipart_formdata

from aipipe.infra.formdata import CANNOT_READ_ALL_DATA, LIMIT_EXCEEDED, Form, parse_form
from aipipe.infra.readonly import QueryError

CT = "multipart/form-data; boundary=AAA"


def parse(content_type: str, body: bytes, fields: int = 10, size: int = 100) -> Form:
    return parse_form(content_type, body, max_fields=fields, max_field_bytes=size)


def test_field_values_come_back_byte_for_byte_in_order() -> None:
    values = [
        ("query", "SELECT {t:String}, {e:String}\n FORMAT Native"),
        ("param_t", "a\tb\r\\\nc\\\\ \x00 é ü\r"),  # what clickhouse-connect escapes, and bare CR
        ("param_e", ""),
        ("param_t", "--AAA looks like a boundary\r\n--"),
        ("query", " LIMIT 1"),
    ]
    body, content_type = encode_multipart_formdata(values)

    form = parse(content_type, body)

    assert form == Form(tuple((n, v.encode()) for n, v in values), ())


def test_file_parts_are_named_not_kept_as_fields() -> None:
    body, content_type = encode_multipart_formdata(
        [("query", "SELECT * FROM ids"), ("ids", ("ids.tsv", b"1\n2\n", "text/plain"))])

    assert parse(content_type, body) == Form((("query", b"SELECT * FROM ids"),), ("ids",))


def test_an_empty_filename_still_makes_a_file() -> None:
    body = (b'--AAA\r\nContent-Disposition: form-data; name="query"; filename=""\r\n\r\n'
            b"SELECT 1\r\n--AAA--\r\n")

    assert parse(CT, body) == Form((), ("query",))


def test_the_field_count_limit_is_exact() -> None:
    at_limit, content_type = encode_multipart_formdata([(f"param_{i}", "v") for i in range(10)])
    over, over_type = encode_multipart_formdata([(f"param_{i}", "v") for i in range(11)])

    assert len(parse(content_type, at_limit).fields) == 10
    with pytest.raises(QueryError) as caught:
        parse(over_type, over)
    assert caught.value.code == LIMIT_EXCEEDED
    assert str(caught.value) == ("The form has more than 10 fields, the read endpoint's limit; "
                                 "send the query and its parameters in fewer fields.")


def test_the_field_size_limit_is_exact_and_names_the_field() -> None:
    at_limit, content_type = encode_multipart_formdata({"param_ids": "x" * 100})
    over, over_type = encode_multipart_formdata({"param_ids": "x" * 101})

    assert parse(content_type, at_limit).fields == (("param_ids", b"x" * 100),)
    with pytest.raises(QueryError) as caught:
        parse(over_type, over)
    assert caught.value.code == LIMIT_EXCEEDED
    assert str(caught.value) == ("Form field 'param_ids' holds 101 bytes, over the read "
                                 "endpoint's limit of 100; send fewer or shorter values per "
                                 "query.")


@pytest.mark.parametrize(("content_type", "body", "reason"), [
    ("multipart/form-data", b"--AAA\r\n\r\nx\r\n--AAA--\r\n",
     "its Content-Type has no boundary parameter"),
    ("multipart/mixed; boundary=AAA", b"--AAA--\r\n",
     "its Content-Type is not multipart/form-data"),
    (CT + "\r\nX-Injected: 1", b"", "its Content-Type header spans lines"),
    (CT, b"no delimiter at all",
     "it is malformed (StartBoundaryNotFoundDefect; MultipartInvariantViolationDefect)"),
    (CT, b'--AAA\r\nContent-Disposition: form-data; name="query"\r\n\r\nSELECT 1\r\n--AAA',
     "it is malformed (CloseBoundaryNotFoundDefect)"),
    (CT, b'--AAA\r\nContent-Disposition: form-data; name="query"\r\nSELECT 1\r\n--AAA--\r\n',
     "part 1 is malformed (MissingHeaderBodySeparatorDefect)"),
    (CT, b"--AAA\r\n\r\nSELECT 1\r\n--AAA--\r\n",
     "part 1 has no 'Content-Disposition: form-data' header"),
    (CT, b"--AAA\r\nContent-Disposition: form-data\r\n\r\nSELECT 1\r\n--AAA--\r\n",
     "part 1 has no name in its Content-Disposition header"),
    (CT, b'--AAA\r\nContent-Disposition: form-data; name="query"\r\n'
         b"Content-Transfer-Encoding: base64\r\n\r\nU0VMRUNUIDE=\r\n--AAA--\r\n",
     "part 1 has Content-Transfer-Encoding base64; send the value as is"),
    (CT, b'--AAA\r\nContent-Disposition: form-data; name="x"\r\n'
         b"Content-Type: multipart/mixed; boundary=BBB\r\n\r\n--BBB\r\n\r\nhi\r\n--BBB--\r\n"
         b"--AAA--\r\n", "part 1 is itself a multipart"),
])
def test_what_clickhouse_would_read_otherwise_is_refused_with_the_reason(
    content_type: str, body: bytes, reason: str
) -> None:
    with pytest.raises(QueryError) as caught:
        parse(content_type, body)

    assert caught.value.code == CANNOT_READ_ALL_DATA
    assert str(caught.value) == f"The multipart/form-data body cannot be read: {reason}."
