"""Server frames against byte vectors of RFC 6455 (section 5.7 and the
length encodings of 5.2)."""

from __future__ import annotations

import pytest
from channels_records.wsframe import OP_TEXT, frame_header, text_frame


def test_rfc_example_single_frame_unmasked_text():
    # RFC 6455 5.7: "A single-frame unmasked text message" containing "Hello".
    assert text_frame(b"Hello") == bytes.fromhex("810548656c6c6f")


def test_empty_and_125_byte_payloads_use_the_7_bit_length():
    assert text_frame(b"") == b"\x81\x00"
    assert text_frame(b"a" * 125)[:2] == b"\x81\x7d"
    assert len(text_frame(b"a" * 125)) == 127


def test_126_to_65535_bytes_use_the_16_bit_length():
    assert frame_header(OP_TEXT, 126) == b"\x81\x7e\x00\x7e"
    assert frame_header(OP_TEXT, 65535) == b"\x81\x7e\xff\xff"
    # RFC 6455 5.7: 256 bytes binary message in a single unmasked frame.
    assert frame_header(0x2, 256) == bytes.fromhex("827e0100")


def test_65536_bytes_and_more_use_the_64_bit_length():
    assert frame_header(OP_TEXT, 65536) == b"\x81\x7f\x00\x00\x00\x00\x00\x01\x00\x00"
    # RFC 6455 5.7: 64KiB binary message in a single unmasked frame.
    assert frame_header(0x2, 65536) == bytes.fromhex("827f0000000000010000")
    assert frame_header(OP_TEXT, 2**63 - 1)[2:] == b"\x7f" + b"\xff" * 7
    with pytest.raises(ValueError):
        frame_header(OP_TEXT, 2**63)


def test_utf8_payload_length_counts_bytes_not_characters():
    payload = '42["records",{"t":"héllo ✓"}]'.encode()
    frame = text_frame(payload)
    assert frame[1] == len(payload) and frame[2:] == payload
